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

/// The stream-timeline times of the frames that were IDRs in the source (the newest [`SourceKeys::KEPT`]).
#[derive(Debug, Default)]
pub(crate) struct SourceKeys {
    keys: Mutex<VecDeque<u64>>,
}

impl SourceKeys {
    const KEPT: usize = 64;

    fn record(&self, t_ns: u64) {
        let mut k = self.keys.lock();
        if k.len() == Self::KEPT {
            k.pop_front();
        }
        k.push_back(t_ns);
    }

    /// Whether the frame at `t_ns` was an IDR in the source, within `tolerance_ns` (a rendition's videorate
    /// stamps frames on its own grid, up to half a frame away).
    pub(crate) fn is_key(&self, t_ns: u64, tolerance_ns: u64) -> bool {
        self.keys
            .lock()
            .iter()
            .rev()
            .any(|k| k.abs_diff(t_ns) <= tolerance_ns)
    }
}

/// Where the passthrough track stands: the input that feeds it and its last decode time.
#[derive(Debug, Default)]
pub(super) struct PassTrack {
    generation: u64,
    last_dts: Option<i64>,
}

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
    /// Notes that the frame the input decoded at `rt` lands at `pts` on the stream's timeline (called for a
    /// frame on air, before it is pushed, so the keyframe clocks behind the tee can see it).
    pub(super) fn note_key(&self, input: &Shared, rt: u64, pts: u64) {
        if self.pass_out.is_some() && input.take_idr(rt) {
            self.keys.record(pts);
        }
    }

    /// Pushes one access unit of `input` (running times `rt_pts`, `rt_dts` in its pipeline) onto the stream's
    /// timeline, into the passthrough rendition. Only the input on air feeds it, from an IDR on; an input that
    /// is not (yet) on air, or an access unit that would go backwards, is dropped.
    fn push_pass(
        &self,
        input: &Shared,
        mut buf: gst::Buffer,
        rt_pts: u64,
        rt_dts: Option<i64>,
        caps: Option<&gst::CapsRef>,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        let Some(out) = &self.pass_out else {
            return Ok(gst::FlowSuccess::Ok);
        };
        let generation = input.generation();
        if input.is_standby() || generation != self.current() {
            return Ok(gst::FlowSuccess::Ok);
        }
        let key = !buf.flags().contains(gst::BufferFlags::DELTA_UNIT);
        let mut track = self.pass.lock();
        if track.generation != generation {
            if !key {
                return Ok(gst::FlowSuccess::Ok); // a passthrough track starts on an IDR
            }
            track.generation = generation;
        }
        let offset = input.offset_ns.load(Ordering::SeqCst);
        let pts = rt_pts as i64 + offset;
        let dts = rt_dts.map_or(pts, |d| d + offset);
        if pts < 0 || dts < 0 || track.last_dts.is_some_and(|l| dts <= l) {
            return Ok(gst::FlowSuccess::Ok);
        }
        track.last_dts = Some(dts);
        {
            let b = buf.make_mut();
            b.set_pts(gst::ClockTime::from_nseconds(pts as u64));
            b.set_dts(gst::ClockTime::from_nseconds(dts as u64));
        }
        if let Some(caps) = caps {
            if out.caps().as_deref() != Some(caps) {
                tracing::info!(input = generation, %caps, "passthrough format");
                out.set_caps(Some(&caps.to_owned()));
            }
        }
        drop(track);
        out.push_buffer(buf).map(|_| gst::FlowSuccess::Ok)
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
    fn source_keys_match_within_the_tolerance_and_keep_the_newest() {
        let k = SourceKeys::default();
        for i in 0..100u64 {
            k.record(i * 2_000_000_000);
        }
        assert!(k.is_key(198_000_000_000 + 10_000_000, 16_000_000));
        assert!(!k.is_key(198_000_000_000 + 20_000_000, 16_000_000));
        // only the newest 64 are kept
        assert!(!k.is_key(0, 16_000_000));
        assert!(k.is_key(72_000_000_000, 0));
    }
}
