//! The per-rendition LL-HLS index: parts grouped into segments, a sliding window, and the media playlist.
//!
//! One [`Packager`] per rendition. The origin calls [`Packager::push_part`] for every CMAF chunk (in order), then
//! [`Packager::snapshot`] to publish an immutable view: the rendered playlist plus what blocking requests need to
//! decide. A segment's bytes are the concatenation of its parts' bytes, built once when the segment closes.

use std::collections::VecDeque;
use std::fmt::Write as _;

use bytes::{Bytes, BytesMut};

use crate::plan::next_part_opens_segment;
use crate::time::format_unix_ms;

/// URI of the first init segment, relative to the media playlist.
pub const INIT_URI: &str = "init.mp4";

/// URI of init segment generation `gen` (a new generation follows a change of codec parameters).
pub fn init_uri(gen: u32) -> String {
    if gen == 0 {
        INIT_URI.to_string()
    } else {
        format!("init-{gen}.mp4")
    }
}

/// URI of segment `msn`, relative to the media playlist.
pub fn segment_uri(msn: u64) -> String {
    format!("seg-{msn}.m4s")
}

/// URI of part `part` of segment `msn`, relative to the media playlist.
pub fn part_uri(msn: u64, part: u64) -> String {
    format!("part-{msn}-{part}.m4s")
}

/// Parses a resource name produced by [`segment_uri`] or [`part_uri`].
pub fn parse_resource(name: &str) -> Option<Resource> {
    if name == INIT_URI {
        return Some(Resource::Init(0));
    }
    if let Some(g) = name
        .strip_prefix("init-")
        .and_then(|n| n.strip_suffix(".mp4"))
    {
        let gen = canonical(g)?;
        return (gen > 0 && gen <= u64::from(u32::MAX)).then_some(Resource::Init(gen as u32));
    }
    let stem = name.strip_suffix(".m4s")?;
    if let Some(n) = stem.strip_prefix("seg-") {
        return canonical(n).map(Resource::Segment);
    }
    let (m, p) = stem.strip_prefix("part-")?.split_once('-')?;
    Some(Resource::Part(PartPos {
        msn: canonical(m)?,
        part: canonical(p)?,
    }))
}

/// A decimal number written the one way kiln writes it (no sign, no leading zeros), so each resource has exactly
/// one URL (one CDN cache key).
/// (Checked on the text, not by writing the number back: every part and segment request parses its name.)
fn canonical(s: &str) -> Option<u64> {
    let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

/// A media resource of a rendition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// Init segment of a generation.
    Init(u32),
    Segment(u64),
    Part(PartPos),
}

/// A part's position: media sequence number of its parent segment and its index there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartPos {
    pub msn: u64,
    pub part: u64,
}

impl PartPos {
    pub const fn new(msn: u64, part: u64) -> Self {
        Self { msn, part }
    }
}

/// Fixed settings of a rendition's playlist. Identical for every rendition of a stream (SERVER-CONTROL and
/// TARGETDURATION must match across the multivariant set).
#[derive(Debug, Clone, PartialEq)]
pub struct PackagerConfig {
    /// Nominal segment duration (the grid the planners cut on).
    pub segment_ns: u64,
    /// EXT-X-TARGETDURATION.
    pub target_duration_s: u32,
    /// PART-TARGET in milliseconds (rendered exactly, e.g. `0.334`).
    pub part_target_ms: u32,
    /// Complete segments listed in the playlist (plus the open one).
    pub window_segments: usize,
    /// Complete segments kept downloadable after they leave the playlist.
    pub retain_segments: usize,
    /// Unix time (ms) of running time 0: PROGRAM-DATE-TIME = origin + part start.
    pub wallclock_origin_unix_ms: i64,
    /// CAN-SKIP-UNTIL in seconds (the Skip Boundary, ≥ 6 × TD); `None` disables delta updates.
    pub can_skip_until_s: Option<u32>,
    /// Media sequence number of the first segment. Deriving it from the wall clock (start time / segment
    /// duration) keeps segment and part URLs unique across restarts of a stream id, so a CDN never serves an old
    /// instance's bytes under a new instance's URL.
    pub first_msn: u64,
}

impl PackagerConfig {
    /// PART-HOLD-BACK: 3 × PART-TARGET.
    pub fn part_hold_back_ms(&self) -> u32 {
        3 * self.part_target_ms
    }

    /// HOLD-BACK: 3 × TARGETDURATION.
    pub fn hold_back_s(&self) -> u32 {
        3 * self.target_duration_s
    }

    /// The EXT-X-SERVER-CONTROL line (without the tag name), identical for every rendition of a stream.
    pub fn server_control(&self) -> String {
        let skip = self
            .can_skip_until_s
            .map(|s| format!(",CAN-SKIP-UNTIL={s}"))
            .unwrap_or_default();
        format!(
            "CAN-BLOCK-RELOAD=YES{skip},PART-HOLD-BACK={},HOLD-BACK={}",
            ms_decimal(self.part_hold_back_ms()),
            self.hold_back_s()
        )
    }
}

/// Milliseconds as a decimal number of seconds with no trailing zeros (`334` → `0.334`, `2000` → `2`).
fn ms_decimal(ms: u32) -> String {
    let s = format!("{}.{:03}", ms / 1000, ms % 1000);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A part as the muxer delivers it.
#[derive(Debug, Clone)]
pub struct PartIn {
    /// The chunk opens a new fragment, i.e. a new segment.
    pub starts_segment: bool,
    /// The chunk's first sample is a sync sample.
    pub independent: bool,
    /// Running time of the first sample, in ns (the grid and PROGRAM-DATE-TIME clock).
    pub start_ns: u64,
    /// Sum of the sample durations, in ns.
    pub duration_ns: u64,
    pub bytes: Bytes,
    /// The timeline breaks before this part (only honoured on a part that starts a segment): the segment gets
    /// EXT-X-DISCONTINUITY.
    pub discontinuity: bool,
}

/// Why a chunk was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    #[error("the rendition has ended")]
    Ended,
    #[error("part is empty")]
    Empty,
}

#[derive(Debug, Clone)]
struct StoredPart {
    duration_ns: u64,
    independent: bool,
    bytes: Bytes,
    /// A hole in the timeline (the source or encoder skipped): listed with GAP=YES, never downloadable.
    gap: bool,
}

#[derive(Debug, Clone)]
struct Segment {
    msn: u64,
    init_gen: u32,
    discontinuity: bool,
    start_ns: u64,
    duration_ns: u64,
    parts: Vec<StoredPart>,
    /// Set once the segment is closed: the concatenation of its parts.
    bytes: Option<Bytes>,
}

impl Segment {
    fn close(&mut self) {
        if self.bytes.is_none() {
            let len = self.parts.iter().map(|p| p.bytes.len()).sum();
            let mut b = BytesMut::with_capacity(len);
            for p in &self.parts {
                b.extend_from_slice(&p.bytes);
            }
            self.bytes = Some(b.freeze());
        }
    }

    fn complete(&self) -> bool {
        self.bytes.is_some()
    }
}

/// The LL-HLS index of one rendition.
#[derive(Debug)]
pub struct Packager {
    cfg: PackagerConfig,
    /// Init segments still referenced (or current), by generation.
    inits: VecDeque<(u32, Bytes)>,
    segs: VecDeque<Segment>,
    next_msn: u64,
    ended: bool,
    parts_published: u64,
    /// Discontinuities in segments trimmed away entirely.
    dropped_discontinuities: u64,
    over_target: u64,
    /// Segments follow a source's GOP, not the grid (the PRELOAD-HINT's guess of the next segment's start).
    follow_gop: bool,
    /// Snapshots taken so far: each one's [`Snapshot::version`].
    snapshots: std::sync::atomic::AtomicU64,
}

/// Which playlist a request asked for (`_HLS_skip`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The full playlist.
    No,
    /// `_HLS_skip=YES`: a delta update (EXT-X-VERSION 9).
    Yes,
    /// `_HLS_skip=v2`: a delta update that also drops old date ranges (EXT-X-VERSION 10).
    V2,
}

/// Another rendition's live edge, for EXT-X-RENDITION-REPORT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenditionReport {
    /// URI of its media playlist, relative to this one (e.g. `../lo/index.m3u8`).
    pub uri: String,
    pub last: PartPos,
}

/// An immutable published view of a rendition: what blocking playlist requests and preload-hinted part requests
/// decide on, and the playlist bytes to send.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The rendered media playlist.
    pub playlist: Bytes,
    /// The delta update for `_HLS_skip=YES` (when CAN-SKIP-UNTIL is advertised and the playlist is live).
    pub delta: Option<Bytes>,
    /// The delta update for `_HLS_skip=v2`.
    pub delta_v2: Option<Bytes>,
    /// The newest published part.
    pub last: Option<PartPos>,
    /// The part the playlist's PRELOAD-HINT names.
    pub hint: Option<PartPos>,
    /// Oldest MSN still downloadable.
    pub first_retained_msn: u64,
    /// First MSN listed in the playlist (EXT-X-MEDIA-SEQUENCE).
    pub media_sequence: u64,
    /// Part counts of closed segments still retained: `(msn, parts)`.
    pub closed: Vec<(u64, u64)>,
    pub ended: bool,
    pub part_target_ms: u32,
    pub target_duration_s: u32,
    /// Parts published so far.
    pub parts_published: u64,
    /// The order it was taken in: a later snapshot of the same packager has a higher version. Publishing happens
    /// after the packager's lock is let go, so two publishers may finish in the other order; the version is what
    /// keeps the older one from replacing the newer (an ENDLIST overwritten by a part taken before it).
    pub version: u64,
    /// The rendition reports the playlist carries (what the other renditions had published then).
    pub reports: Vec<RenditionReport>,
}

impl Packager {
    pub fn new(cfg: PackagerConfig) -> Self {
        Self {
            next_msn: cfg.first_msn,
            cfg,
            inits: VecDeque::new(),
            segs: VecDeque::new(),
            ended: false,
            parts_published: 0,
            snapshots: Default::default(),
            dropped_discontinuities: 0,
            over_target: 0,
            follow_gop: false,
        }
    }

    pub fn config(&self) -> &PackagerConfig {
        &self.cfg
    }

    /// Sets the init segment. Identical bytes change nothing; different bytes start a new generation, used by
    /// the segments that start from now on (each gets an EXT-X-MAP when the generation changes).
    pub fn set_init(&mut self, bytes: Bytes) -> u32 {
        match self.inits.back() {
            Some((g, b)) if *b == bytes => *g,
            Some((g, _)) => {
                let g = g + 1;
                self.inits.push_back((g, bytes));
                g
            }
            None => {
                self.inits.push_back((0, bytes));
                0
            }
        }
    }

    /// Sets EXT-X-TARGETDURATION (and the Skip Boundary, 6 × TD, when delta updates are on): a stream whose
    /// segments follow its source's GOP learns it from its first complete segment, before any playlist is served.
    pub fn set_target_duration(&mut self, s: u32) {
        self.cfg.target_duration_s = s.max(1);
        if self.cfg.can_skip_until_s.is_some() {
            self.cfg.can_skip_until_s = Some(6 * self.cfg.target_duration_s);
        }
        // counted again against the new TD (set right after the first segment closed: all are retained)
        let td_ns = u64::from(self.cfg.target_duration_s) * 1_000_000_000;
        self.over_target = self
            .segs
            .iter()
            .filter(|s| s.complete() && s.duration_ns >= td_ns + 500_000_000)
            .count() as u64;
    }

    /// Segments follow the source's GOP: the PRELOAD-HINT expects the next segment to start as long after the
    /// open one's start as the last complete segment lasted (not at the next grid point).
    pub fn follow_source_gop(&mut self) {
        self.follow_gop = true;
    }

    /// The highest bitrate of a complete segment retained, in bits per second. Segments shorter than half the
    /// target (cut short by a switch point: little more than an IDR) do not count.
    pub fn peak_bitrate(&self) -> Option<u64> {
        self.segs
            .iter()
            .filter(|s| {
                s.complete() && s.duration_ns > 0 && 2 * s.duration_ns >= self.cfg.segment_ns
            })
            .filter_map(|s| {
                let bytes = s.bytes.as_ref()?.len() as u128;
                Some((bytes * 8 * 1_000_000_000 / u128::from(s.duration_ns)) as u64)
            })
            .max()
    }

    /// The longest complete segment retained, in ns.
    pub fn longest_segment_ns(&self) -> Option<u64> {
        self.segs
            .iter()
            .filter(|s| s.complete())
            .map(|s| s.duration_ns)
            .max()
    }

    /// Complete segments whose EXTINF, rounded, is over TARGETDURATION (a source GOP longer than the one
    /// learnt), since the start.
    pub fn segments_over_target(&self) -> u64 {
        self.over_target
    }

    /// The current init segment.
    pub fn init(&self) -> Option<Bytes> {
        self.inits.back().map(|(_, b)| b.clone())
    }

    /// Init segment of generation `gen`, while retained.
    pub fn init_gen(&self, gen: u32) -> Option<Bytes> {
        self.inits
            .iter()
            .find(|(g, _)| *g == gen)
            .map(|(_, b)| b.clone())
    }

    fn current_gen(&self) -> u32 {
        self.inits.back().map_or(0, |(g, _)| *g)
    }

    /// Adds the next part.
    pub fn push_part(&mut self, part: PartIn) -> Result<PartPos, PackError> {
        if self.ended {
            return Err(PackError::Ended);
        }
        if part.bytes.is_empty() {
            return Err(PackError::Empty);
        }
        self.fill_gap(part.start_ns);
        let open = self.segs.back().is_some_and(|s| !s.complete());
        if part.starts_segment || !open {
            if let Some(s) = self.segs.back_mut() {
                s.close();
                let td_ns = u64::from(self.cfg.target_duration_s) * 1_000_000_000;
                // EXTINF rounded to the nearest second must stay ≤ TD
                if s.duration_ns >= td_ns + 500_000_000 {
                    self.over_target += 1;
                }
            }
            self.segs.push_back(Segment {
                msn: self.next_msn,
                init_gen: self.current_gen(),
                discontinuity: part.discontinuity && !self.segs.is_empty(),
                start_ns: part.start_ns,
                duration_ns: 0,
                parts: Vec::new(),
                bytes: None,
            });
            self.next_msn += 1;
        }
        let seg = self.segs.back_mut().expect("a segment is open");
        seg.duration_ns += part.duration_ns;
        seg.parts.push(StoredPart {
            duration_ns: part.duration_ns,
            independent: part.independent,
            bytes: part.bytes,
            gap: false,
        });
        let pos = PartPos::new(seg.msn, seg.parts.len() as u64 - 1);
        self.parts_published += 1;
        self.trim();
        Ok(pos)
    }

    /// When the next part starts more than half a PART-TARGET after the open segment's end, the source or
    /// encoder skipped: the hole becomes GAP=YES parts (each ≤ PART-TARGET) at the end of the open segment, so
    /// the playlist timeline stays continuous and players skip the hole instead of stalling on it (§4.4.4.9).
    fn fill_gap(&mut self, next_start_ns: u64) {
        let pt = u64::from(self.cfg.part_target_ms) * 1_000_000;
        let Some(seg) = self.segs.back_mut().filter(|s| !s.complete()) else {
            return;
        };
        let expected = seg.start_ns + seg.duration_ns;
        if next_start_ns <= expected + pt / 2 {
            return;
        }
        let hole = next_start_ns - expected;
        let n = hole.div_ceil(pt);
        for i in 0..n {
            let d = hole / n + u64::from(i < hole % n);
            seg.parts.push(StoredPart {
                duration_ns: d,
                independent: false,
                bytes: Bytes::new(),
                gap: true,
            });
            seg.duration_ns += d;
        }
    }

    /// Closes the open segment and marks the playlist ended (ENDLIST, no hint).
    pub fn end(&mut self) {
        if let Some(s) = self.segs.back_mut() {
            s.close();
        }
        self.ended = true;
    }

    pub fn ended(&self) -> bool {
        self.ended
    }

    fn trim(&mut self) {
        let keep = self.cfg.window_segments + self.cfg.retain_segments;
        while self.segs.iter().filter(|s| s.complete()).count() > keep {
            if let Some(s) = self.segs.pop_front() {
                self.dropped_discontinuities += u64::from(s.discontinuity);
            }
        }
        // Drop init generations no retained segment uses (the current one always stays).
        let oldest = self.segs.front().map_or(self.current_gen(), |s| s.init_gen);
        while self.inits.len() > 1 && self.inits.front().is_some_and(|(g, _)| *g < oldest) {
            self.inits.pop_front();
        }
    }

    /// The bytes of part `pos`, if retained.
    pub fn part(&self, pos: PartPos) -> Option<Bytes> {
        let seg = self.segment_entry(pos.msn)?;
        seg.parts
            .get(pos.part as usize)
            .filter(|p| !p.gap)
            .map(|p| p.bytes.clone())
    }

    /// Whether part `pos` is retained as a GAP (no bytes: the timeline skipped over it).
    pub fn is_gap(&self, pos: PartPos) -> bool {
        self.segment_entry(pos.msn)
            .and_then(|seg| seg.parts.get(usize::try_from(pos.part).ok()?))
            .is_some_and(|p| p.gap)
    }

    /// The bytes of a closed segment, if retained.
    pub fn segment(&self, msn: u64) -> Option<Bytes> {
        self.segment_entry(msn)?.bytes.clone()
    }

    fn segment_entry(&self, msn: u64) -> Option<&Segment> {
        let first = self.segs.front()?.msn;
        self.segs.get(msn.checked_sub(first)? as usize)
    }

    /// The newest published part.
    pub fn last(&self) -> Option<PartPos> {
        let s = self.segs.back()?;
        Some(PartPos::new(s.msn, s.parts.len().checked_sub(1)? as u64))
    }

    /// The part the next chunk will be: the PRELOAD-HINT target.
    pub fn hint(&self) -> Option<PartPos> {
        if self.ended {
            return None;
        }
        let s = self.segs.back()?;
        if s.complete() {
            return Some(PartPos::new(s.msn + 1, 0));
        }
        let next_start = s.start_ns + s.duration_ns;
        let opens = if self.follow_gop {
            // segments as long as the source's GOP: expect the next as long as the last complete one
            let expected = self
                .segs
                .iter()
                .rev()
                .find(|s| s.complete())
                .map_or(self.cfg.segment_ns, |p| p.duration_ns);
            next_start + crate::plan::GRID_EPSILON_NS >= s.start_ns + expected
        } else {
            next_part_opens_segment(s.start_ns, next_start, self.cfg.segment_ns)
        };
        if opens {
            Some(PartPos::new(s.msn + 1, 0))
        } else {
            Some(PartPos::new(s.msn, s.parts.len() as u64))
        }
    }

    /// Indices into `segs` of the listed segments.
    fn listed(&self) -> impl Iterator<Item = &Segment> {
        let complete = self.segs.iter().filter(|s| s.complete()).count();
        let skip = complete.saturating_sub(self.cfg.window_segments);
        self.segs.iter().skip(skip)
    }

    /// Renders the full media playlist without rendition reports.
    pub fn render(&self) -> String {
        self.render_with(Skip::No, &[])
    }

    /// Renders the media playlist: full or as a delta update, with reports on the other renditions.
    // Long by design: a renderer: the playlist tags in the order RFC 8216bis wants them.
    pub fn render_with(&self, skip: Skip, reports: &[RenditionReport]) -> String {
        let c = &self.cfg;
        let mut out = String::with_capacity(4096);
        let listed: Vec<&Segment> = self.listed().collect();
        let unlisted = self.segs.len() - listed.len();
        let media_sequence = listed.first().map_or(self.next_msn, |s| s.msn);
        let version = match skip {
            Skip::No => 6,
            Skip::Yes => 9,
            Skip::V2 => 10,
        };
        let _ = write!(
            out,
            "#EXTM3U\n#EXT-X-VERSION:{version}\n#EXT-X-TARGETDURATION:{}\n#EXT-X-PART-INF:PART-TARGET={}\n\
             #EXT-X-SERVER-CONTROL:{}\n#EXT-X-MEDIA-SEQUENCE:{}\n",
            c.target_duration_s,
            ms_decimal(c.part_target_ms),
            c.server_control(),
            media_sequence,
        );
        let dseq = self.dropped_discontinuities
            + self
                .segs
                .iter()
                .take(unlisted)
                .filter(|s| s.discontinuity)
                .count() as u64;
        if dseq > 0 || listed.iter().any(|s| s.discontinuity) {
            let _ = writeln!(out, "#EXT-X-DISCONTINUITY-SEQUENCE:{dseq}");
        }
        // Delta update: skip the leading segments that end more than the Skip Boundary before the end of the last
        // complete segment (§6.2.5.1). Measuring from the last *complete* segment skips less, never more.
        let mut skipped = 0;
        if skip != Skip::No {
            let boundary_ns = u64::from(c.can_skip_until_s.unwrap_or(u32::MAX)) * 1_000_000_000;
            let end_ns = listed
                .iter()
                .rev()
                .find(|s| s.complete())
                .map_or(0, |s| s.start_ns + s.duration_ns);
            skipped = listed
                .iter()
                .take_while(|s| {
                    s.complete() && end_ns.saturating_sub(s.start_ns + s.duration_ns) > boundary_ns
                })
                .count();
            let _ = write!(out, "#EXT-X-SKIP:SKIPPED-SEGMENTS={skipped}");
            out.push_str(if skip == Skip::V2 {
                ",RECENTLY-REMOVED-DATERANGES=\"\"\n"
            } else {
                "\n"
            });
        }
        // Part tags are listed only for segments that start within 3 × TD of the playlist's end (§6.2.2).
        let end_ns = listed.last().map_or(0, |s| s.start_ns + s.duration_ns);
        let part_window_ns = 3 * u64::from(c.target_duration_s) * 1_000_000_000;
        let mut map: Option<u32> = None;
        for s in listed.iter().skip(skipped) {
            // DISCONTINUITY, MAP and PDT precede the segment's first EXT-X-PART (§4.4.4.9).
            if s.discontinuity {
                out.push_str("#EXT-X-DISCONTINUITY\n");
            }
            if map != Some(s.init_gen) {
                let _ = writeln!(out, "#EXT-X-MAP:URI=\"{}\"", init_uri(s.init_gen));
                map = Some(s.init_gen);
            }
            let pdt_ms = c.wallclock_origin_unix_ms + (s.start_ns / 1_000_000) as i64;
            let _ = writeln!(out, "#EXT-X-PROGRAM-DATE-TIME:{}", format_unix_ms(pdt_ms));
            if end_ns.saturating_sub(s.start_ns) <= part_window_ns || !s.complete() {
                for (i, p) in s.parts.iter().enumerate() {
                    let _ = write!(
                        out,
                        "#EXT-X-PART:DURATION={},URI=\"{}\"",
                        secs(p.duration_ns),
                        part_uri(s.msn, i as u64)
                    );
                    out.push_str(match (p.independent, p.gap) {
                        (_, true) => ",GAP=YES\n",
                        (true, false) => ",INDEPENDENT=YES\n",
                        (false, false) => "\n",
                    });
                }
            }
            if s.complete() {
                let _ = write!(
                    out,
                    "#EXTINF:{},\n{}\n",
                    secs(s.duration_ns),
                    segment_uri(s.msn)
                );
            }
        }
        if self.ended {
            out.push_str("#EXT-X-ENDLIST\n");
        } else if let Some(h) = self.hint() {
            let _ = writeln!(
                out,
                "#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"{}\"",
                part_uri(h.msn, h.part)
            );
            // A new init segment is waiting for the next part (an encoder rebuild): hint it too (App. B.1).
            let gen = self.current_gen();
            if self.segs.back().is_some_and(|s| s.init_gen != gen) {
                let _ = writeln!(
                    out,
                    "#EXT-X-PRELOAD-HINT:TYPE=MAP,URI=\"{}\"",
                    init_uri(gen)
                );
            }
        }
        for r in reports {
            let _ = writeln!(
                out,
                "#EXT-X-RENDITION-REPORT:URI=\"{}\",LAST-MSN={},LAST-PART={}",
                r.uri, r.last.msn, r.last.part
            );
        }
        out
    }

    /// Publishes the current state as an immutable view (no rendition reports).
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot_with(&[])
    }

    /// Publishes the current state with reports on the other renditions. Delta updates are rendered only while
    /// live and when CAN-SKIP-UNTIL is configured (otherwise `_HLS_skip` is ignored).
    pub fn snapshot_with(&self, reports: &[RenditionReport]) -> Snapshot {
        let listed_first = self.listed().next().map_or(self.next_msn, |s| s.msn);
        let deltas = !self.ended && self.cfg.can_skip_until_s.is_some();
        let delta = |k| deltas.then(|| Bytes::from(self.render_with(k, reports)));
        Snapshot {
            playlist: Bytes::from(self.render_with(Skip::No, reports)),
            delta: delta(Skip::Yes),
            delta_v2: delta(Skip::V2),
            last: self.last(),
            hint: self.hint(),
            first_retained_msn: self.segs.front().map_or(self.next_msn, |s| s.msn),
            media_sequence: listed_first,
            closed: self
                .segs
                .iter()
                .filter(|s| s.complete())
                .map(|s| (s.msn, s.parts.len() as u64))
                .collect(),
            ended: self.ended,
            part_target_ms: self.cfg.part_target_ms,
            target_duration_s: self.cfg.target_duration_s,
            parts_published: self.parts_published,
            reports: reports.to_vec(),
            version: self
                .snapshots
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1,
        }
    }
}

/// Seconds with 5 decimals, rounded to nearest (a part of ≤ PART-TARGET, which has ms precision, stays ≤ it).
fn secs(ns: u64) -> String {
    let tenus = (ns + 5_000) / 10_000;
    format!("{}.{:05}", tenus / 100_000, tenus % 100_000)
}

#[cfg(test)]
mod tests;
