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
fn canonical(s: &str) -> Option<u64> {
    let n: u64 = s.parse().ok()?;
    (n.to_string() == s).then_some(n)
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
            dropped_discontinuities: 0,
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
        if next_part_opens_segment(s.start_ns, next_start, self.cfg.segment_ns) {
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
        }
    }
}

/// Seconds with 5 decimals, rounded to nearest (a part of ≤ PART-TARGET, which has ms precision, stays ≤ it).
fn secs(ns: u64) -> String {
    let tenus = (ns + 5_000) / 10_000;
    format!("{}.{:05}", tenus / 100_000, tenus % 100_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn cfg() -> PackagerConfig {
        PackagerConfig {
            segment_ns: 2_000_000_000,
            target_duration_s: 2,
            part_target_ms: 334,
            window_segments: 4,
            retain_segments: 2,
            wallclock_origin_unix_ms: 1_795_880_805_000,
            can_skip_until_s: None,
            first_msn: 0,
        }
    }

    /// Feeds `segments` segments of six 10-frame parts at 30 fps.
    pub(crate) fn feed(p: &mut Packager, segments: u64) {
        for s in 0..segments {
            for i in 0..6u64 {
                let start = s * 2_000_000_000 + i * 333_333_333;
                p.push_part(PartIn {
                    starts_segment: i == 0,
                    independent: i == 0,
                    start_ns: start,
                    duration_ns: 333_333_333,
                    bytes: Bytes::from(format!("[{s}.{i}]")),
                    discontinuity: false,
                })
                .unwrap();
            }
        }
    }

    #[test]
    fn renders_a_live_edge_playlist() {
        let mut p = Packager::new(cfg());
        feed(&mut p, 2);
        let text = p.render();
        assert!(text.starts_with("#EXTM3U\n#EXT-X-VERSION:6\n#EXT-X-TARGETDURATION:2\n"));
        assert!(text.contains("#EXT-X-PART-INF:PART-TARGET=0.334\n"));
        assert!(text.contains(
            "#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=1.002,HOLD-BACK=6\n"
        ));
        assert!(text.contains("#EXT-X-MAP:URI=\"init.mp4\"\n"));
        assert!(text.contains("#EXT-X-PROGRAM-DATE-TIME:2026-11-28T15:46:45.000Z\n"));
        assert!(
            text.contains("#EXT-X-PART:DURATION=0.33333,URI=\"part-0-0.m4s\",INDEPENDENT=YES\n")
        );
        assert!(text.contains("#EXT-X-PART:DURATION=0.33333,URI=\"part-0-1.m4s\"\n"));
        assert!(text.contains("#EXTINF:2.00000,\nseg-0.m4s\n"));
        // segment 1 is open with 6 parts; the next part starts at 4 s → a new segment
        assert!(
            text.ends_with("#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part-2-0.m4s\"\n"),
            "{text}"
        );
        assert_eq!(p.last(), Some(PartPos::new(1, 5)));
        // parsed by a real parser
        let parsed = m3u8_rs::parse_media_playlist_res(text.as_bytes()).unwrap();
        assert_eq!(parsed.target_duration, 2);
        assert_eq!(parsed.segments.len(), 1);
    }

    #[test]
    fn hint_names_the_next_part_inside_a_segment() {
        let mut p = Packager::new(cfg());
        feed(&mut p, 1);
        p.push_part(PartIn {
            starts_segment: true,
            independent: true,
            start_ns: 2_000_000_000,
            duration_ns: 333_333_333,
            bytes: Bytes::from_static(b"x"),
            discontinuity: false,
        })
        .unwrap();
        assert_eq!(p.hint(), Some(PartPos::new(1, 1)));
        assert!(p.render().ends_with("URI=\"part-1-1.m4s\"\n"));
    }

    #[test]
    fn segment_bytes_are_the_parts_concatenated() {
        let mut p = Packager::new(cfg());
        feed(&mut p, 3);
        let seg = p.segment(1).unwrap();
        let parts: Vec<u8> = (0..6)
            .flat_map(|i| p.part(PartPos::new(1, i)).unwrap().to_vec())
            .collect();
        assert_eq!(seg.as_ref(), parts.as_slice());
        assert!(
            p.segment(2).is_none(),
            "the open segment has no segment bytes yet"
        );
        assert_eq!(p.part(PartPos::new(2, 6)), None);
    }

    #[test]
    fn window_slides_and_retains_bytes_after_removal() {
        let mut p = Packager::new(cfg());
        feed(&mut p, 10);
        let snap = p.snapshot();
        // 9 complete segments; 4 listed (5..=8) + the open 9; 2 more retained (3, 4)
        assert_eq!(snap.media_sequence, 5);
        assert_eq!(snap.first_retained_msn, 3);
        let text = String::from_utf8(snap.playlist.to_vec()).unwrap();
        assert!(text.contains("#EXT-X-MEDIA-SEQUENCE:5\n"));
        assert!(!text.contains("seg-4.m4s"));
        assert!(p.segment(3).is_some() && p.segment(2).is_none());
        // part tags only within 3×TD (6 s) of the end: segments 7, 8 and open 9 (start ≥ 14 s of 20 s end)
        assert!(!text.contains("part-6-0"));
        assert!(text.contains("part-7-0") && text.contains("part-9-5"));
    }

    #[test]
    fn end_closes_the_playlist() {
        let mut p = Packager::new(cfg());
        feed(&mut p, 2);
        p.end();
        let text = p.render();
        assert!(
            text.ends_with("#EXTINF:2.00000,\nseg-1.m4s\n#EXT-X-ENDLIST\n"),
            "{text}"
        );
        assert!(!text.contains("PRELOAD-HINT"));
        assert_eq!(
            p.push_part(PartIn {
                starts_segment: true,
                independent: true,
                start_ns: 0,
                duration_ns: 1,
                bytes: Bytes::from_static(b"x"),
                discontinuity: false,
            }),
            Err(PackError::Ended)
        );
    }

    #[test]
    fn resources_round_trip() {
        assert_eq!(parse_resource("init.mp4"), Some(Resource::Init(0)));
        assert_eq!(parse_resource(&init_uri(3)), Some(Resource::Init(3)));
        assert_eq!(
            parse_resource(&segment_uri(42)),
            Some(Resource::Segment(42))
        );
        assert_eq!(
            parse_resource(&part_uri(7, 3)),
            Some(Resource::Part(PartPos::new(7, 3)))
        );
        for bad in [
            "",
            "seg-.m4s",
            "part-1.m4s",
            "part-a-b.m4s",
            "../etc/passwd",
            "seg-1.mp4",
            "seg-01.m4s",
            "seg-+1.m4s",
            "part-1-01.m4s",
            "init-0.mp4",
            "init-x.mp4",
        ] {
            assert_eq!(parse_resource(bad), None, "{bad}");
        }
    }

    fn part_at(seg: u64, i: u64, discontinuity: bool) -> PartIn {
        PartIn {
            starts_segment: i == 0,
            independent: i == 0,
            start_ns: seg * 2_000_000_000 + i * 333_333_333,
            duration_ns: 333_333_333,
            bytes: Bytes::from(format!("[{seg}.{i}]")),
            discontinuity,
        }
    }

    #[test]
    fn delta_updates_skip_only_segments_beyond_the_skip_boundary() {
        let mut c = cfg();
        c.window_segments = 12;
        c.can_skip_until_s = Some(12);
        let mut p = Packager::new(c);
        feed(&mut p, 12); // 11 complete (0..=10), 11 open
        let full = p.render();
        assert!(full.contains("CAN-SKIP-UNTIL=12,"));
        let delta = p.render_with(Skip::Yes, &[]);
        // last complete segment 10 ends at 22 s; segments ending before 10 s (0..=3, ending at 2..8 s) are skipped;
        // segment 4 ends at 10 s: exactly 12 s before, not more, so it stays
        assert!(delta.contains("#EXT-X-VERSION:9\n"));
        assert!(
            delta.contains("#EXT-X-SKIP:SKIPPED-SEGMENTS=4\n"),
            "{delta}"
        );
        assert!(delta.contains("#EXT-X-MEDIA-SEQUENCE:0\n"));
        assert!(!delta.contains("seg-3.m4s") && delta.contains("seg-4.m4s"));
        // merging: the delta's segment lines equal the full playlist's from segment 4 on
        let tail = |t: &str| t[t.find("#EXT-X-MAP").unwrap()..].to_string();
        let full_tail = &full[full
            .find("#EXT-X-PROGRAM-DATE-TIME:2026-11-28T15:46:53")
            .unwrap()..];
        assert!(tail(&delta).ends_with(full_tail));
        let v2 = p.render_with(Skip::V2, &[]);
        assert!(v2.contains("#EXT-X-VERSION:10\n"));
        assert!(v2.contains("#EXT-X-SKIP:SKIPPED-SEGMENTS=4,RECENTLY-REMOVED-DATERANGES=\"\"\n"));
        // snapshots carry deltas while live, not once ended
        assert!(p.snapshot().delta.is_some());
        p.end();
        assert!(p.snapshot().delta.is_none());
    }

    #[test]
    fn rendition_reports_follow_the_hint() {
        let mut p = Packager::new(cfg());
        feed(&mut p, 1);
        let text = p.render_with(
            Skip::No,
            &[RenditionReport {
                uri: "../lo/index.m3u8".into(),
                last: PartPos::new(0, 5),
            }],
        );
        assert!(text.ends_with(
            "#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part-1-0.m4s\"\n\
             #EXT-X-RENDITION-REPORT:URI=\"../lo/index.m3u8\",LAST-MSN=0,LAST-PART=5\n"
        ));
    }

    #[test]
    fn discontinuities_and_new_inits_are_signalled_and_counted() {
        let mut c = cfg();
        c.window_segments = 2;
        c.retain_segments = 1;
        let mut p = Packager::new(c);
        p.set_init(Bytes::from_static(b"init-a"));
        assert_eq!(
            p.set_init(Bytes::from_static(b"init-a")),
            0,
            "same bytes, same generation"
        );
        feed(&mut p, 2);
        assert!(!p.render().contains("TYPE=MAP"));
        assert_eq!(p.set_init(Bytes::from_static(b"init-b")), 1);
        // the new init is hinted until the first part that uses it arrives
        let hinted = p.render();
        assert!(
            hinted.contains("#EXT-X-PRELOAD-HINT:TYPE=MAP,URI=\"init-1.mp4\"\n"),
            "{hinted}"
        );
        for i in 0..6 {
            p.push_part(part_at(2, i, i == 0)).unwrap();
        }
        p.push_part(part_at(3, 0, false)).unwrap();
        let text = p.render();
        assert!(
            !text.contains("TYPE=MAP"),
            "the hint goes once the init is in use"
        );
        // segments 1 (gen 0) and 2 (gen 1, discontinuity) listed, 3 open
        let seg2 = text
            .find("#EXT-X-DISCONTINUITY\n#EXT-X-MAP:URI=\"init-1.mp4\"\n#EXT-X-PROGRAM-DATE-TIME")
            .unwrap();
        assert!(text.find("#EXT-X-MAP:URI=\"init.mp4\"").unwrap() < seg2);
        assert!(text.contains("#EXT-X-DISCONTINUITY-SEQUENCE:0\n"));
        assert_eq!(p.init_gen(1).as_deref(), Some(&b"init-b"[..]));
        // slide the discontinuity out of the playlist: the sequence counts it
        for s in 3..6 {
            for i in 0..6 {
                if (s, i) != (3, 0) {
                    p.push_part(part_at(s, i, false)).unwrap();
                }
            }
        }
        let text = p.render();
        assert!(text.contains("#EXT-X-DISCONTINUITY-SEQUENCE:1\n"), "{text}");
        assert!(!text.contains("#EXT-X-DISCONTINUITY\n"));
        assert!(
            p.init_gen(0).is_none(),
            "generation 0 is no longer referenced"
        );
    }

    #[test]
    fn holes_in_the_timeline_become_gap_parts() {
        let mut p = Packager::new(cfg());
        p.push_part(part_at(0, 0, false)).unwrap();
        p.push_part(part_at(0, 1, false)).unwrap();
        // parts 2 and 3 never came (the source stalled): the next part starts at 4 × 333 ms
        p.push_part(part_at(0, 4, false)).unwrap();
        let text = p.render();
        assert!(text.contains("URI=\"part-0-2.m4s\",GAP=YES\n"), "{text}");
        assert!(text.contains("URI=\"part-0-3.m4s\",GAP=YES\n"));
        assert!(text.contains("#EXT-X-PART:DURATION=0.33333,URI=\"part-0-4.m4s\"\n"));
        assert_eq!(p.part(PartPos::new(0, 2)), None, "gap parts have no bytes");
        assert_eq!(p.part(PartPos::new(0, 4)).as_deref(), Some(&b"[0.4]"[..]));
        // the timeline stays continuous: the hint follows the real part
        assert_eq!(p.hint(), Some(PartPos::new(0, 5)));
        // a hole before a new segment is filled at the end of the old one; the segment keeps its full duration
        p.push_part(part_at(1, 0, false)).unwrap();
        let text = p.render();
        assert!(text.contains("#EXTINF:2.00000,\nseg-0.m4s"), "{text}");
        assert_eq!(p.segment(0).unwrap().as_ref(), b"[0.0][0.1][0.4]");
        // small timestamp jitter is not a gap
        let mut q = Packager::new(cfg());
        q.push_part(part_at(0, 0, false)).unwrap();
        let mut late = part_at(0, 1, false);
        late.start_ns += 100_000_000;
        q.push_part(late).unwrap();
        assert!(!q.render().contains("GAP"));
    }

    #[test]
    fn decimals_render_exactly() {
        assert_eq!(ms_decimal(334), "0.334");
        assert_eq!(ms_decimal(1002), "1.002");
        assert_eq!(ms_decimal(2000), "2");
        assert_eq!(secs(333_333_333), "0.33333");
        assert_eq!(secs(2_005_333_333), "2.00533");
        assert_eq!(secs(333_995_000), "0.33400");
    }
}
