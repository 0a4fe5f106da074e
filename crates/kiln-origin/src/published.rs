//! A rendition's published state and the playlist bytes each kind of request gets from it, each made at most
//! once per publish: the full playlist and the two delta updates as the packager rendered them, their gzipped
//! forms, and, with signed URLs, the same with a viewer's token in every URI (viewers given the same token share
//! them). Answering a playlist request is then a lookup and a clone of `Bytes`. The multivariant playlist is
//! [`Prepared`] the same way, once per change of its stream ([`crate::StreamOrigin::master_prepared`]).

use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use kiln_llhls::packager::Skip;
use kiln_llhls::Snapshot;
use parking_lot::Mutex;

use crate::encoding;

/// How many tokens' playlists one publish keeps (a token covers a stream until it expires, so the viewers of a
/// stream hold a few at a time); past that, the oldest is dropped and made again if asked for.
const SIGNED_KEPT: usize = 8;

/// One published state of a rendition, as blocking requests see it (it derefs to the packager's [`Snapshot`]).
#[derive(Debug)]
pub struct Published {
    snap: Snapshot,
    /// The full playlist, the delta and the v2 delta (the full one where no delta is offered).
    variants: [Prepared; 3],
}

impl Deref for Published {
    type Target = Snapshot;

    fn deref(&self) -> &Snapshot {
        &self.snap
    }
}

impl From<Snapshot> for Published {
    fn from(snap: Snapshot) -> Self {
        let full = &snap.playlist;
        let variants = [
            Prepared::new(full.clone()),
            Prepared::new(snap.delta.as_ref().unwrap_or(full).clone()),
            Prepared::new(snap.delta_v2.as_ref().unwrap_or(full).clone()),
        ];
        Published { snap, variants }
    }
}

impl Published {
    /// The playlist for `skip` (the full one when no delta is offered: `_HLS_skip` is ignored without
    /// CAN-SKIP-UNTIL or once ENDLIST is present), with `token` in its URIs when given, gzipped when `gzip` and it
    /// is large enough for the compression layer to compress it ([`encoding::MIN_COMPRESSED`]).
    pub fn playlist(&self, skip: Skip, token: Option<&str>, gzip: bool) -> Playlist {
        let variant = match skip {
            Skip::No => 0,
            Skip::Yes => 1,
            Skip::V2 => 2,
        };
        self.variants[variant].get(token, gzip)
    }
}

/// A playlist to send: its bytes, and whether they are gzipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Playlist {
    pub body: Bytes,
    pub gzipped: bool,
}

/// One playlist's bytes in every form a request can ask for, each made at most once: as rendered, gzipped, and
/// with a viewer's token in its URIs (and that gzipped).
#[derive(Debug)]
pub struct Prepared {
    plain: Bytes,
    gzipped: OnceLock<Bytes>,
    /// The signed forms, newest last.
    signed: Mutex<Vec<Arc<Signed>>>,
    /// Puts a token in the document's URIs (a playlist's or an MPD's).
    sign: fn(&str, &str) -> String,
}

#[derive(Debug)]
struct Signed {
    token: Box<str>,
    plain: Bytes,
    gzipped: OnceLock<Bytes>,
}

impl Prepared {
    /// A playlist.
    pub fn new(plain: Bytes) -> Self {
        Self::with_signing(plain, crate::signing::propagate_m3u8)
    }

    /// An MPD (its tokens go where an MPD's URLs are).
    pub fn mpd(plain: Bytes) -> Self {
        Self::with_signing(plain, crate::signing::propagate_mpd)
    }

    fn with_signing(plain: Bytes, sign: fn(&str, &str) -> String) -> Self {
        Prepared {
            plain,
            gzipped: OnceLock::new(),
            signed: Mutex::new(Vec::new()),
            sign,
        }
    }

    /// The playlist with `token` in its URIs when given, gzipped when `gzip` and it is large enough for the
    /// compression layer to compress it ([`encoding::MIN_COMPRESSED`]).
    pub fn get(&self, token: Option<&str>, gzip: bool) -> Playlist {
        let signed;
        let (plain, cell) = match token {
            None => (&self.plain, &self.gzipped),
            Some(t) => {
                signed = self.signed(t);
                (&signed.plain, &signed.gzipped)
            }
        };
        if gzip && plain.len() >= encoding::MIN_COMPRESSED {
            Playlist {
                body: cell.get_or_init(|| encoding::gzip(plain)).clone(),
                gzipped: true,
            }
        } else {
            Playlist {
                body: plain.clone(),
                gzipped: false,
            }
        }
    }

    /// The playlist with `token` in its URIs: kept from an earlier request, or made now.
    fn signed(&self, token: &str) -> Arc<Signed> {
        let find = |kept: &[Arc<Signed>]| kept.iter().find(|s| &*s.token == token).cloned();
        if let Some(s) = find(&self.signed.lock()) {
            return s;
        }
        // made without the lock: other tokens' requests do not wait for it
        let text = String::from_utf8_lossy(&self.plain);
        let made = Arc::new(Signed {
            token: token.into(),
            plain: Bytes::from((self.sign)(&text, token)),
            gzipped: OnceLock::new(),
        });
        let mut kept = self.signed.lock();
        if let Some(s) = find(&kept) {
            return s;
        }
        if kept.len() == SIGNED_KEPT {
            kept.remove(0);
        }
        kept.push(made.clone());
        made
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_llhls::{Packager, PackagerConfig, PartIn};

    fn config() -> PackagerConfig {
        PackagerConfig {
            segment_ns: 2_000_000_000,
            target_duration_s: 2,
            part_target_ms: 334,
            window_segments: 10,
            retain_segments: 2,
            wallclock_origin_unix_ms: 1_795_880_805_000,
            can_skip_until_s: Some(12),
            first_msn: 0,
        }
    }

    /// Ten 2 s segments of six parts: a playlist with delta updates (CAN-SKIP-UNTIL=12).
    fn published() -> Published {
        let mut p = Packager::new(config());
        p.set_init(Bytes::from_static(b"init"));
        for i in 0..60u64 {
            p.push_part(PartIn {
                starts_segment: i % 6 == 0,
                independent: i % 6 == 0,
                start_ns: i * 333_333_333,
                duration_ns: 333_333_333,
                bytes: Bytes::from_static(b"part"),
                discontinuity: false,
            })
            .unwrap();
        }
        Published::from(p.snapshot())
    }

    fn gunzip(b: &[u8]) -> Bytes {
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(b)
            .read_to_end(&mut out)
            .unwrap();
        Bytes::from(out)
    }

    #[test]
    fn each_variant_is_gzipped_once_and_shared() {
        let p = published();
        for (skip, rendered) in [
            (Skip::No, &p.playlist),
            (Skip::Yes, p.delta.as_ref().unwrap()),
            (Skip::V2, p.delta_v2.as_ref().unwrap()),
        ] {
            let plain = p.playlist(skip, None, false);
            assert_eq!((&plain.body, plain.gzipped), (rendered, false));
            let a = p.playlist(skip, None, true);
            let b = p.playlist(skip, None, true);
            assert!(a.gzipped);
            assert_eq!(gunzip(&a.body), rendered);
            assert_eq!(a.body.as_ptr(), b.body.as_ptr(), "made once");
        }
    }

    #[test]
    fn signed_variants_are_kept_per_token_and_bounded() {
        let p = published();
        let a = p.playlist(Skip::No, Some("exp=1&sig=ab"), true);
        let b = p.playlist(Skip::No, Some("exp=1&sig=ab"), true);
        assert_eq!(a.body.as_ptr(), b.body.as_ptr(), "made once per token");
        let text = gunzip(&a.body);
        let text = std::str::from_utf8(&text).unwrap();
        assert!(text.contains(".m4s?exp=1&sig=ab"), "{text}");
        let plain = p.playlist(Skip::No, Some("exp=1&sig=ab"), false);
        assert_eq!(gunzip(&a.body), plain.body);
        for t in 0..2 * SIGNED_KEPT {
            p.playlist(Skip::Yes, Some(&format!("exp={t}&sig=cd")), false);
        }
        assert_eq!(p.variants[1].signed.lock().len(), SIGNED_KEPT);
        let again = p.playlist(Skip::No, Some("exp=1&sig=ab"), true);
        assert_eq!(again.body, a.body, "made again, the same bytes");
    }

    #[test]
    fn a_small_playlist_is_left_to_the_layer() {
        let p = Published::from(Packager::new(config()).snapshot());
        assert!(p.playlist.len() < encoding::MIN_COMPRESSED);
        assert!(!p.playlist(Skip::No, None, true).gzipped);
    }
}
