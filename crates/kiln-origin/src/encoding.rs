//! gzip for playlists, done once per publish instead of once per request.
//!
//! kilnd's answers pass through tower-http's compression layer, which compresses each answer it is given anew.
//! For a media playlist that is the same work thousands of times per publish (every viewer's blocking reload of
//! a browser or a shield asks for gzip), so the origin compresses each variant it serves once
//! ([`crate::published`]) and answers with `Content-Encoding: gzip` itself; the layer leaves an answer that has
//! an encoding alone. For that the origin must choose gzip exactly when the layer would: [`wants_gzip`] is the
//! layer's negotiation for a server that offers gzip only (tower-http 0.7's rules: q-values with at most three
//! decimals, `x-gzip`, the `*` wildcard, unknown codings ignored), and kilnd's tests compare the two on generated
//! headers. Where they could disagree the layer still answers correctly: it compresses a plain answer itself.

use std::io::Write;

use axum::http::{header, HeaderMap};
use bytes::Bytes;

/// Answers smaller than this are sent as they are (the layer's size threshold, `SizeAbove(256)` in kilnd).
pub const MIN_COMPRESSED: usize = 256;

/// Whether the compression layer answers a request with these headers gzipped: gzip is acceptable and preferred
/// to `identity` (ties go to gzip).
pub fn wants_gzip(headers: &HeaderMap) -> bool {
    let (mut gzip, mut identity) = (Listed::default(), Listed::default());
    let mut wildcard = None;
    for entry in headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
    {
        let mut it = entry.splitn(2, ';');
        let coding = it.next().unwrap_or("").trim();
        // an entry whose q-value does not parse is ignored
        let Some(q) = it.next().map_or(Some(1000), |q| qvalue(q.trim())) else {
            continue;
        };
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            gzip.add(q);
        } else if coding.eq_ignore_ascii_case("identity") {
            identity.add(q);
        } else if coding == "*" && wildcard.is_none() {
            wildcard = Some(q);
        }
    }
    let (g, i) = match wildcard {
        // the highest q listed wins; an encoding at q=0 is not acceptable
        None => (gzip.max, identity.max),
        // each coding's first listed q, else the wildcard's
        Some(w) => (gzip.first.unwrap_or(w), identity.first.unwrap_or(w)),
    };
    g > 0 && g >= i
}

/// The q-values (in thousandths) listed for one coding: the first, and the highest (0 when none).
#[derive(Default)]
struct Listed {
    first: Option<u16>,
    max: u16,
}

impl Listed {
    fn add(&mut self, q: u16) {
        self.first.get_or_insert(q);
        self.max = self.max.max(q);
    }
}

/// An RFC 9110 q-value (`q=0`, `q=0.5`, `Q=1.000`, at most three decimals, at most 1) in thousandths.
fn qvalue(s: &str) -> Option<u16> {
    let rest = s.strip_prefix(['q', 'Q'])?.strip_prefix('=')?;
    let mut chars = rest.chars();
    let mut value: u16 = match chars.next()? {
        '0' => 0,
        '1' => 1000,
        _ => return None,
    };
    match chars.next() {
        None => return Some(value),
        Some('.') => {}
        Some(_) => return None,
    }
    let mut factor = 100;
    for c in chars {
        let d = c.to_digit(10)? as u16;
        if factor == 0 {
            return None;
        }
        value += factor * d;
        factor /= 10;
    }
    (value <= 1000).then_some(value)
}

/// `body` gzipped, at zlib's default level (the layer's): a playlist variant is made once per publish, but
/// a stream with one viewer makes one per request.
pub fn gzip(body: &[u8]) -> Bytes {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 3 + 64),
        flate2::Compression::default(),
    );
    enc.write_all(body).expect("writing to a Vec");
    Bytes::from(enc.finish().expect("writing to a Vec"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wants(values: &[&str]) -> bool {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::ACCEPT_ENCODING, v.parse().unwrap());
        }
        wants_gzip(&h)
    }

    #[test]
    fn gzip_is_chosen_when_acceptable_and_not_less_preferred_than_identity() {
        assert!(!wants(&[]));
        assert!(wants(&["gzip, deflate, br, zstd"]));
        assert!(wants(&["br", "x-GZIP"]));
        assert!(wants(&["gzip;q=0.5"]));
        assert!(!wants(&["gzip;q=0"]));
        assert!(!wants(&["gzip;q=0.5, identity"]));
        assert!(wants(&["gzip, identity"]));
        assert!(!wants(&["br, deflate"]));
        assert!(wants(&["*"]));
        assert!(!wants(&["*;q=0"]));
        assert!(!wants(&["gzip;q=0, *"]));
        assert!(wants(&["identity;q=0, *"]));
        // the wildcard case takes the first q listed; without one, the highest
        assert!(!wants(&["gzip;q=0, gzip, *"]));
        assert!(wants(&["gzip;q=0, gzip"]));
        // malformed q-values drop their entry
        assert!(!wants(&["gzip;q=2"]));
        assert!(!wants(&["gzip;q=0.1234"]));
        assert!(!wants(&["gzip; q = 1"]));
        assert!(wants(&["gzip;Q=1."]));
    }

    #[test]
    fn gzip_round_trips() {
        use std::io::Read;
        let body = "#EXTM3U\n".repeat(100);
        let gz = gzip(body.as_bytes());
        assert!(gz.len() < body.len() / 4);
        let mut out = String::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, body);
    }
}
