//! Playback GETs answered without the router: kilnd's hot path (ARCHITECTURE.md, "Plain playback GETs skip the
//! router").
//!
//! A request for a live resource in its plain form (GET, a path without percent-encoding, one of the three shapes
//! below) is recognised from its URI alone and answered by the same functions as the routes, with none of the
//! per-request work of a router (route matching, extractors allocating the path's segments, boxed service clones
//! per layer). Everything else (HEAD, OPTIONS, odd paths) goes to the router, which answers it the same way.

use axum::http::{HeaderMap, Method, Uri};
use kiln_http::lend::Lend;

use super::{master_answer, media_answer, mpd_answer, Conditions, LiveAnswer};
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

/// Where a plain playback path's parts end, in bytes after `/live/`: the path is read once, when the request is
/// taken off the router, and answered from these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `{stream}/master.m3u8`: the stream's end.
    Master(usize),
    /// `{stream}/manifest.mpd`
    Mpd(usize),
    /// `{stream}/{rendition}/{file}`: the stream's and the rendition's ends.
    Media(usize, usize),
}

const LIVE: &str = "/live/";

impl Shape {
    /// The shape of a plain playback path; `None` for anything the router should see (percent-encoding, empty
    /// or extra segments, other prefixes). One pass over the bytes: where the one or two slashes are, and no
    /// percent-encoding.
    fn of(path: &str) -> Option<Shape> {
        let rest = path.strip_prefix(LIVE)?;
        let mut slashes = [0usize; 2];
        let mut found = 0;
        for (i, b) in rest.bytes().enumerate() {
            match b {
                b'%' => return None,
                b'/' if found == slashes.len() => return None,
                b'/' => {
                    slashes[found] = i;
                    found += 1;
                }
                _ => {}
            }
        }
        let [first, second] = slashes;
        if first == 0 {
            return None; // an empty stream
        }
        match found {
            1 => match &rest[first + 1..] {
                "master.m3u8" => Some(Shape::Master(first)),
                "manifest.mpd" => Some(Shape::Mpd(first)),
                _ => None,
            },
            // a rendition and a file, neither empty
            2 if second > first + 1 && second + 1 < rest.len() => Some(Shape::Media(first, second)),
            _ => None,
        }
    }

    /// What `path` (the one this shape was read from) names.
    fn target(self, path: &str) -> Target<'_> {
        let rest = &path[LIVE.len()..];
        match self {
            Shape::Master(end) => Target::Master(&rest[..end]),
            Shape::Mpd(end) => Target::Mpd(&rest[..end]),
            Shape::Media(first, second) => Target::Media(
                &rest[..first],
                &rest[first + 1..second],
                &rest[second + 1..],
            ),
        }
    }
}

/// The target of a plain playback path; `None` for anything the router should see.
#[cfg(test)]
fn target(path: &str) -> Option<Target<'_>> {
    Shape::of(path).map(|shape| shape.target(path))
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
    /// What the path names.
    shape: Shape,
    conditions: Conditions,
}

impl LiveGet {
    /// `Some` for a GET of a plain playback path; `None` (the router answers) for HEAD and every other method and
    /// for paths that are not plain. The caller gives the answer what the router's layers would (kilnd: the
    /// same compression layer, CORS, metrics).
    pub fn of(method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<Self> {
        if method != Method::GET {
            return None;
        }
        let shape = Shape::of(uri.path())?;
        let target = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
        Some(LiveGet {
            target: target.into(),
            path_len: uri.path().len(),
            shape,
            conditions: Conditions::of(headers),
        })
    }

    /// Whether the answer may be gzipped: the compression layer would choose gzip for the request's
    /// `Accept-Encoding` ([`crate::encoding::wants_gzip`]).
    pub fn gzip(&self) -> bool {
        self.conditions.gzip
    }

    /// The path.
    pub fn path(&self) -> &str {
        &self.target[..self.path_len]
    }

    /// The query, without its `?`.
    pub fn query(&self) -> Option<&str> {
        self.target.get(self.path_len + 1..)
    }

    /// The answer the playback routes give to this request (computed now: only a request that has to wait is
    /// left a future to poll).
    pub fn answer(self, origin: &Origin) -> LiveAnswer {
        self.answer_lending(origin, None)
    }

    /// [`LiveGet::answer`] for a request on kiln's HTTP/1.1, whose socket a blocking playlist reload lends while
    /// it waits (the publish that satisfies it writes its answer: [`super::lent`]).
    pub fn answer_lending(self, origin: &Origin, lend: Option<Lend<'_>>) -> LiveAnswer {
        let LiveGet {
            target: uri,
            path_len,
            shape,
            conditions,
        } = self;
        let (path, query) = (&uri[..path_len], uri.get(path_len + 1..));
        match shape.target(path) {
            Target::Master(stream) => master_answer(origin, stream, query, conditions.gzip),
            Target::Mpd(stream) => mpd_answer(origin, stream, query, conditions.gzip),
            Target::Media(stream, rendition, file) => {
                media_answer(origin, (stream, rendition, file), query, conditions, lend)
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

    /// The split-based reading `target` replaced, kept as the reference.
    fn target_by_split(path: &str) -> Option<Target<'_>> {
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

    #[test]
    fn the_one_pass_path_reading_agrees_with_splitting_on_every_short_path() {
        // every path of up to 8 pieces from an alphabet of separators, encodings and names after the prefix
        let pieces = ["/", "%", "a", "master.m3u8", "manifest.mpd"];
        let mut paths = vec![String::new()];
        let mut checked = 0;
        for _ in 0..8 {
            let mut next = Vec::new();
            for p in &paths {
                for piece in pieces {
                    next.push(format!("{p}{piece}"));
                }
            }
            for p in &next {
                let path = format!("/live/{p}");
                assert_eq!(target(&path), target_by_split(&path), "{path}");
                checked += 1;
            }
            paths = next;
        }
        assert!(checked > 400_000, "{checked}");
    }

    #[test]
    fn only_gets_are_taken_off_the_router() {
        let h = HeaderMap::new();
        let part: Uri = "/live/s/v/part-1-0.m4s".parse().unwrap();
        assert!(LiveGet::of(&Method::GET, &part, &h).is_some());
        for m in [Method::HEAD, Method::OPTIONS, Method::POST, Method::PUT] {
            assert!(LiveGet::of(&m, &part, &h).is_none(), "{m}");
        }
        let odd: Uri = "/live/s/v/".parse().unwrap();
        assert!(LiveGet::of(&Method::GET, &odd, &h).is_none());
    }

    #[test]
    fn the_request_is_copied_out_whole() {
        let mut h = HeaderMap::new();
        h.insert(axum::http::header::RANGE, "bytes=0-9".parse().unwrap());
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
