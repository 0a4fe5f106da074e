//! Where parts and segments begin: the buffer probes that send cmafmux's `FMP4MuxSplitNow` event before the first
//! buffer of each part (decided by the one clock of `kiln_llhls::plan`), and the force-key-unit requests at segment
//! boundaries that every encoder behind the tee receives.

use super::*;

/// The custom event that makes cmafmux (manual-split) start a new chunk (`chunk=true`) or fragment before the
/// next buffer.
pub(super) fn split_event(split: Split) -> gst::Event {
    gst::event::CustomDownstream::builder(
        gst::Structure::builder("FMP4MuxSplitNow")
            .field("chunk", split == Split::Part)
            .build(),
    )
    .build()
}

/// The running time of a buffer on `pad`, from the pad's sticky segment.
pub(super) fn running_time(pad: &gst::Pad, buf: &gst::BufferRef) -> Option<u64> {
    let pts = buf.pts().or(buf.dts())?;
    let ev = pad.sticky_event::<gst::event::Segment>(0)?;
    let seg = ev.segment().downcast_ref::<gst::ClockTime>()?;
    seg.to_running_time(pts).map(|t| t.nseconds())
}

/// Sends `FMP4MuxSplitNow` into the muxer ahead of the frames the splitter picks.
pub(super) fn add_split_probe<F>(pad: &gst::Pad, decide: F)
where
    F: FnMut(u64, bool) -> Option<Split> + Send + 'static,
{
    let decide = Mutex::new(decide);
    pad.add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
        let Some(buf) = info.buffer() else {
            return gst::PadProbeReturn::Ok;
        };
        let Some(rt) = running_time(pad, buf) else {
            return gst::PadProbeReturn::Ok;
        };
        let key = !buf.flags().contains(gst::BufferFlags::DELTA_UNIT);
        let split = (decide.lock())(rt, key);
        if let (Some(split), Some(peer)) = (split, pad.peer()) {
            peer.send_event(split_event(split));
        }
        nudge_timestamps(info);
        gst::PadProbeReturn::Ok
    });
}

/// Works around a rounding mismatch in cmafmux 0.14.5: it writes `tfdt` with a floor conversion to the track
/// timescale but sample durations with a rounding one. Sources stamp frames with floored nanoseconds
/// (30 fps frame 10 = 333 333 333 ns → tick 999.99… → 999 at timescale 3000, while ten 100-tick durations end at
/// 1000), so each part's `tfdt` would sit one tick before the previous part's end. Moving every timestamp 1 ns
/// later makes the floor land on the intended tick (1 ns is far below one tick at any timescale cmafmux picks),
/// so `tfdt(n+1) = tfdt(n) + Σ durations(n)` holds exactly.
pub(super) fn nudge_timestamps(info: &mut gst::PadProbeInfo) {
    if let Some(gst::PadProbeData::Buffer(ref mut buffer)) = info.data {
        let b = buffer.make_mut();
        let one = gst::ClockTime::from_nseconds(1);
        if let Some(p) = b.pts() {
            b.set_pts(p + one);
        }
        if let Some(d) = b.dts() {
            b.set_dts(d + one);
        }
    }
}

/// Forces a keyframe on the first frame at or after each segment grid point, by sending a downstream
/// force-key-unit event into the encoder just ahead of that frame. Every branch runs the same clock on the same
/// running times, so all renditions key the same frame. It sits right in front of the encoder because elements
/// before it may hold a frame back (videorate keeps one to decide on duplicates), which would let the event
/// overtake the frame it was meant for.
///
/// With `gate` (a stream with a passthrough rendition: the source's cuts, and the rendition's rate), only a frame
/// that was an IDR in the source may take the keyframe while the source's bitstream feeds the passthrough
/// rendition, and the first frame at or after each switch point takes one whatever the grid says.
pub(super) fn add_keyframe_probe(
    pad: &gst::Pad,
    segment_ns: u64,
    gate: Option<(Arc<crate::source::SourceKeys>, kiln_model::Fraction)>,
) {
    // half a frame of the rendition: its videorate stamps frames on its own grid
    let gate = gate.map(|(k, fps)| (k, kiln_model::stream::frames_to_ns(1, fps) / 2));
    // (clock, keys forced, the last switch point keyed)
    let clock = Mutex::new((KeyframeClock::new(segment_ns), 0u32, None::<u64>));
    pad.add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
        let Some(buf) = info.buffer() else {
            return gst::PadProbeReturn::Ok;
        };
        let Some(rt) = running_time(pad, buf) else {
            return gst::PadProbeReturn::Ok;
        };
        let mut st = clock.lock();
        let switch = gate
            .as_ref()
            .and_then(|(k, tol)| k.switch_due(st.2, rt, *tol));
        let key = if let Some(s) = switch {
            st.2 = Some(s);
            st.0.force(rt);
            true
        } else {
            use crate::source::Gate;
            match gate
                .as_ref()
                .map_or(Gate::Grid, |(k, tol)| k.gate(rt, *tol))
            {
                Gate::Grid => st.0.on_frame(rt),
                Gate::At(idr) => {
                    st.0.force(idr);
                    true
                }
                Gate::No => false,
            }
        };
        if key {
            st.1 += 1;
            // running-time NONE means "the next frame": the event travels in-band just ahead of this frame, so the
            // encoder keys exactly this frame. (A concrete running time is compared by GstVideoEncoder 1.22 against
            // its internal, min-pts-shifted frame times — x264enc adds 1000 h — and is then ignored.)
            let ev = gst_video::DownstreamForceKeyUnitEvent::builder()
                .timestamp(buf.pts())
                .running_time(gst::ClockTime::NONE)
                .all_headers(true)
                .count(st.1)
                .build();
            if let Some(peer) = pad.peer() {
                peer.send_event(ev);
            }
        }
        gst::PadProbeReturn::Ok
    });
}

/// What decides the cut before each frame: `(running time, keyframe)` → split.
pub(super) type Cuts = Box<dyn FnMut(u64, bool) -> Option<Split> + Send>;

/// A video rendition's cuts (`splitter`). In a stream with a passthrough rendition (`keys`; `tolerance_ns`: half a
/// frame) a segment also starts at the first keyframe at or after each switch point; an encoded rendition
/// (`passthrough` false) then opens one at every keyframe (its encoder keys only where a cut was decided), and the
/// passthrough rendition at the source IDRs that make a segment at least the target long, the same decision on the
/// same IDR times ([`kiln_llhls::plan::gop_cut`]), or at every keyframe of the fill.
pub(super) fn video_cuts(
    mut splitter: VideoSplitter,
    keys: Option<Arc<crate::source::SourceKeys>>,
    tolerance_ns: u64,
    passthrough: bool,
) -> impl FnMut(u64, bool) -> Option<Split> + Send + 'static {
    use kiln_llhls::plan::SegmentRule;
    let mut handled = None;
    move |rt, key| {
        let Some(k) = &keys else {
            return splitter.on_frame(rt, key);
        };
        if key {
            if let Some(s) = k.switch_due(handled, rt, tolerance_ns) {
                handled = Some(s);
                return splitter.force_segment(rt);
            }
        }
        let rule = if passthrough && k.constrained(rt, tolerance_ns) {
            SegmentRule::AfterTarget
        } else {
            SegmentRule::EveryKey
        };
        splitter.on_frame_by(rt, key, rule)
    }
}
