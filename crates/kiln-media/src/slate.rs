//! The slate: what a stream shows while its source is gone. A picture at the stream's source size and rate (dark,
//! with a line of text saying the source is unavailable) and silence, from a pipeline of its own that feeds the
//! stream's entry points like any input. It is not live: it runs as fast as the entry points' pacers take its
//! frames, so its timestamps follow the stream's clock.

use std::sync::Arc;

use gst::prelude::*;
use kiln_model::StreamPlan;

use crate::elements::{capsfilter, make};
use crate::source::{bridge, EncodedSource, Entry, InputKind, Shared};
use crate::{EventSink, MediaError, MediaEvent};

/// The slate's colour (ARGB): a dark blue-grey, far from any test picture a publisher sends.
const SLATE_ARGB: u32 = 0xff1c_2430;
/// What the slate says.
const SLATE_TEXT: &str = "Source unavailable — back soon";

/// Builds the slate's pipeline for `plan`'s stream, feeding `entry` from its first frame on.
pub(crate) fn build(
    entry: &Arc<Entry>,
    plan: &StreamPlan,
    sink: EventSink,
) -> Result<EncodedSource, MediaError> {
    let state = Arc::new(Shared::new(
        InputKind::Slate,
        entry,
        false,
        false,
        sink.clone(),
    ));
    let pipeline =
        gst::Pipeline::with_name(&format!("kiln-{}-slate-{}", plan.id, state.generation()));
    if entry.video_out.is_some() {
        add_picture(&pipeline, plan, &state)?;
    }
    if entry.audio_out.is_some() {
        add_silence(&pipeline, &state)?;
    }
    let st = state.clone();
    pipeline
        .bus()
        .expect("a pipeline has a bus")
        .set_sync_handler(move |_, msg| {
            crate::priority::on_message(msg);
            if let (true, gst::MessageView::Error(e)) = (st.live(), msg.view()) {
                sink(MediaEvent::Error {
                    element: msg.src().map(|s| s.path_string().to_string()),
                    message: e.error().to_string(),
                    debug: e.debug().map(|d| d.to_string()),
                });
            }
            gst::BusSyncReply::Drop
        });
    Ok(EncodedSource::from_parts(pipeline, state))
}

/// videotestsrc (the slate's colour) → caps (the stream's source size and rate) → textoverlay → appsink.
fn add_picture(
    pipeline: &gst::Pipeline,
    plan: &StreamPlan,
    state: &Arc<Shared>,
) -> Result<(), MediaError> {
    let (w, h) = plan.source_size();
    let fps = plan
        .video
        .first()
        .map(|v| v.fps)
        .unwrap_or(kiln_model::Fraction { num: 30, den: 1 });
    let src = make("videotestsrc", "slate-v")?;
    src.set_property_from_str("pattern", "solid-color");
    src.set_property("foreground-color", SLATE_ARGB);
    let text = make("textoverlay", "slate-text")?;
    text.set_property("text", SLATE_TEXT);
    text.set_property_from_str("valignment", "center");
    text.set_property_from_str("halignment", "center");
    text.set_property("font-desc", format!("Sans {}", (h / 18).max(8)));
    let caps = capsfilter(
        "slate-caps",
        gst::Caps::builder("video/x-raw")
            .field("format", "I420")
            .field("width", w as i32)
            .field("height", h as i32)
            .field(
                "framerate",
                gst::Fraction::new(fps.num as i32, fps.den as i32),
            )
            .field("pixel-aspect-ratio", gst::Fraction::new(1, 1))
            .build(),
    )?;
    let conv = make("videoconvert", "slate-convert")?;
    let out = bridge("slate-vout", true, state.clone());
    let chain = [&src, &caps, &text, &conv, &out];
    pipeline.add_many(chain)?;
    gst::Element::link_many(chain)
        .map_err(|e| MediaError::Build(format!("linking the slate picture: {e}")))?;
    Ok(())
}

/// Silence, 48 kHz stereo in 20 ms buffers → appsink.
fn add_silence(pipeline: &gst::Pipeline, state: &Arc<Shared>) -> Result<(), MediaError> {
    let src = make("audiotestsrc", "slate-a")?;
    src.set_property_from_str("wave", "silence");
    // 20 ms buffers
    src.set_property("samplesperbuffer", 960i32);
    let caps = capsfilter(
        "slate-acaps",
        gst::Caps::builder("audio/x-raw")
            .field("format", "S16LE")
            .field("rate", 48_000i32)
            .field("channels", 2i32)
            .field("layout", "interleaved")
            .build(),
    )?;
    let out = bridge("slate-aout", false, state.clone());
    let chain = [&src, &caps, &out];
    pipeline.add_many(chain)?;
    gst::Element::link_many(chain)
        .map_err(|e| MediaError::Build(format!("linking the slate sound: {e}")))?;
    Ok(())
}
