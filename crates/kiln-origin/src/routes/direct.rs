//! Playback GETs answered without the router: kilnd's hot path (ARCHITECTURE.md, "The origin's hot path").
//!
//! A request for a live resource in its plain form (GET, a path without percent-encoding, one of the three shapes
//! below) is recognised from its URI alone and answered by the same functions as the routes, with none of the
//! per-request work of a router and its layers (route matching, extractors allocating the path's segments,
//! boxed service clones per layer). Everything else (HEAD, OPTIONS, odd paths) goes to the router, which answers
//! it the same way.

use axum::http::{header, HeaderMap, Method, Uri};
use axum::response::Response;

use super::{master_answer, media_answer, mpd_answer, Conditions};
use crate::store::Origin;

/// What a plain playback path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target<'a> {
    /// `/live/{stream}/master.m3u8`
    Master(&'a str),
    /// `/live/{stream}/manifest.mpd`
    Mpd(&'a str),
    /// `/live/{stream}/{rendition}/{file}`
    Media(&'a str, &'a str, &'a str),
}

impl Target<'_> {
    /// Whether the answer is a text document (a playlist or the MPD), which a compression layer may gzip.
    fn is_document(&self) -> bool {
        match self {
            Target::Master(_) | Target::Mpd(_) => true,
            Target::Media(_, _, file) => file.ends_with(".m3u8"),
        }
    }
}

/// The target of a plain playback path; `None` for anything the router should see (percent-encoding, empty or
/// extra segments, other prefixes).
fn target(path: &str) -> Option<Target<'_>> {
    let rest = path.strip_prefix("/live/")?;
    if rest.contains('%') {
        return None;
    }
    let mut segments = rest.split('/');
    let (stream, second) = (segments.next()?, segments.next()?);
    let third = segments.next();
    if segments.next().is_some() || stream.is_empty() || second.is_empty() {
        return None;
    }
    match third {
        None if second == "master.m3u8" => Some(Target::Master(stream)),
        None if second == "manifest.mpd" => Some(Target::Mpd(stream)),
        Some(file) if !file.is_empty() => Some(Target::Media(stream, second, file)),
        _ => None,
    }
}

/// A playback GET taken off the router: its path and query (the answer is computed from slices of them: no
/// per-segment `String`s) and the two request headers a media answer reads. Copied out of the request, so that
/// a parked request holds nothing of it: the request's `Uri` and header values point into the connection's read
/// buffer, which holding them would keep alive, and make the server allocate another for the connection's next
/// read.
#[derive(Debug)]
pub struct LiveGet {
    /// `path?query`
    target: Box<str>,
    /// Where the path ends in `target`.
    path_len: usize,
    conditions: Conditions,
}

impl LiveGet {
    /// `Some` when this request can be answered directly with exactly the router's answer, given that the caller
    /// adds what its layers add for playback (CORS, `Vary`; see kilnd). `None` (the router answers) for HEAD and
    /// every other method, paths that are not plain, and requests whose `Accept-Encoding` could change the answer:
    /// a document the client may take gzipped (the compression layer does that per request), or any `q=0`
    /// (a client refusing the identity encoding gets 406 from that layer).
    pub fn of(method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<Self> {
        if method != Method::GET {
            return None;
        }
        let t = target(uri.path())?;
        if let Some(enc) = headers.get(header::ACCEPT_ENCODING) {
            let enc = enc.to_str().ok()?.to_ascii_lowercase();
            let compressible = t.is_document() && (enc.contains("gzip") || enc.contains('*'));
            if compressible || enc.contains("q=0") {
                return None;
            }
        }
        let target = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
        Some(LiveGet {
            target: target.into(),
            path_len: uri.path().len(),
            conditions: Conditions::of(headers),
        })
    }

    /// The path.
    pub fn path(&self) -> &str {
        &self.target[..self.path_len]
    }

    /// The query, without its `?`.
    pub fn query(&self) -> Option<&str> {
        self.target.get(self.path_len + 1..)
    }

    /// The answer the playback routes give to this request.
    pub async fn answer(self, origin: &Origin) -> Response {
        let query = self.query();
        match target(self.path()).expect("checked by LiveGet::of") {
            Target::Master(stream) => master_answer(origin, stream, query).await,
            Target::Mpd(stream) => mpd_answer(origin, stream, query).await,
            Target::Media(stream, rendition, file) => {
                media_answer(origin, (stream, rendition, file), query, &self.conditions).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_playback_paths_are_taken_off_the_router() {
        assert_eq!(target("/live/s/master.m3u8"), Some(Target::Master("s")));
        assert_eq!(target("/live/s/manifest.mpd"), Some(Target::Mpd("s")));
        assert_eq!(
            target("/live/s/720p/part-5-1.m4s"),
            Some(Target::Media("s", "720p", "part-5-1.m4s"))
        );
        for other in [
            "/live/s/other.m3u8",
            "/live/s",
            "/live/",
            "/live//master.m3u8",
            "/live/s//index.m3u8",
            "/live/s/720p/",
            "/live/s/720p/index.m3u8/x",
            "/live/%73/master.m3u8",
            "/vod/s/master.m3u8",
            "/liveX/s/master.m3u8",
        ] {
            assert_eq!(target(other), None, "{other}");
        }
    }

    #[test]
    fn what_a_layer_could_change_goes_to_the_router() {
        let get = |path: &str, enc: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(e) = enc {
                h.insert(header::ACCEPT_ENCODING, e.parse().unwrap());
            }
            LiveGet::of(&Method::GET, &path.parse().unwrap(), &h).is_some()
        };
        let part = "/live/s/v/part-1-0.m4s";
        let playlist = "/live/s/v/index.m3u8?_HLS_msn=3";
        assert!(get(part, None) && get(playlist, None));
        assert!(
            get(part, Some("gzip, deflate, br")),
            "media is never compressed"
        );
        assert!(!get(playlist, Some("gzip")), "a playlist may be");
        assert!(!get("/live/s/master.m3u8", Some("*")));
        assert!(get(playlist, Some("identity")));
        assert!(!get(part, Some("identity;q=0")), "406 comes from the layer");
        let h = HeaderMap::new();
        assert!(LiveGet::of(&Method::HEAD, &part.parse().unwrap(), &h).is_none());
    }

    #[test]
    fn the_request_is_copied_out_whole() {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, "bytes=0-9".parse().unwrap());
        let of = |uri: &str| LiveGet::of(&Method::GET, &uri.parse().unwrap(), &h).unwrap();
        let g = of("/live/s/v/index.m3u8?_HLS_msn=3&_HLS_part=1");
        assert_eq!(
            (g.path(), g.query()),
            ("/live/s/v/index.m3u8", Some("_HLS_msn=3&_HLS_part=1"))
        );
        assert_eq!(g.conditions.range.as_ref().unwrap(), "bytes=0-9");
        let g = of("/live/s/v/part-1-0.m4s");
        assert_eq!((g.path(), g.query()), ("/live/s/v/part-1-0.m4s", None));
        let g = of("/live/s/master.m3u8?");
        assert_eq!(g.query(), Some(""));
    }
}
