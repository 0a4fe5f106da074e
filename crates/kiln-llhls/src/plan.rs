//! Where parts and segments are cut, decided from one clock.
//!
//! Every rendition of a stream cuts on the same running-time grid: segment `k` starts at the first frame at or after
//! `k × segment` (for video, on the keyframe forced there), and each video part holds the frames that fit in
//! PART-TARGET counted from the segment's first frame, so parts are identical across renditions of the same frame
//! rate. Audio parts hold a fixed number of AAC frames; the last part of a segment is shorter (the spec exempts it
//! from the 85 % rule). cmafmux runs in manual-split mode and the media crate asks these planners, frame by frame,
//! whether to send `FMP4MuxSplitNow` before the frame.

/// Tolerance for comparing frame times to grid points: timestamps are rounded to whole nanoseconds, so a frame
/// meant to sit on a grid point can be a few ns early.
pub const GRID_EPSILON_NS: u64 = 1_000_000;

/// A cut to make before a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Start a new segment (and its part 0) with this frame.
    Segment,
    /// Start a new part of the current segment with this frame.
    Part,
}

/// The segment index of running time `t` on a grid of `segment_ns` (with the epsilon applied).
pub fn segment_index(t_ns: u64, segment_ns: u64) -> u64 {
    (t_ns + GRID_EPSILON_NS) / segment_ns
}

/// Decides when keyframes must be forced: once per segment grid point, for the first frame at or after it.
/// Used once per stream, before the tee, so every encoder gets the same request.
#[derive(Debug, Clone)]
pub struct KeyframeClock {
    segment_ns: u64,
    next_index: Option<u64>,
}

impl KeyframeClock {
    pub fn new(segment_ns: u64) -> Self {
        Self {
            segment_ns,
            next_index: None,
        }
    }

    /// Whether a keyframe must be forced at the frame with running time `t_ns`.
    pub fn on_frame(&mut self, t_ns: u64) -> bool {
        self.on_frame_if(t_ns, true)
    }

    /// Forces the keyframe on the frame at `t_ns` (a switch point): the next grid point is the one after it.
    pub fn force(&mut self, t_ns: u64) {
        self.next_index = Some(segment_index(t_ns, self.segment_ns) + 1);
    }

    /// Like [`Self::on_frame`], where only frames with `allowed` may take the keyframe (a stream with a
    /// passthrough rendition: the frames that were IDRs in the source). A grid point passed on a frame that may
    /// not is kept for the next one that may, so segments follow the source's GOP, however long.
    pub fn on_frame_if(&mut self, t_ns: u64, allowed: bool) -> bool {
        let idx = segment_index(t_ns, self.segment_ns);
        let due = self.next_index.is_none_or(|n| idx >= n);
        if due && allowed {
            self.next_index = Some(idx + 1);
        }
        due && allowed
    }
}

/// Whether a source IDR at `t_ns` opens a segment that began at `last_cut_ns` (a stream whose segments follow
/// its source's GOP): once the segment is at least `segment_ns` long. Every rendition decides on the same IDR
/// times, so they cut the same frames; a GOP that does not divide the target gives segments of whole GOPs (a
/// 1.5 s GOP on a 2 s target: 3 s), never a skipped IDR that doubles one.
pub fn gop_cut(last_cut_ns: Option<u64>, t_ns: u64, segment_ns: u64) -> bool {
    last_cut_ns.is_none_or(|l| t_ns + GRID_EPSILON_NS >= l + segment_ns)
}

/// Which keyframes open a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentRule {
    /// The first keyframe at or after each grid point (the encoders key exactly there).
    Grid,
    /// Every keyframe (an encoder keyed only where a cut was decided upstream).
    EveryKey,
    /// A keyframe once the segment is at least the target long ([`gop_cut`]: a source's IDRs).
    AfterTarget,
}

/// Part/segment cuts for one video rendition.
#[derive(Debug, Clone)]
pub struct VideoSplitter {
    segment_ns: u64,
    part_ns: u64,
    seg_index: Option<u64>,
    seg_start_ns: u64,
    next_part_ns: u64,
}

impl VideoSplitter {
    /// `part_ns`: duration of a full part (whole frames, ≤ PART-TARGET).
    pub fn new(segment_ns: u64, part_ns: u64) -> Self {
        Self {
            segment_ns,
            part_ns: part_ns.max(1),
            seg_index: None,
            seg_start_ns: 0,
            next_part_ns: 0,
        }
    }

    /// Called for each frame, in decode order, before it reaches the muxer.
    pub fn on_frame(&mut self, t_ns: u64, keyframe: bool) -> Option<Split> {
        self.on_frame_by(t_ns, keyframe, SegmentRule::Grid)
    }

    /// [`Self::on_frame`] with segments opened by `rule`.
    pub fn on_frame_by(&mut self, t_ns: u64, keyframe: bool, rule: SegmentRule) -> Option<Split> {
        let idx = segment_index(t_ns, self.segment_ns);
        let opens = |cur: u64, start: u64| match rule {
            SegmentRule::Grid => idx > cur,
            SegmentRule::EveryKey => t_ns > start,
            SegmentRule::AfterTarget => gop_cut(Some(start), t_ns, self.segment_ns),
        };
        match self.seg_index {
            None => {
                // The muxer opens the first fragment by itself; wait for a keyframe so it starts on one.
                if keyframe {
                    self.start_segment(idx, t_ns);
                }
                None
            }
            Some(cur) if keyframe && opens(cur, self.seg_start_ns) => {
                self.start_segment(idx, t_ns);
                Some(Split::Segment)
            }
            Some(_) if t_ns + GRID_EPSILON_NS >= self.next_part_ns => {
                while self.next_part_ns <= t_ns + GRID_EPSILON_NS {
                    self.next_part_ns += self.part_ns;
                }
                Some(Split::Part)
            }
            Some(_) => None,
        }
    }

    /// Starts a segment with the keyframe at `t_ns` whatever the grid says (a switch point, where every video
    /// rendition keyed the same frame). `None` before the first segment (the muxer opens that one).
    pub fn force_segment(&mut self, t_ns: u64) -> Option<Split> {
        let first = self.seg_index.is_none();
        self.start_segment(segment_index(t_ns, self.segment_ns), t_ns);
        (!first).then_some(Split::Segment)
    }

    fn start_segment(&mut self, idx: u64, t_ns: u64) {
        self.seg_index = Some(idx);
        self.seg_start_ns = t_ns;
        self.next_part_ns = t_ns + self.part_ns;
    }
}

/// Part/segment cuts for one audio rendition (every frame is a sync frame).
#[derive(Debug, Clone)]
pub struct AudioSplitter {
    segment_ns: u64,
    frames_per_part: u64,
    seg_index: Option<u64>,
    frames_in_part: u64,
}

impl AudioSplitter {
    pub fn new(segment_ns: u64, frames_per_part: u64) -> Self {
        Self {
            segment_ns,
            frames_per_part: frames_per_part.max(1),
            seg_index: None,
            frames_in_part: 0,
        }
    }

    /// Starts a segment with the AAC frame at `t_ns` (the first at or after a switch point, where every rendition
    /// opens a discontinuity). `None` before the first segment (the muxer opens that one).
    pub fn force_segment(&mut self, t_ns: u64) -> Option<Split> {
        let first = self.seg_index.is_none();
        self.seg_index = Some(segment_index(t_ns, self.segment_ns));
        self.frames_in_part = 1;
        (!first).then_some(Split::Segment)
    }

    /// Called for each AAC frame before it reaches the muxer.
    pub fn on_frame(&mut self, t_ns: u64) -> Option<Split> {
        let idx = segment_index(t_ns, self.segment_ns);
        let split = match self.seg_index {
            None => {
                self.seg_index = Some(idx);
                None
            }
            Some(cur) if idx > cur => {
                self.seg_index = Some(idx);
                self.frames_in_part = 0;
                Some(Split::Segment)
            }
            Some(_) if self.frames_in_part >= self.frames_per_part => {
                self.frames_in_part = 0;
                Some(Split::Part)
            }
            Some(_) => None,
        };
        self.frames_in_part += 1;
        split
    }
}

/// Predicts whether the part that will start at `next_start_ns` opens a new segment, given the current segment
/// started at `segment_start_ns`: the same rule the splitters apply, so a preload hint names the right URI.
pub fn next_part_opens_segment(segment_start_ns: u64, next_start_ns: u64, segment_ns: u64) -> bool {
    segment_index(next_start_ns, segment_ns) > segment_index(segment_start_ns, segment_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 2_000_000_000;

    fn frame_ns(n: u64, fps_num: u64, fps_den: u64, t0: u64) -> u64 {
        t0 + n * 1_000_000_000 * fps_den / fps_num
    }

    /// Runs a splitter over `n` frames and returns the frame counts of each part, grouped by segment.
    fn video_parts(fps: (u64, u64), part_frames: u64, n: u64, t0: u64) -> Vec<Vec<u64>> {
        let part_ns = part_frames * 1_000_000_000 * fps.1 / fps.0;
        let mut clock = KeyframeClock::new(S);
        let mut sp = VideoSplitter::new(S, part_ns);
        let mut segs: Vec<Vec<u64>> = vec![vec![0]];
        for i in 0..n {
            let t = frame_ns(i, fps.0, fps.1, t0);
            let key = clock.on_frame(t);
            match sp.on_frame(t, key) {
                Some(Split::Segment) => segs.push(vec![0]),
                Some(Split::Part) => segs.last_mut().unwrap().push(0),
                None => {}
            }
            *segs.last_mut().unwrap().last_mut().unwrap() += 1;
        }
        segs
    }

    #[test]
    fn thirty_fps_gives_six_ten_frame_parts_per_segment() {
        for t0 in [0, 3_000_000, 999_999_999] {
            let segs = video_parts((30, 1), 10, 300, t0);
            // all full segments (not the first, which may start mid-grid, nor the last) are 6×10 frames
            for s in &segs[1..segs.len() - 1] {
                assert_eq!(s, &vec![10; 6], "t0={t0}");
            }
        }
    }

    #[test]
    fn ntsc_and_pal_rates_keep_parts_under_target() {
        // 29.97: 10-frame parts (333.67 ms ≤ 334), segments of 60 frames (first frame at/after each 2 s point)
        let segs = video_parts((30000, 1001), 10, 600, 0);
        for s in &segs[1..segs.len() - 1] {
            assert!(s.iter().all(|&f| f <= 10));
            assert!(s[..s.len() - 1].iter().all(|&f| f == 10), "{s:?}");
        }
        // 25 fps: 8-frame parts, 50 frames per segment → 6×8 + 2
        let segs = video_parts((25, 1), 8, 250, 0);
        for s in &segs[1..segs.len() - 1] {
            assert_eq!(s, &vec![8, 8, 8, 8, 8, 8, 2]);
        }
    }

    #[test]
    fn audio_parts_are_fifteen_frames_and_segments_follow_the_grid() {
        let mut sp = AudioSplitter::new(S, 15);
        let frame = 1024u64 * 1_000_000_000 / 48_000;
        let mut segs: Vec<Vec<u64>> = vec![vec![0]];
        let mut starts = vec![0u64];
        for i in 0..1000u64 {
            let t = i * 1024 * 1_000_000_000 / 48_000;
            match sp.on_frame(t) {
                Some(Split::Segment) => {
                    segs.push(vec![0]);
                    starts.push(t);
                }
                Some(Split::Part) => segs.last_mut().unwrap().push(0),
                None => {}
            }
            *segs.last_mut().unwrap().last_mut().unwrap() += 1;
        }
        for (s, start) in segs[1..segs.len() - 1].iter().zip(&starts[1..]) {
            assert!(s[..s.len() - 1].iter().all(|&f| f == 15), "{s:?}");
            assert!(*s.last().unwrap() <= 15);
            // a segment starts less than one AAC frame after its grid point
            let grid = segment_index(*start, S) * S;
            assert!(*start + GRID_EPSILON_NS >= grid && *start < grid + frame);
        }
    }

    #[test]
    fn late_keyframe_delays_the_segment_but_parts_continue() {
        let mut sp = VideoSplitter::new(S, 333_333_333);
        assert_eq!(sp.on_frame(0, true), None);
        let mut cuts = Vec::new();
        for i in 1..70u64 {
            let t = i * 33_333_333;
            // the keyframe comes 3 frames late
            cuts.push(sp.on_frame(t, i == 63));
        }
        assert_eq!(cuts[62], Some(Split::Segment));
        assert_eq!(cuts[59], Some(Split::Part)); // frame 60: not a keyframe, part grid goes on
    }

    #[test]
    fn gated_keyframes_follow_the_source_gop() {
        // a 4 s source GOP on a 2 s grid at 30 fps: keys only where the source had its IDRs
        let mut clock = KeyframeClock::new(S);
        let mut sp = VideoSplitter::new(S, 333_333_333);
        let mut starts = Vec::new();
        for i in 0..600u64 {
            let t = frame_ns(i, 30, 1, 500_000_000);
            let idr = i % 120 == 0;
            let key = clock.on_frame_if(t, idr);
            assert!(!key || idr, "a key off the source's IDRs at frame {i}");
            if sp.on_frame(t, key) == Some(Split::Segment) || i == 0 {
                starts.push(i);
            }
        }
        assert_eq!(starts, vec![0, 120, 240, 360, 480]);
        // a 2 s GOP whose IDRs sit mid-grid: every IDR opens a segment
        let mut clock = KeyframeClock::new(S);
        let keys: Vec<u64> = (0..300u64)
            .filter(|i| clock.on_frame_if(frame_ns(*i, 30, 1, 0), i % 60 == 15))
            .collect();
        assert_eq!(keys, vec![15, 75, 135, 195, 255]);
    }

    #[test]
    fn segments_of_whole_gops_never_skip_an_idr() {
        // 29.97 fps with a 60-frame GOP (2.002 s) on a 2 s target: every IDR cuts, for ever (the grid rule would
        // skip one every ~1000 GOPs and double that segment)
        let idr = |k: u64| k * 60 * 1001 * 1_000_000_000 / 30_000;
        let mut last = None;
        for k in 0..5000 {
            assert!(gop_cut(last, idr(k), S), "IDR {k} skipped");
            last = Some(idr(k));
        }
        // a 1.5 s GOP: every second IDR (3 s segments)
        let cuts: Vec<u64> = {
            let mut last = None;
            (0..8u64)
                .filter(|k| {
                    let t = k * 1_500_000_000;
                    let cut = gop_cut(last, t, S);
                    if cut {
                        last = Some(t);
                    }
                    cut
                })
                .collect()
        };
        assert_eq!(cuts, vec![0, 2, 4, 6]);
        // the passthrough's splitter applies the same rule to the same IDRs
        let mut sp = VideoSplitter::new(S, 500_000_000);
        let mut segs = Vec::new();
        for k in 0..8u64 {
            if sp.on_frame_by(k * 1_500_000_000, true, SegmentRule::AfterTarget)
                == Some(Split::Segment)
            {
                segs.push(k);
            }
        }
        assert_eq!(segs, vec![2, 4, 6]);
        // an encoder keyed only where cuts were decided: every key opens one
        let mut sp = VideoSplitter::new(S, 500_000_000);
        assert_eq!(sp.on_frame_by(0, true, SegmentRule::EveryKey), None);
        assert_eq!(
            sp.on_frame_by(3_000_000_000, true, SegmentRule::EveryKey),
            Some(Split::Segment)
        );
    }

    #[test]
    fn hint_prediction_matches_the_splitter_rule() {
        assert!(!next_part_opens_segment(0, 1_666_666_666, S));
        assert!(next_part_opens_segment(0, 1_999_999_999, S));
        assert!(next_part_opens_segment(2_000_000_000, 4_005_333_333, S));
        assert!(!next_part_opens_segment(2_005_333_333, 3_925_333_333, S));
    }
}
