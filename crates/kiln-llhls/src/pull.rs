//! Pulling an HLS stream as a source: which playlist and which segments to fetch next.
//!
//! kilnd fetches every URL itself (through its address-checked client) and feeds the bytes to the pipeline, so
//! this module only decides: from a multivariant playlist, the variant to follow (the highest `BANDWIDTH`); from a
//! media playlist, the segments not fetched yet, each with the `EXT-X-MAP` it needs. A live playlist is joined
//! [`LIVE_START_SEGMENTS`] segments from its end; one with `EXT-X-ENDLIST` is read from the start. Encrypted
//! (`EXT-X-KEY` other than `NONE`) and byte-range playlists are refused with a reason.

use m3u8_rs::Playlist;

/// How many segments from the live edge a pull starts.
pub const LIVE_START_SEGMENTS: usize = 3;

/// One segment to fetch: its media sequence number, its URI (as written: relative to the playlist), and the
/// URI of its initialization section, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullItem {
    pub msn: u64,
    pub uri: String,
    pub init: Option<String>,
}

/// A playlist, read for pulling.
#[derive(Debug, Clone, PartialEq)]
pub enum PullPlaylist {
    /// A multivariant playlist: follow this variant's URI.
    Variant(String),
    /// A media playlist.
    Media {
        items: Vec<PullItem>,
        ended: bool,
        target_duration_s: u64,
    },
}

/// Reads a playlist's bytes.
pub fn read(bytes: &[u8]) -> Result<PullPlaylist, String> {
    match m3u8_rs::parse_playlist_res(bytes).map_err(|_| "not an HLS playlist".to_string())? {
        Playlist::MasterPlaylist(m) => m
            .variants
            .iter()
            .filter(|v| !v.is_i_frame && !v.uri.is_empty())
            .max_by_key(|v| v.bandwidth)
            .map(|v| PullPlaylist::Variant(v.uri.clone()))
            .ok_or_else(|| "the multivariant playlist has no variant".to_string()),
        Playlist::MediaPlaylist(p) => {
            let mut init: Option<String> = None;
            let mut items = Vec::with_capacity(p.segments.len());
            for (i, s) in p.segments.iter().enumerate() {
                if let Some(key) = &s.key {
                    if key.method != m3u8_rs::KeyMethod::None {
                        return Err("the playlist is encrypted (EXT-X-KEY): not supported".into());
                    }
                }
                if s.byte_range.is_some() {
                    return Err("byte-range segments (EXT-X-BYTERANGE) are not supported".into());
                }
                if let Some(map) = &s.map {
                    if map.byte_range.is_some() {
                        return Err("a byte-range EXT-X-MAP is not supported".into());
                    }
                    init = Some(map.uri.clone());
                }
                items.push(PullItem {
                    msn: p.media_sequence + i as u64,
                    uri: s.uri.clone(),
                    init: init.clone(),
                });
            }
            Ok(PullPlaylist::Media {
                items,
                ended: p.end_list,
                target_duration_s: p.target_duration.max(1),
            })
        }
    }
}

/// The segments to fetch after `last` (the last MSN fetched; `None` before the first).
pub fn next(items: &[PullItem], ended: bool, last: Option<u64>) -> Vec<PullItem> {
    match last {
        None if ended => items.to_vec(),
        None => items[items.len().saturating_sub(LIVE_START_SEGMENTS)..].to_vec(),
        Some(l) => items.iter().filter(|i| i.msn > l).cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: &str =
        "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:10\n\
#EXT-X-MAP:URI=\"init.mp4\"\n#EXTINF:2.0,\ns10.m4s\n#EXTINF:2.0,\ns11.m4s\n#EXTINF:2.0,\ns12.m4s\n\
#EXTINF:2.0,\ns13.m4s\n";

    fn media(text: &str) -> (Vec<PullItem>, bool, u64) {
        match read(text.as_bytes()).unwrap() {
            PullPlaylist::Media {
                items,
                ended,
                target_duration_s,
            } => (items, ended, target_duration_s),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn a_live_playlist_is_joined_near_its_edge_and_followed() {
        let (items, ended, td) = media(LIVE);
        assert!(!ended);
        assert_eq!(td, 2);
        assert_eq!(items[0].msn, 10);
        assert!(items.iter().all(|i| i.init.as_deref() == Some("init.mp4")));
        let first: Vec<u64> = next(&items, ended, None).iter().map(|i| i.msn).collect();
        assert_eq!(first, [11, 12, 13]);
        assert_eq!(next(&items, ended, Some(13)), []);
        let later = media(&LIVE.replace("SEQUENCE:10", "SEQUENCE:12")).0;
        let got: Vec<u64> = next(&later, false, Some(13))
            .iter()
            .map(|i| i.msn)
            .collect();
        assert_eq!(got, [14, 15]);
        // fell behind the window: what is still listed
        let got: Vec<u64> = next(&later, false, Some(3)).iter().map(|i| i.msn).collect();
        assert_eq!(got, [12, 13, 14, 15]);
    }

    #[test]
    fn an_ended_playlist_is_read_from_the_start() {
        let (items, ended, _) = media(&format!("{LIVE}#EXT-X-ENDLIST\n"));
        assert!(ended);
        assert_eq!(next(&items, ended, None).len(), 4);
    }

    #[test]
    fn the_highest_variant_is_followed_and_what_cannot_be_pulled_is_refused() {
        let master = "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=800000\nlo/index.m3u8\n\
#EXT-X-STREAM-INF:BANDWIDTH=3000000\nhi/index.m3u8\n#EXT-X-I-FRAME-STREAM-INF:BANDWIDTH=9000000,URI=\"if.m3u8\"\n";
        assert_eq!(
            read(master.as_bytes()),
            Ok(PullPlaylist::Variant("hi/index.m3u8".into()))
        );
        let enc = LIVE.replace(
            "#EXTINF:2.0,\ns12",
            "#EXT-X-KEY:METHOD=AES-128,URI=\"k\"\n#EXTINF:2.0,\ns12",
        );
        assert!(read(enc.as_bytes()).unwrap_err().contains("encrypted"));
        let ranged = LIVE.replace(
            "#EXTINF:2.0,\ns11",
            "#EXTINF:2.0,\n#EXT-X-BYTERANGE:100@0\ns11",
        );
        assert!(read(ranged.as_bytes()).unwrap_err().contains("byte-range"));
        assert!(read(b"<MPD/>").is_err());
    }
}
