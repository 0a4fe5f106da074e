//! Blocking playlist reload (`_HLS_msn`, `_HLS_part`): ready, wait, or refuse — draft-pantos-hls-rfc8216bis §6.2.5.2.
//!
//! Decisions, in order:
//! - the playlist has ENDLIST → answer at once, parameters ignored;
//! - `_HLS_part` without `_HLS_msn` → 400 (MUST);
//! - `_HLS_msn` more than 2 beyond the last MSN → 400 (SHOULD);
//! - `_HLS_part` more than the Advance Part Limit beyond the last part → 400 (SHOULD);
//! - a part index past the last part of a closed segment M means part 0 of M+1;
//! - an MSN older than what is retained → the full current playlist at once;
//! - otherwise ready once the playlist holds that part (or a later one), else wait.
//!
//! `_HLS_msn=M` alone is treated as `_HLS_msn=M&_HLS_part=0`: it is answered once the first part of segment M is
//! published, not only when M is complete. The spec's literal text waits for the whole segment, but native Safari
//! asks for a new segment's first part this way and, answered late or with a stale playlist, spins (OME PR #2207);
//! OvenMediaEngine and MistServer answer at part 0 too. The answer still always contains segment M's first part, so
//! no client sees an unchanged playlist.

use crate::packager::{PartPos, Snapshot};

/// The blocking parameters of a playlist request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockRequest {
    pub msn: Option<u64>,
    pub part: Option<u64>,
}

/// What to do with a playlist request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Answer now with the current playlist.
    Ready,
    /// Park until the next publish, then decide again.
    Wait,
    /// Answer 400 with this reason.
    Reject(&'static str),
}

impl BlockRequest {
    pub fn is_blocking(&self) -> bool {
        self.msn.is_some() || self.part.is_some()
    }
}

/// The Advance Part Limit: how many parts beyond the last one a request may ask for (§6.2.5.2).
pub fn advance_part_limit(part_target_ms: u32) -> u64 {
    if part_target_ms < 1000 {
        u64::from(3000_u32.div_ceil(part_target_ms.max(1)))
    } else {
        3
    }
}

impl Snapshot {
    /// Decides a playlist request against this published view.
    pub fn decide(&self, req: BlockRequest) -> Decision {
        if self.ended {
            return Decision::Ready;
        }
        let msn = match (req.msn, req.part) {
            (None, None) => return Decision::Ready,
            (None, Some(_)) => return Decision::Reject("_HLS_part requires _HLS_msn"),
            (Some(m), _) => m,
        };
        let part = req.part.unwrap_or(0);
        // Before the first part, the stream's first MSN stands in for the last one.
        let last = self.last.unwrap_or(PartPos::new(self.media_sequence, 0));
        let last_msn = last.msn;
        if msn > last_msn.saturating_add(2) {
            return Decision::Reject("_HLS_msn is more than two segments ahead of the playlist");
        }
        let apl = advance_part_limit(self.part_target_ms);
        // how many parts ahead of the last one the request is, at least: into a later segment, its own parts up to
        // `part`, plus every segment in between at the fewest parts a retained closed segment had (the open
        // segment's remaining parts are not known, so they count for none)
        let ahead = if msn == last.msn {
            part.saturating_sub(last.part)
        } else if msn > last.msn {
            let per_segment = self
                .closed
                .iter()
                .map(|&(_, n)| n)
                .min()
                .unwrap_or(1)
                .max(1);
            part.saturating_add(1)
                .saturating_add((msn - last.msn - 1).saturating_mul(per_segment))
        } else {
            0
        };
        if req.part.is_some() && ahead > apl {
            return Decision::Reject("_HLS_part is beyond the advance part limit");
        }
        if self.last.is_none() {
            return Decision::Wait;
        }
        if msn < self.first_retained_msn {
            return Decision::Ready;
        }
        // A part index past the end of a closed segment M is part 0 of M+1.
        let mut target = PartPos::new(msn, part);
        while let Some(&(_, n)) = self.closed.iter().find(|(m, _)| *m == target.msn) {
            if target.part < n {
                break;
            }
            target = PartPos::new(target.msn + 1, 0);
        }
        if target <= last {
            Decision::Ready
        } else {
            Decision::Wait
        }
    }

    /// Whether a GET for part `pos` that is not (yet) published should be held: it is the hinted part, or it lies
    /// between the last published part and the hint.
    pub fn part_may_appear(&self, pos: PartPos) -> bool {
        match (self.last, self.hint) {
            (_, None) => false,
            (Some(last), Some(h)) => pos > last && pos <= h,
            (None, Some(h)) => pos <= h,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packager::{Packager, PackagerConfig, PartIn};
    use bytes::Bytes;

    fn snap(segments: u64, extra_parts: u64) -> Snapshot {
        let mut p = Packager::new(PackagerConfig {
            segment_ns: 2_000_000_000,
            target_duration_s: 2,
            part_target_ms: 334,
            window_segments: 4,
            retain_segments: 2,
            wallclock_origin_unix_ms: 0,
            can_skip_until_s: None,
            first_msn: 0,
        });
        let mut push = |s: u64, i: u64| {
            p.push_part(PartIn {
                starts_segment: i == 0,
                independent: i == 0,
                start_ns: s * 2_000_000_000 + i * 333_333_333,
                duration_ns: 333_333_333,
                bytes: Bytes::from_static(b"x"),
                discontinuity: false,
            })
            .unwrap();
        };
        for s in 0..segments {
            for i in 0..6 {
                push(s, i);
            }
        }
        for i in 0..extra_parts {
            push(segments, i);
        }
        p.snapshot()
    }

    fn req(msn: Option<u64>, part: Option<u64>) -> BlockRequest {
        BlockRequest { msn, part }
    }

    #[test]
    fn spec_rules() {
        // closed 0..=9, open segment 10 with parts 0..=2
        let s = snap(10, 3);
        assert_eq!(s.last, Some(PartPos::new(10, 2)));
        assert_eq!(s.decide(req(None, None)), Decision::Ready);
        assert!(matches!(s.decide(req(None, Some(0))), Decision::Reject(_)));
        assert_eq!(s.decide(req(Some(10), Some(2))), Decision::Ready);
        assert_eq!(s.decide(req(Some(10), Some(3))), Decision::Wait);
        assert_eq!(s.decide(req(Some(11), None)), Decision::Wait);
        assert_eq!(s.decide(req(Some(12), Some(0))), Decision::Wait);
        assert!(matches!(s.decide(req(Some(13), None)), Decision::Reject(_)));
        // APL for 0.334 s = ceil(3 / 0.334) = 9 parts
        assert_eq!(advance_part_limit(334), 9);
        assert_eq!(s.decide(req(Some(10), Some(11))), Decision::Wait);
        assert!(matches!(
            s.decide(req(Some(10), Some(12))),
            Decision::Reject(_)
        ));
        // into a later segment: its parts up to the one asked plus a whole segment (6 parts here) for each one in
        // between, so (12, 2) is 9 ahead and waits, (12, 3) is 10 and is refused at once
        assert_eq!(s.decide(req(Some(12), Some(2))), Decision::Wait);
        assert!(matches!(
            s.decide(req(Some(12), Some(3))),
            Decision::Reject(_)
        ));
        assert!(matches!(
            s.decide(req(Some(11), Some(9))),
            Decision::Reject(_)
        ));
        // absurd numbers are refused, not overflowed
        assert!(matches!(
            s.decide(req(Some(11), Some(u64::MAX))),
            Decision::Reject(_)
        ));
        assert!(matches!(
            s.decide(req(Some(u64::MAX), Some(u64::MAX))),
            Decision::Reject(_)
        ));
        // old MSN → full playlist now
        assert_eq!(s.decide(req(Some(0), Some(0))), Decision::Ready);
        assert_eq!(s.decide(req(Some(2), None)), Decision::Ready);
        // part past the end of closed segment 9 = part 0 of 10, which exists
        assert_eq!(s.decide(req(Some(9), Some(6))), Decision::Ready);
        assert_eq!(s.decide(req(Some(9), Some(5))), Decision::Ready);
    }

    #[test]
    fn part_past_the_end_waits_for_the_next_segment() {
        // segment 4 just closed (6 parts), nothing of 5 yet is impossible in our packager (closing happens with
        // part 0 of the next), so take the open segment's end: 5 has 6 parts and is still open
        let s = snap(5, 6);
        assert_eq!(s.decide(req(Some(5), Some(6))), Decision::Wait);
        assert_eq!(s.decide(req(Some(6), Some(0))), Decision::Wait);
        assert_eq!(s.decide(req(Some(4), Some(6))), Decision::Ready);
    }

    #[test]
    fn ended_playlists_ignore_parameters() {
        let mut s = snap(3, 0);
        s.ended = true;
        assert_eq!(s.decide(req(None, Some(0))), Decision::Ready);
        assert_eq!(s.decide(req(Some(99), Some(99))), Decision::Ready);
    }

    #[test]
    fn hinted_parts_may_appear_others_not() {
        let s = snap(2, 2); // last (2,1), hint (2,2)
        assert!(s.part_may_appear(PartPos::new(2, 2)));
        assert!(!s.part_may_appear(PartPos::new(2, 3)));
        assert!(!s.part_may_appear(PartPos::new(2, 1)));
        assert!(!s.part_may_appear(PartPos::new(9, 0)));
    }

    proptest::proptest! {
        /// Whatever the request, a Ready answer's playlist holds the requested part or a later one, and Wait is
        /// only given for positions after the last published part.
        #[test]
        fn ready_means_present(segs in 1u64..12, extra in 0u64..6, msn in 0u64..16, part in proptest::option::of(0u64..12)) {
            let s = snap(segs, extra);
            let last = s.last.unwrap();
            match s.decide(req(Some(msn), part)) {
                Decision::Wait => proptest::prop_assert!(PartPos::new(msn, part.unwrap_or(0)) > last),
                Decision::Ready => proptest::prop_assert!(msn <= last.msn + 1),
                Decision::Reject(_) => proptest::prop_assert!(msn > last.msn + 2 || part.is_some()),
            }
        }
    }
}
