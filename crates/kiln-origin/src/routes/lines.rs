//! The header lines of prepared answers ([`kiln_http::h1::Prepared`]): every playback answer that is a `200` of
//! a published resource is made of these static lines, the resource's `ETag` line (made when it was published,
//! [`crate::store::Rendition::tag`]) and its body, so answering it builds no header map. The same lines become
//! the router's answer ([`kiln_http::h1::Prepared::into_response`]), so the two paths cannot differ.

use std::sync::OnceLock;

use super::{M3U8, PREBUILT_MAX_AGES, SEGMENT_MAX_AGE};

/// What the compression layer adds to what it compresses, on a document gzipped as prepared.
pub(super) const GZIPPED: &[u8] = b"content-encoding: gzip\r\nvary: accept-encoding\r\n";

/// What the compression layer adds to a document it could compress (text of
/// [`crate::encoding::MIN_COMPRESSED`] bytes or more) but was not asked to.
pub(super) const VARY: &[u8] = b"vary: accept-encoding\r\n";

/// The `content-type` line of `content_type`, for the types the playback routes answer with; media types with
/// the `accept-ranges` line every media answer has.
pub(super) fn content_type(content_type: &str) -> Option<&'static [u8]> {
    Some(match content_type {
        M3U8 => b"content-type: application/vnd.apple.mpegurl\r\n",
        "application/dash+xml" => b"content-type: application/dash+xml\r\n",
        "video/mp4" => b"content-type: video/mp4\r\naccept-ranges: bytes\r\n",
        "audio/mp4" => b"content-type: audio/mp4\r\naccept-ranges: bytes\r\n",
        _ => return None,
    })
}

/// The `cache-control` line of [`super::cache_control`]`(max_age)`, for the lifetimes it keeps built (every
/// lifetime the routes give for a TD of up to 10 s); `None` for others.
pub(super) fn cache_control(max_age: u64) -> Option<&'static [u8]> {
    static LINES: OnceLock<Vec<String>> = OnceLock::new();
    if max_age == SEGMENT_MAX_AGE {
        return Some(b"cache-control: public, max-age=86400\r\n");
    }
    let lines = LINES.get_or_init(|| {
        (0..PREBUILT_MAX_AGES)
            .map(|age| {
                let value = super::cache_control(age);
                format!("cache-control: {}\r\n", value.to_str().expect("ascii"))
            })
            .collect()
    });
    lines
        .get(usize::try_from(max_age).ok()?)
        .map(|l| l.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::super::{document_reply, media_reply, media_response, Conditions, Reply};
    use super::*;
    use crate::published::Playlist;
    use axum::http::header;
    use axum::response::Response;
    use bytes::Bytes;

    fn headers(r: &Response) -> Vec<(String, String)> {
        let mut h: Vec<_> = r
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        h.sort();
        h
    }

    #[test]
    fn a_prepared_media_answer_is_the_response_it_replaces() {
        let tag = Bytes::from_static(b"etag: \"1a-part-3-1.m4s\"\r\n");
        let body = Bytes::from(vec![7u8; 5000]);
        for (ct, age) in [
            ("video/mp4", 12),
            ("audio/mp4", 6),
            ("video/mp4", SEGMENT_MAX_AGE),
        ] {
            let none = Conditions::default();
            let Reply::Prepared(p) = media_reply(&none, ct, tag.clone(), age, body.clone()) else {
                panic!("{ct} {age}: not prepared");
            };
            assert_eq!(p.body(), &body);
            let prepared: Response = p.into_response();
            let response = media_response(&none, ct, &tag, age, body.clone());
            assert_eq!(headers(&prepared), headers(&response), "{ct} {age}");
            assert_eq!(prepared.status(), response.status());
            assert_eq!(prepared.headers()[header::ETAG], "\"1a-part-3-1.m4s\"");
        }
        // a conditional request, or a lifetime without a line: the response
        let ranged = Conditions {
            range: Some("bytes=0-9".parse().unwrap()),
            ..Conditions::default()
        };
        assert!(matches!(
            media_reply(&ranged, "video/mp4", tag.clone(), 12, body.clone()),
            Reply::Response(_)
        ));
        assert!(matches!(
            media_reply(&Conditions::default(), "video/mp4", tag, 1000, body),
            Reply::Response(_)
        ));
    }

    #[test]
    fn a_prepared_document_is_the_response_it_replaces() {
        let docs = [
            (Bytes::from(vec![b'#'; 255]), false),
            (Bytes::from(vec![b'#'; 256]), false),
            (Bytes::from(vec![b'#'; 300]), true),
        ];
        for (body, gzipped) in docs {
            let doc = Playlist { body, gzipped };
            for ct in [M3U8, "application/dash+xml"] {
                let Reply::Prepared(p) = document_reply(ct, 12, doc.clone()) else {
                    panic!("not prepared");
                };
                let prepared: Response = p.into_response();
                // 1,000 s has no prepared line: the response is built, with the same headers but the lifetime
                let Reply::Response(built) = document_reply(ct, 1000, doc.clone()) else {
                    panic!("prepared without a line");
                };
                let but_lifetime = |r: &Response| {
                    let mut h = headers(r);
                    h.retain(|(k, _)| k != "cache-control");
                    h
                };
                assert_eq!(
                    but_lifetime(&prepared),
                    but_lifetime(&built),
                    "{ct} {gzipped}"
                );
                assert_eq!(
                    prepared.headers()[header::CACHE_CONTROL],
                    "public, max-age=12"
                );
                let vary = prepared
                    .headers()
                    .get(header::VARY)
                    .map(|v| v.to_str().unwrap());
                let expected = (gzipped || doc.body.len() >= 256).then_some("accept-encoding");
                assert_eq!(
                    vary,
                    expected,
                    "{} bytes, gzipped {gzipped}",
                    doc.body.len()
                );
                assert_eq!(
                    prepared.headers().contains_key(header::CONTENT_ENCODING),
                    gzipped
                );
            }
        }
    }

    #[test]
    fn the_lines_say_what_the_header_values_say() {
        for age in (0..PREBUILT_MAX_AGES).chain([SEGMENT_MAX_AGE]) {
            let line = cache_control(age).unwrap();
            let value = super::super::cache_control(age);
            assert_eq!(
                line,
                format!("cache-control: {}\r\n", value.to_str().unwrap()).as_bytes()
            );
        }
        assert_eq!(cache_control(PREBUILT_MAX_AGES), None);
        assert_eq!(cache_control(u64::MAX), None);
        for t in [M3U8, "application/dash+xml"] {
            let line = format!("content-type: {t}\r\n");
            assert_eq!(content_type(t).unwrap(), line.as_bytes());
        }
        for t in ["video/mp4", "audio/mp4"] {
            let lines = format!("content-type: {t}\r\naccept-ranges: bytes\r\n");
            assert_eq!(content_type(t).unwrap(), lines.as_bytes());
        }
        assert_eq!(content_type("text/plain"), None);
    }
}
