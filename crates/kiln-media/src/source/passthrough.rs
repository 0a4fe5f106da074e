//! The passthrough rendition: the source's own H.264 access units, forwarded without re-encoding.
//!
//! ```text
//! source pipeline: parsebin → queue → h264parse ─ tee ┬ queue → decoder → … → appsink (frames, "vout")
//!                                  [IDR probe]       └ queue → h264parse → caps(avc/au) → appsink (AUs, "pout")
//! stream pipeline: appsrc "pin" → clocksync → [splitter] → cmafmux → appsink
//! ```
//! Both branches leave the source pipeline with the same running times, and the entry moves both by the input's
//! one offset, so a decoded frame and the access unit it came from keep one timestamp on the stream's timeline.
//!
//! The segment grid follows the source's IDRs: a probe on the parser (before the tee, so before the frame can be
//! decoded) notes each IDR's running time in the input; when that frame, decoded, enters the stream, its time on
//! the stream's timeline goes into [`SourceKeys`], and the encoded renditions' keyframe clocks may then force a
//! keyframe only on such a frame (the first at or after each grid point, [`kiln_llhls::plan::KeyframeClock::on_frame_if`]).
//! The passthrough rendition's splitter cuts on the same rule at the IDRs themselves, so every video rendition
//! starts segment N on the same frame. A GOP longer than the segment target makes segments as long as the GOP.
//!
//! Only the input that is on air from the stream's start feeds it: a stream with a passthrough rendition ends
//! when its source goes (the slate has no bitstream to forward yet; the plan refuses `on_source_loss: slate`).

use std::collections::VecDeque;

use super::*;

/// What the source's bitstream means for the stream's cuts, on the stream's timeline: where the source had its
/// IDRs, from when keyframes may fall only there, and the switch points where every video rendition keys and
/// starts a segment with `EXT-X-DISCONTINUITY` (every rendition: their discontinuity sequence numbers must match).
#[derive(Debug, Default)]
pub(crate) struct SourceKeys {
    segment_ns: u64,
    /// The source IDRs that open a segment ([`kiln_llhls::plan::gop_cut`], decided once for every rendition),
    /// and the last one (or switch point).
    keys: Mutex<VecDeque<u64>>,
    last_cut: Mutex<Option<u64>>,
    /// The last source IDR (or switch point, or the first frame the source fed the passthrough with).
    last_idr: Mutex<Option<u64>>,
    /// (from, constrained): from that time on, keyframes only on the source's IDRs (`true`: its bitstream feeds
    /// the passthrough rendition) or on any frame (`false`: the top encoded rendition does).
    modes: Mutex<VecDeque<(u64, bool)>>,
    switches: Mutex<VecDeque<u64>>,
}

/// Whether a frame may take a keyframe (see [`SourceKeys::gate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// The source's bitstream does not feed the passthrough rendition: the grid decides.
    Grid,
    /// The frame is the source IDR at this time, which opens a segment.
    At(u64),
    /// Not a cut IDR.
    No,
}

/// The longest a source may go without an IDR while its bitstream feeds the passthrough rendition (the longest
/// segment a plan allows): past it the top encoded rendition fills in until the next IDR.
const MAX_SOURCE_GOP_NS: u64 = 10_000_000_000;

impl SourceKeys {
    const KEPT: usize = 64;

    pub(crate) fn new(segment_ns: u64) -> Self {
        Self {
            segment_ns,
            ..Default::default()
        }
    }

    fn push(q: &Mutex<VecDeque<u64>>, t_ns: u64) {
        let mut k = q.lock();
        if k.len() == Self::KEPT {
            k.pop_front();
        }
        k.push_back(t_ns);
    }

    /// Whether the source's bitstream feeds the passthrough rendition at `t_ns` (keyframes only on its IDRs).
    pub(crate) fn constrained(&self, t_ns: u64, tolerance_ns: u64) -> bool {
        self.modes
            .lock()
            .iter()
            .rev()
            .find(|(from, _)| *from <= t_ns + tolerance_ns)
            .is_none_or(|(_, c)| *c)
    }

    /// Whether the frame at `t_ns` may take a keyframe: while the source's bitstream feeds the passthrough
    /// rendition, only the IDRs that open a segment, matched within `tolerance_ns` (a rendition's videorate stamps
    /// frames on its own grid, up to half a frame away) and answered with the IDR's own time, so every rendition
    /// decides on the same numbers.
    pub(crate) fn gate(&self, t_ns: u64, tolerance_ns: u64) -> Gate {
        if !self.constrained(t_ns, tolerance_ns) {
            return Gate::Grid;
        }
        let tol = tolerance_ns + GRID_SLACK_NS;
        match self
            .keys
            .lock()
            .iter()
            .rev()
            .find(|k| k.abs_diff(t_ns) <= tol)
        {
            Some(k) => Gate::At(*k),
            None => Gate::No,
        }
    }

    /// The source IDR at `t_ns` (its bitstream feeding the passthrough rendition): records it when it opens a
    /// segment.
    fn source_idr(&self, t_ns: u64) {
        *self.last_idr.lock() = Some(t_ns);
        let mut last = self.last_cut.lock();
        if kiln_llhls::plan::gop_cut(*last, t_ns, self.segment_ns) {
            *last = Some(t_ns);
            Self::push(&self.keys, t_ns);
        }
    }

    /// Whether the source feeding the passthrough rendition has gone past [`MAX_SOURCE_GOP_NS`] without an IDR
    /// at `t_ns`.
    fn gop_overdue(&self, t_ns: u64) -> bool {
        let mut last = self.last_idr.lock();
        let since = *last.get_or_insert(t_ns);
        t_ns > since + MAX_SOURCE_GOP_NS
    }

    /// The newest switch point after `handled` that the frame at `t_ns` has reached (within `tolerance_ns`).
    pub(crate) fn switch_due(
        &self,
        handled: Option<u64>,
        t_ns: u64,
        tolerance_ns: u64,
    ) -> Option<u64> {
        self.switches
            .lock()
            .iter()
            .rev()
            .find(|s| handled.is_none_or(|h| **s > h) && **s <= t_ns + tolerance_ns)
            .copied()
    }

    /// A switch point at `t_ns`: every rendition keys and opens a segment there; from it the source's IDRs
    /// gate keyframes (`constrained`) or the grid does.
    fn switch_at(&self, t_ns: u64, constrained: bool) {
        *self.last_cut.lock() = Some(t_ns);
        *self.last_idr.lock() = Some(t_ns);
        if constrained {
            Self::push(&self.keys, t_ns);
        }
        let mut m = self.modes.lock();
        if m.len() == Self::KEPT {
            m.pop_front();
        }
        m.push_back((t_ns, constrained));
        drop(m);
        Self::push(&self.switches, t_ns);
    }
}

/// What feeds the passthrough rendition.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Feed {
    /// The access units of the input on air (`PassTrack::generation`), from an IDR on.
    #[default]
    Source,
    /// The top encoded rendition's, from its first keyframe at or after `from` (the input on air has no
    /// bitstream to forward, or not yet an IDR): until `back` (the on-air source's first IDR), if set.
    Fill { from: u64, back: Option<u64> },
}

/// Where the passthrough track stands.
#[derive(Debug, Default)]
pub(super) struct PassTrack {
    feed: Feed,
    /// The input whose access units feed it (or will, from `back`).
    generation: u64,
    last_dts: Option<i64>,
    /// The first fill access unit went out (it must be a keyframe).
    fill_started: bool,
    /// The source feeds the track again but its IDR was not there: its access units wait for the next.
    need_key: bool,
    /// Access units of inputs that do not feed the track (not on air yet, or the fill does): per generation, from
    /// its latest IDR, on the input's own timeline (its offset is known once it is on air).
    pending: VecDeque<(u64, gst::Buffer, Option<gst::Caps>, Option<i64>)>,
    /// The offset of the input the fill hands back to (set with `Feed::Fill::back`).
    back_offset: i64,
}

/// At most this many access units wait for the fill to reach the source's IDR (a GOP of 10 s at 30 fps).
const PENDING_MAX: usize = 300;

impl Shared {
    /// An IDR passed the input's parser at running time `rt` (before it is decoded).
    fn note_idr(&self, rt: u64) {
        let mut q = self.idr_rt.lock();
        if q.len() == SourceKeys::KEPT {
            q.pop_front();
        }
        q.push_back(rt);
    }

    /// Whether the decoded frame at running time `rt` was an IDR; forgets the IDRs before it.
    pub(super) fn take_idr(&self, rt: u64) -> bool {
        let mut q = self.idr_rt.lock();
        while q.front().is_some_and(|k| *k + GRID_SLACK_NS < rt) {
            q.pop_front();
        }
        if q.front().is_some_and(|k| k.abs_diff(rt) <= GRID_SLACK_NS) {
            q.pop_front();
            return true;
        }
        false
    }
}

/// How far a decoded frame's time may sit from its access unit's (decoders keep PTS; 1 ms covers rounding).
const GRID_SLACK_NS: u64 = 1_000_000;

impl Entry {
    /// An input took over at `at` on the stream's timeline: the top encoded rendition feeds the passthrough
    /// rendition from its keyframe there, until the new input's first IDR (the slate has none).
    pub(super) fn pass_switch(&self, generation: u64, at: u64) {
        if self.pass_out.is_none() {
            return;
        }
        let mut track = self.pass.lock();
        // the inputs that will not take over any more: their waiting access units go
        track.pending.retain(|(g, ..)| *g >= generation);
        track.generation = generation;
        if let Feed::Fill { from, .. } = track.feed {
            // the fill goes on (same bitstream, same muxer): only the input it waits for changes
            track.feed = Feed::Fill { from, back: None };
            return;
        }
        track.feed = Feed::Fill {
            from: at,
            back: None,
        };
        track.fill_started = false;
        // another bitstream, another muxer: decode times start again
        track.last_dts = None;
        self.keys.switch_at(at, false);
    }

    /// Notes that the frame the input decoded at `rt` lands at `pts` on the stream's timeline (called for a
    /// frame on air, before it is pushed, so the keyframe clocks behind the tee can see it). The first IDR of
    /// an input that took over from another is where its bitstream takes the passthrough rendition back; a
    /// source that goes past [`MAX_SOURCE_GOP_NS`] without one is filled in for until its next.
    pub(super) fn note_key(&self, input: &Shared, rt: u64, pts: u64) {
        if self.pass_out.is_none() {
            return;
        }
        let idr = input.take_idr(rt);
        let mut track = self.pass.lock();
        match track.feed {
            Feed::Fill { from, back: None } if idr && track.generation == input.generation() => {
                track.back_offset = input.offset_ns.load(Ordering::SeqCst);
                track.feed = Feed::Fill {
                    from,
                    back: Some(pts),
                };
                self.keys.switch_at(pts, true);
            }
            Feed::Source if idr => self.keys.source_idr(pts),
            Feed::Source if self.keys.gop_overdue(pts) => {
                tracing::warn!(
                    at_ns = pts,
                    "no IDR from the source for 10 s: the top rendition fills in for the passthrough until its next"
                );
                drop(track);
                self.pass_switch(input.generation(), pts);
            }
            _ => {}
        }
    }

    /// Pushes one access unit of `input` (running times `rt_pts`, `rt_dts` in its pipeline) onto the stream's
    /// timeline, into the passthrough rendition. Only the input on air feeds it, from an IDR on; while the fill
    /// still feeds the track, its access units wait (from its latest IDR). An input not on air, or an access
    /// unit that would go backwards, is dropped.
    fn push_pass(
        &self,
        input: &Shared,
        mut buf: gst::Buffer,
        rt_pts: u64,
        rt_dts: Option<i64>,
        caps: Option<&gst::CapsRef>,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        if self.pass_out.is_none() || input.is_withdrawn() {
            return Ok(gst::FlowSuccess::Ok);
        }
        let generation = input.generation();
        // h264parse flags every I picture as a keyframe: only an IDR starts what a player can join
        if !buf.flags().contains(gst::BufferFlags::DELTA_UNIT) && !has_idr(&buf, 4) {
            buf.make_mut().set_flags(gst::BufferFlags::DELTA_UNIT);
        }
        let key = !buf.flags().contains(gst::BufferFlags::DELTA_UNIT);
        let mut track = self.pass.lock();
        let on_air = !input.is_standby() && generation == self.current();
        if !on_air || matches!(track.feed, Feed::Fill { .. }) {
            // kept on its own timeline until it feeds the track (an input about to take over: its IDR comes
            // before its first decoded frame)
            if generation < self.current() && !input.keep {
                return Ok(gst::FlowSuccess::Ok); // retired
            }
            buf.make_mut()
                .set_pts(gst::ClockTime::from_nseconds(rt_pts));
            if key {
                track.pending.retain(|(g, ..)| *g != generation);
            }
            let waiting = track.pending.iter().any(|(g, ..)| *g == generation);
            if !(key || waiting) {
                return Ok(gst::FlowSuccess::Ok);
            }
            if track.pending.len() >= PENDING_MAX {
                // room goes to this input: another's oldest waiting access units go first
                match track.pending.iter().position(|(g, ..)| *g != generation) {
                    Some(i) => {
                        let g = track.pending[i].0;
                        track.pending.retain(|(x, ..)| *x != g);
                    }
                    None => return Ok(gst::FlowSuccess::Ok),
                }
            }
            track
                .pending
                .push_back((generation, buf, caps.map(|c| c.to_owned()), rt_dts));
            return Ok(gst::FlowSuccess::Ok);
        }
        if (track.generation != generation || track.need_key) && !key {
            return Ok(gst::FlowSuccess::Ok); // a passthrough track starts on an IDR
        }
        let offset = input.offset_ns.load(Ordering::SeqCst);
        let pts = rt_pts as i64 + offset;
        let dts = rt_dts.map_or(pts, |d| d + offset);
        if pts < 0 || dts < 0 {
            return Ok(gst::FlowSuccess::Ok);
        }
        {
            let b = buf.make_mut();
            b.set_pts(gst::ClockTime::from_nseconds(pts as u64));
            b.set_dts(gst::ClockTime::from_nseconds(dts as u64));
        }
        // the track is this input's once an access unit of it went in (an IDR first)
        if self.push_locked(&mut track, buf, caps) {
            track.generation = generation;
            track.need_key = false;
        }
        Ok(gst::FlowSuccess::Ok)
    }

    /// One access unit of the top encoded rendition (its running time is the stream's): it feeds the
    /// passthrough rendition while the fill does, from its first keyframe; once it reaches the source's IDR the
    /// source's waiting access units take over.
    pub(crate) fn push_fill(
        &self,
        buf: &gst::Buffer,
        caps: Option<&gst::CapsRef>,
        tolerance_ns: u64,
    ) {
        if self.pass_out.is_none() {
            return;
        }
        let mut track = self.pass.lock();
        let Feed::Fill { from, back } = track.feed else {
            return;
        };
        let Some(pts) = buf.pts().map(|p| p.nseconds()) else {
            return;
        };
        // within half a frame of the rendition: its videorate stamps frames on its own grid, and its keyframe
        // probe keyed the frame nearest each switch point within that
        if pts + tolerance_ns < from {
            return;
        }
        if let Some(back) = back {
            if pts + tolerance_ns >= back {
                self.fill_back(&mut track, back);
                return;
            }
        }
        let key = !buf.flags().contains(gst::BufferFlags::DELTA_UNIT);
        if !track.fill_started && !key {
            return;
        }
        if self.push_locked(&mut track, buf.clone(), caps) {
            track.fill_started = true;
        }
    }

    /// The fill reached the source's IDR at `back`: the source's access units from there on (waiting on its own
    /// timeline, moved by its offset now) feed the track. Without its IDR among them, the next one starts it.
    fn fill_back(&self, track: &mut PassTrack, back: u64) {
        track.feed = Feed::Source;
        // another bitstream, another muxer: decode times start again (a B-frame source's IDR decodes before
        // the fill's last frame is shown)
        track.last_dts = None;
        let (generation, offset) = (track.generation, track.back_offset);
        let pending = std::mem::take(&mut track.pending);
        let mut started = false;
        for (g, mut b, caps, rt_dts) in pending {
            if g != generation {
                track.pending.push_back((g, b, caps, rt_dts));
                continue;
            }
            let Some(pts) = b.pts().map(|p| p.nseconds() as i64 + offset) else {
                continue;
            };
            let key = !b.flags().contains(gst::BufferFlags::DELTA_UNIT);
            if pts < 0 || (pts as u64) + GRID_SLACK_NS < back || (!started && !key) {
                continue;
            }
            let dts = rt_dts.map_or(pts, |d| d + offset);
            if dts < 0 {
                continue;
            }
            {
                let m = b.make_mut();
                m.set_pts(gst::ClockTime::from_nseconds(pts as u64));
                m.set_dts(gst::ClockTime::from_nseconds(dts as u64));
            }
            started |= self.push_locked(track, b, caps.as_deref());
        }
        track.need_key = !started;
    }

    /// Pushes `buf` into the passthrough entry (with `track` locked: pushes stay in order), unless its decode
    /// time would go backwards. Returns whether it went in.
    fn push_locked(
        &self,
        track: &mut PassTrack,
        buf: gst::Buffer,
        caps: Option<&gst::CapsRef>,
    ) -> bool {
        let Some(out) = &self.pass_out else {
            return false;
        };
        let dts = buf.dts().or(buf.pts()).map(|d| d.nseconds() as i64);
        if dts.is_none() || track.last_dts.is_some_and(|l| dts <= Some(l)) {
            return false;
        }
        track.last_dts = dts;
        if let Some(caps) = caps {
            if out.caps().as_deref() != Some(caps) {
                tracing::info!(%caps, "passthrough format");
                out.set_caps(Some(&caps.to_owned()));
            }
        }
        out.push_buffer(buf).is_ok()
    }
}

/// The source-side branch: after the tee, a parser that hands access units (`avc`, whole AUs, the form cmafmux
/// takes) to an appsink that pushes them into the stream's passthrough entry.
pub(super) fn branch(state: Arc<Shared>) -> Result<Vec<gst::Element>, MediaError> {
    let queue = make("queue", "pass-q")?;
    let parse = make("h264parse", "pass-parse")?;
    let caps = crate::elements::capsfilter(
        "pass-caps",
        gst::Caps::builder("video/x-h264")
            .field("stream-format", "avc")
            .field("alignment", "au")
            .build(),
    )?;
    let appsink = gst_app::AppSink::builder().name("pout").sync(false).build();
    // added while the source pipeline plays (see `bridge`)
    appsink.set_property("async", false);
    appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |s| {
                let sample = s.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                let Some(buf) = sample.buffer_owned() else {
                    return Ok(gst::FlowSuccess::Ok);
                };
                let Some(seg) = sample
                    .segment()
                    .and_then(|s| s.downcast_ref::<gst::ClockTime>().cloned())
                else {
                    return Ok(gst::FlowSuccess::Ok);
                };
                let Some(rt_pts) = buf.pts().and_then(|p| seg.to_running_time(p)) else {
                    return Ok(gst::FlowSuccess::Ok); // outside the segment
                };
                let rt_dts = buf
                    .dts()
                    .and_then(|d| seg.to_running_time_full(d))
                    .map(|d| match d {
                        gst::Signed::Positive(t) => t.nseconds() as i64,
                        gst::Signed::Negative(t) => -(t.nseconds() as i64),
                    });
                state
                    .entry
                    .push_pass(&state, buf, rt_pts.nseconds(), rt_dts, sample.caps())
            })
            .build(),
    );
    Ok(vec![queue, parse, caps, appsink.upcast()])
}

/// Notes the running time of every IDR that leaves `parser` (the one before the tee) in `state`.
pub(super) fn watch_idrs(parser: &gst::Element, state: Arc<Shared>) {
    let Some(pad) = parser.static_pad("src") else {
        return;
    };
    pad.add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
        let Some(buf) = info.buffer() else {
            return gst::PadProbeReturn::Ok;
        };
        if buf.flags().contains(gst::BufferFlags::DELTA_UNIT) {
            return gst::PadProbeReturn::Ok;
        }
        // `avc`: 4-byte lengths (what h264parse writes); `byte-stream`: start codes
        let avc = pad.current_caps().is_some_and(|c| {
            c.structure(0)
                .and_then(|s| s.get::<&str>("stream-format").ok())
                .is_some_and(|f| f.starts_with("avc"))
        });
        if !has_idr(buf, if avc { 4 } else { 0 }) {
            return gst::PadProbeReturn::Ok;
        }
        let rt = buf.pts().and_then(|p| {
            let ev = pad.sticky_event::<gst::event::Segment>(0)?;
            ev.segment()
                .downcast_ref::<gst::ClockTime>()?
                .to_running_time(p)
        });
        if let Some(rt) = rt {
            state.note_idr(rt.nseconds());
        }
        gst::PadProbeReturn::Ok
    });
}

/// Whether an H.264 access unit holds an IDR slice (NAL type 5): `length_size` 1-4 for length-prefixed NAL
/// units (`avc`), 0 for start codes (`byte-stream`).
pub(crate) fn has_idr(buf: &gst::BufferRef, length_size: usize) -> bool {
    let Ok(map) = buf.map_readable() else {
        return false;
    };
    let idr = nal_types(map.as_slice(), length_size).any(|t| t == 5);
    idr
}

/// The NAL unit types in `data` (see [`has_idr`]).
fn nal_types(data: &[u8], length_size: usize) -> impl Iterator<Item = u8> + '_ {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        if length_size == 0 {
            // the byte after the next 00 00 01
            let start = data.get(pos..)?.windows(3).position(|w| w == [0, 0, 1])? + pos + 3;
            pos = start;
            return data.get(start).map(|b| b & 0x1f);
        }
        let len_bytes = data.get(pos..pos + length_size)?;
        let len = len_bytes
            .iter()
            .fold(0usize, |a, b| (a << 8) | usize::from(*b));
        let header = *data.get(pos + length_size)?;
        pos += length_size + len;
        Some(header & 0x1f)
    })
}

/// Adds `head` (its last element a tee) and `branches` behind it to `pipeline`, then links `pad` to the head:
/// every branch is in place and playing before the first buffer reaches the tee.
pub(super) fn add_tree(
    pipeline: &gst::Pipeline,
    pad: &gst::Pad,
    head: &[gst::Element],
    branches: &[Vec<gst::Element>],
) -> Result<(), MediaError> {
    let tee = head.last().expect("a head ends with its tee");
    for b in branches {
        let refs: Vec<&gst::Element> = b.iter().collect();
        pipeline.add_many(refs.iter().copied())?;
        gst::Element::link_many(refs.iter().copied())
            .map_err(|e| MediaError::Build(format!("linking a source branch: {e}")))?;
    }
    let refs: Vec<&gst::Element> = head.iter().collect();
    pipeline.add_many(refs.iter().copied())?;
    gst::Element::link_many(refs.iter().copied())
        .map_err(|e| MediaError::Build(format!("linking the source chain: {e}")))?;
    for b in branches {
        tee.link(&b[0])
            .map_err(|e| MediaError::Build(format!("linking the source tee: {e}")))?;
    }
    for e in branches.iter().flat_map(|b| b.iter().rev()) {
        e.sync_state_with_parent()?;
    }
    for e in head.iter().rev() {
        e.sync_state_with_parent()?;
    }
    let first = head[0]
        .static_pad("sink")
        .expect("the chain head has a sink pad");
    pad.link(&first)
        .map_err(|e| MediaError::Build(format!("linking the parsed stream: {e:?}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_fall_on_cut_idrs_only_while_its_bitstream_feeds_the_passthrough() {
        let k = SourceKeys::new(2_000_000_000);
        // a 1 s GOP on a 2 s target: every second IDR opens a segment
        for i in 0..100u64 {
            k.source_idr(i * 1_000_000_000);
        }
        assert_eq!(
            k.gate(98_000_000_000 + 10_000_000, 16_000_000),
            Gate::At(98_000_000_000)
        );
        assert_eq!(k.gate(97_000_000_000, 16_000_000), Gate::No);
        assert_eq!(k.gate(98_000_000_000 + 20_000_000, 16_000_000), Gate::No);
        // overdue counts from the last IDR (99 s), not the last cut (98 s)
        assert!(k.gop_overdue(109_500_000_000) && !k.gop_overdue(108_500_000_000));
        // the fill from 199 s: the grid; the source back at 201 s: its IDRs again, that one opening a segment
        k.switch_at(199_000_000_000, false);
        k.switch_at(201_000_000_000, true);
        assert_eq!(k.gate(199_500_000_000, 16_000_000), Gate::Grid);
        assert_eq!(k.gate(201_000_000_000, 0), Gate::At(201_000_000_000));
        assert_eq!(k.gate(201_500_000_000, 16_000_000), Gate::No);
        assert_eq!(
            k.switch_due(None, 200_000_000_000, 0),
            Some(199_000_000_000)
        );
        assert_eq!(
            k.switch_due(Some(199_000_000_000), 200_000_000_000, 0),
            None
        );
        assert_eq!(
            k.switch_due(Some(199_000_000_000), 201_000_000_000, 0),
            Some(201_000_000_000)
        );
    }

    #[test]
    fn idr_slices_are_told_from_other_i_pictures() {
        // SPS, PPS, IDR slice — length-prefixed and with start codes
        let avc = [
            0, 0, 0, 2, 0x67, 0xaa, 0, 0, 0, 2, 0x68, 0xbb, 0, 0, 0, 3, 0x65, 1, 2,
        ];
        assert_eq!(nal_types(&avc, 4).collect::<Vec<_>>(), vec![7, 8, 5]);
        let annexb = [0, 0, 0, 1, 0x09, 0x10, 0, 0, 1, 0x41, 0x9a];
        assert_eq!(nal_types(&annexb, 0).collect::<Vec<_>>(), vec![9, 1]);
        if crate::init().is_ok() {
            let i_not_idr = gst::Buffer::from_slice([0u8, 0, 0, 2, 0x41, 0x88]);
            let idr = gst::Buffer::from_slice([0u8, 0, 0, 2, 0x65, 0x88]);
            assert!(!has_idr(&i_not_idr, 4) && has_idr(&idr, 4));
        }
        // truncated input ends the walk, never panics
        assert_eq!(
            nal_types(&[0, 0, 0, 9, 0x65], 4).collect::<Vec<_>>(),
            vec![5]
        );
        assert_eq!(nal_types(&[0, 0], 4).count(), 0);
    }
}
