//! Signed playback URLs.
//!
//! When a key is configured, every `/live/{stream}/…` request must carry `exp` (Unix seconds) and `sig`
//! (hex HMAC-SHA256 over `"/live/{stream}/|{exp}"`) as query parameters. One token covers a whole stream, so
//! the relative URIs inside playlists and the MPD work: the origin appends the caller's token to each of them.
//! A missing, bad or expired token gets 403 before any blocking wait. A CDN must keep `exp`/`sig` in its cache
//! key (as `deploy/edge/` does): a playlist answered for one token carries that token in its URIs, and a key
//! without the token would serve an unchecked request from the cache. Viewers given the same token (one per
//! stream and expiry) still share every cached answer.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Signs and checks playback tokens.
#[derive(Clone)]
pub struct UrlSigner {
    key: Vec<u8>,
}

impl std::fmt::Debug for UrlSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UrlSigner(<key>)")
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("missing exp/sig token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("token expired")]
    Expired,
    #[error("bad signature")]
    BadSignature,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex only: `u8::from_str_radix` would also take `+f` for `0f`, another spelling of the same token.
fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl UrlSigner {
    /// At least 16 bytes of key.
    pub fn new(key: &[u8]) -> Option<Self> {
        (key.len() >= 16).then(|| Self { key: key.to_vec() })
    }

    fn mac(&self, stream: &str, exp: u64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(format!("/live/{stream}/|{exp}").as_bytes());
        mac
    }

    /// The query string (`exp=…&sig=…`) that opens `stream` until `exp`.
    pub fn sign(&self, stream: &str, exp: u64) -> String {
        let sig = hex(&self.mac(stream, exp).finalize().into_bytes());
        format!("exp={exp}&sig={sig}")
    }

    /// Checks the token in `query` for `stream` at time `now` (Unix seconds); returns the token to propagate.
    pub fn verify(
        &self,
        stream: &str,
        query: Option<&str>,
        now: u64,
    ) -> Result<String, TokenError> {
        let (mut exp, mut sig) = (None, None);
        // a name given twice (or in another case) is refused: a cache in front keys on one of them (nginx's
        // `$arg_exp` takes the first, case-insensitively), and the token checked must be the one keyed
        for pair in query.unwrap_or("").split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match k {
                "exp" => &mut exp,
                "sig" => &mut sig,
                _ if k.eq_ignore_ascii_case("exp") || k.eq_ignore_ascii_case("sig") => {
                    return Err(TokenError::Malformed)
                }
                _ => continue,
            };
            if slot.replace(v).is_some() {
                return Err(TokenError::Malformed);
            }
        }
        let (Some(exp_s), Some(sig_s)) = (exp, sig) else {
            return Err(TokenError::Missing);
        };
        let exp: u64 = exp_s.parse().map_err(|_| TokenError::Malformed)?;
        // one spelling per token, the signer's (decimal without leading zeros or sign, lowercase hex): another
        // spelling of a valid token would be another cache key everywhere, at the edge and in the origin's
        // prepared playlists, for whoever holds one token to miss every cache with
        if exp.to_string() != exp_s || sig_s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(TokenError::Malformed);
        }
        let sig = unhex(sig_s).ok_or(TokenError::Malformed)?;
        self.mac(stream, exp)
            .verify_slice(&sig)
            .map_err(|_| TokenError::BadSignature)?;
        if exp < now {
            return Err(TokenError::Expired);
        }
        Ok(format!("exp={exp}&sig={sig_s}"))
    }
}

/// Appends `token` to every URI of a playlist (URI lines and `URI="…"` attributes).
pub fn propagate_m3u8(text: &str, token: &str) -> String {
    let mut out = String::with_capacity(text.len() + 64 * token.len() / 8);
    for line in text.lines() {
        if !line.starts_with('#') && !line.is_empty() {
            out.push_str(line);
            out.push(if line.contains('?') { '&' } else { '?' });
            out.push_str(token);
        } else if let Some(i) = line.find("URI=\"") {
            let start = i + 5;
            let end = start + line[start..].find('"').unwrap_or(line.len() - start);
            out.push_str(&line[..end]);
            out.push(if line[start..end].contains('?') {
                '&'
            } else {
                '?'
            });
            out.push_str(token);
            out.push_str(&line[end..]);
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// Appends `token` to the MPD's segment template URLs.
pub fn propagate_mpd(text: &str, token: &str) -> String {
    let amp = token.replace('&', "&amp;");
    text.replace(".m4s\"", &format!(".m4s?{amp}\""))
        .replace("init.mp4\"", &format!("init.mp4?{amp}\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_and_expire() {
        let s = UrlSigner::new(b"0123456789abcdef-secret").unwrap();
        let q = s.sign("cam1", 2_000);
        assert_eq!(s.verify("cam1", Some(&q), 1_000), Ok(q.clone()));
        assert_eq!(
            s.verify("cam1", Some(&format!("_HLS_msn=3&{q}")), 1_000),
            Ok(q.clone())
        );
        assert_eq!(s.verify("cam1", Some(&q), 2_001), Err(TokenError::Expired));
        assert_eq!(
            s.verify("cam2", Some(&q), 1_000),
            Err(TokenError::BadSignature)
        );
        let forged = q.replace("exp=2000", "exp=9999");
        assert_eq!(
            s.verify("cam1", Some(&forged), 1_000),
            Err(TokenError::BadSignature)
        );
        assert_eq!(s.verify("cam1", None, 1_000), Err(TokenError::Missing));
        assert_eq!(
            s.verify("cam1", Some("exp=x&sig=zz"), 1_000),
            Err(TokenError::Malformed)
        );
        // another spelling of a valid token (leading zero, sign, uppercase hex): refused, one token is one key
        let sig = q.split("sig=").nth(1).unwrap();
        for respelt in [
            q.replace("exp=2000", "exp=02000"),
            q.replace("exp=2000", "exp=+2000"),
            q.replace(sig, &sig.to_ascii_uppercase()),
        ] {
            assert_eq!(
                s.verify("cam1", Some(&respelt), 1_000),
                Err(TokenError::Malformed),
                "{respelt}"
            );
        }
        // a sign inside the hex (`+f` decodes as 0x0f where the signer wrote `0f`): refused the same way
        assert_eq!(unhex("0f10"), Some(vec![15, 16]));
        for respelt in ["+f10", "0f+1", "-f10", " f10"] {
            assert_eq!(unhex(respelt), None, "{respelt}");
        }
        // a token given twice, or in another case: refused (a cache keys on one of them)
        for twice in [
            format!("{q}&{q}"),
            format!("{q}&EXP=1"),
            format!("{q}&sig=00"),
        ] {
            assert_eq!(
                s.verify("cam1", Some(&twice), 1_000),
                Err(TokenError::Malformed),
                "{twice}"
            );
        }
        assert!(UrlSigner::new(b"short").is_none());
    }

    #[test]
    fn tokens_reach_every_uri() {
        let pl = "#EXTM3U\n#EXT-X-MAP:URI=\"init.mp4\"\n#EXT-X-PART:DURATION=0.33333,URI=\"part-1-0.m4s\",INDEPENDENT=YES\n#EXTINF:2.00000,\nseg-1.m4s\n#EXT-X-RENDITION-REPORT:URI=\"../lo/index.m3u8\",LAST-MSN=1,LAST-PART=0\n";
        let out = propagate_m3u8(pl, "exp=1&sig=ab");
        assert!(out.contains("URI=\"init.mp4?exp=1&sig=ab\""));
        assert!(out.contains("URI=\"part-1-0.m4s?exp=1&sig=ab\",INDEPENDENT=YES"));
        assert!(out.contains("\nseg-1.m4s?exp=1&sig=ab\n"));
        assert!(out.contains("URI=\"../lo/index.m3u8?exp=1&sig=ab\",LAST-MSN=1"));
        let mpd = r#"initialization="hi/init.mp4" media="hi/seg-$Number$.m4s""#;
        assert_eq!(
            propagate_mpd(mpd, "exp=1&sig=ab"),
            r#"initialization="hi/init.mp4?exp=1&amp;sig=ab" media="hi/seg-$Number$.m4s?exp=1&amp;sig=ab""#
        );
    }
}
