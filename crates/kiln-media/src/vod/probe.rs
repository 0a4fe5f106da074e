//! The probe: what an input holds (container, streams, codecs, size, rotation, duration), read before a job is
//! planned, and the refusals that come before any decoder runs (playlists, oversized or inflated headers).

use std::sync::Arc;
use std::time::Duration;

use gst::prelude::*;
use gst_pbutils::prelude::*;
use kiln_model::vod::{MAX_SOURCE_PIXELS, MAX_SOURCE_SIDE};
use parking_lot::Mutex;

use crate::elements::make;

/// What a probe found.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeInfo {
    pub duration_s: f64,
    pub video: Option<VideoProbe>,
    /// Every audio stream (the job encodes the first).
    pub audio: Vec<AudioProbe>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VideoProbe {
    /// Caps name, e.g. `video/x-h264`.
    pub codec: String,
    /// Display size (after rotation).
    pub width: u32,
    pub height: u32,
    pub fps: (u32, u32),
    /// Degrees clockwise from the rotation tag (0, 90, 180, 270).
    pub rotation: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AudioProbe {
    pub codec: String,
    pub channels: u32,
    pub sample_rate: u32,
}

const VIDEO_CODECS: &[&str] = &[
    "video/x-h264",
    "video/x-h265",
    "video/x-vp8",
    "video/x-vp9",
    "video/x-av1",
    "video/mpeg",
    "video/x-theora",
    "image/jpeg",
    "video/x-raw",
];
const AUDIO_CODECS: &[&str] = &[
    "audio/mpeg",
    "audio/x-opus",
    "audio/x-vorbis",
    "audio/x-ac3",
    "audio/x-eac3",
    "audio/x-flac",
    "audio/x-raw",
    "audio/x-alaw",
    "audio/x-mulaw",
];

fn caps_name(caps: Option<gst::Caps>) -> String {
    caps.and_then(|c| c.structure(0).map(|s| s.name().to_string()))
        .unwrap_or_else(|| "unknown".into())
}

fn rotation(tags: Option<gst::TagList>) -> u32 {
    let Some(tags) = tags else { return 0 };
    let Some(o) = tags.get::<gst::tags::ImageOrientation>() else {
        return 0;
    };
    match o.get() {
        "rotate-90" | "flip-rotate-90" => 90,
        "rotate-180" | "flip-rotate-180" => 180,
        "rotate-270" | "flip-rotate-270" => 270,
        _ => 0,
    }
}

/// Refuses a local file that GStreamer's type finders call a playlist: probing or decoding it would plug an
/// adaptive demuxer that fetches every URL in it with its own client, past the daemon's address policy.
fn refuse_playlist_file(uri: &str) -> Result<(), String> {
    let Some(path) = uri.strip_prefix("file://") else {
        return Ok(());
    };
    let path = gst::glib::filename_from_uri(uri)
        .map(|(p, _)| p)
        .unwrap_or_else(|_| path.into());
    let mut head = vec![0u8; 64 << 10];
    let n = std::fs::File::open(&path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .map_err(|e| format!("cannot read the input: {e}"))?;
    head.truncate(n);
    if let Ok(caps) = gst_base::functions::type_find_helper_for_data(None::<&gst::Object>, &head) {
        let name = caps
            .0
            .structure(0)
            .map(|s| s.name().to_string())
            .unwrap_or_default();
        if crate::source::PLAYLIST_CAPS.contains(&name.as_str()) {
            return Err(format!(
                "the input is a playlist ({name}), not media: submit the media file itself"
            ));
        }
    }
    Ok(())
}

/// How long reading the stream headers may take.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The coded bytes one stream's queue may hold while the header read waits for the other streams ([`add_sink`]).
const HEADER_QUEUE_BYTES: u32 = 8 << 20;

/// The buffers one stream's queue may hold (each costs a few hundred bytes beside its data, which
/// [`HEADER_QUEUE_BYTES`] does not count): 10,000 is over three minutes of AAC frames.
const HEADER_QUEUE_BUFFERS: u32 = 10_000;

/// Streams (by id) and the video sizes seen on each, in order.
type Seen = Arc<Mutex<Vec<(String, Vec<(u32, u32)>)>>>;

/// Adds the size in `caps` (and, for H.264 with an `avcC`, the SPS's coded size) to the stream of `pad`: the
/// demuxer's pad and the parser's pad of one stream share its stream id.
fn record_size(sizes: &Seen, pad: &gst::Pad, caps: &gst::Caps) {
    let Some(st) = caps.structure(0).filter(|s| s.name().starts_with("video/")) else {
        return;
    };
    let w = st.get::<i32>("width").unwrap_or(0).max(0) as u32;
    let h = st.get::<i32>("height").unwrap_or(0).max(0) as u32;
    // what the H.264 SPS in an avcC declares (h264parse keeps the container's size in its caps)
    let sps = st
        .get::<gst::Buffer>("codec_data")
        .ok()
        .filter(|_| st.name() == "video/x-h264")
        .and_then(|b| {
            let map = b.map_readable().ok()?;
            kiln_model::vod::h264::avcc_coded_size(map.as_slice())
        });
    let id = pad.stream_id().map(|s| s.to_string()).unwrap_or_default();
    let mut v = sizes.lock();
    let i = match v.iter().position(|(s, _)| *s == id) {
        Some(i) => i,
        None => {
            v.push((id, Vec::new()));
            v.len() - 1
        }
    };
    for size in std::iter::once((w, h)).chain(sps) {
        if v[i].1.last() != Some(&size) {
            v[i].1.push(size);
        }
    }
}

/// What [`header_sizes`] read.
#[derive(Debug, Default)]
struct Headers {
    /// The video sizes per stream, in the order GStreamer met them.
    sizes: Vec<Vec<(u32, u32)>>,
    /// Why the read ended before every stream reached its sink (a timeout, an error), or `None`: then `sizes` has
    /// every stream's. Checked either way; the Discoverer that runs next reports what it cannot read.
    incomplete: Option<String>,
}

/// Adds a `queue ! fakesink` for the parsed stream on `pad`. The queue is what lets every stream preroll: the
/// demuxer pushes all streams from one thread, and a stream's sink blocks that thread once it holds its first
/// buffer, so without a queue the next stream never reaches its own sink and the preroll waits out its timeout
/// (an audio + video file did, 10 s per job, until 2026-12-02). The queue holds the coded data that arrives
/// meanwhile, bounded in bytes and buffers but not in time (a poorly interleaved file can need more than a second
/// of one stream): [`HEADER_QUEUE_BYTES`] is about a second of 60 Mb/s video. A hostile file whose one stream starts
/// late fills the others' queues to that bound, and the read then ends on its timeout, checked with what was read,
/// as before the queue.
fn add_sink(pipeline: &gst::Pipeline, pad: &gst::Pad) -> Result<(), String> {
    let name = pad.name();
    let queue = make("queue", &format!("hqueue-{name}")).map_err(|e| e.to_string())?;
    queue.set_property("max-size-time", 0u64);
    queue.set_property("max-size-buffers", HEADER_QUEUE_BUFFERS);
    queue.set_property("max-size-bytes", HEADER_QUEUE_BYTES);
    let sink = make("fakesink", &format!("hsink-{name}")).map_err(|e| e.to_string())?;
    sink.set_property("sync", false);
    pipeline
        .add_many([&queue, &sink])
        .map_err(|e| e.to_string())?;
    queue.link(&sink).map_err(|e| e.to_string())?;
    for e in [&sink, &queue] {
        e.sync_state_with_parent().map_err(|e| e.to_string())?;
    }
    let sp = queue.static_pad("sink").ok_or("a queue has a sink pad")?;
    pad.link(&sp).map_err(|e| e.to_string())?;
    Ok(())
}

/// The video sizes an input's headers declare, per stream, in the order GStreamer meets them: the container's
/// (the demuxer's caps), then the parser's (the codec's own header: the H.264/HEVC SPS). Reads with `parsebin`
/// only, so no decoder allocates a picture: a stream declaring 16000x16000 is refused from its header at once.
fn header_sizes(uri: &str, timeout: Duration) -> Result<Headers, String> {
    let pipeline = gst::Pipeline::with_name("kiln-vod-header");
    let src = gst::Element::make_from_uri(gst::URIType::Src, uri, Some("hsrc"))
        .map_err(|e| format!("cannot read the input: {e}"))?;
    let parse = make("parsebin", "hparse").map_err(|e| e.to_string())?;
    pipeline
        .add_many([&src, &parse])
        .map_err(|e| e.to_string())?;
    src.link(&parse).map_err(|e| e.to_string())?;
    let sizes: Seen = Arc::default();
    let record = record_size;
    let seen = sizes.clone();
    parse.connect("autoplug-continue", false, move |args| {
        let pad = args.get(1).and_then(|v| v.get::<gst::Pad>().ok());
        let caps = args.get(2).and_then(|v| v.get::<gst::Caps>().ok());
        if let (Some(pad), Some(caps)) = (pad, caps) {
            record(&seen, &pad, &caps);
        }
        Some(true.to_value())
    });
    let seen = sizes.clone();
    let weak = pipeline.downgrade();
    parse.connect_pad_added(move |_, pad| {
        if let Some(caps) = pad.current_caps() {
            record(&seen, pad, &caps);
        }
        if let Some(p) = weak.upgrade() {
            // a stream whose sink could not be added holds nothing: its caps were recorded above
            if let Err(e) = add_sink(&p, pad) {
                tracing::warn!(pad = %pad.name(), "header read: no sink for a stream: {e}");
            }
        }
    });
    let bus = pipeline.bus().expect("a pipeline has a bus");
    pipeline
        .set_state(gst::State::Paused)
        .map_err(|e| format!("cannot read the input: {e}"))?;
    // prerolled (every stream has a buffer at its fakesink), failed, or out of time
    let end = bus.timed_pop_filtered(
        gst::ClockTime::from_nseconds(timeout.as_nanos() as u64),
        &[gst::MessageType::AsyncDone, gst::MessageType::Error],
    );
    let _ = pipeline.set_state(gst::State::Null);
    let sizes: Vec<Vec<(u32, u32)>> = sizes.lock().iter().map(|(_, v)| v.clone()).collect();
    match end.as_ref().map(|m| m.view()) {
        Some(gst::MessageView::Error(e)) if sizes.is_empty() => {
            Err(format!("cannot read the input: {}", e.error()))
        }
        Some(gst::MessageView::AsyncDone(_)) => Ok(Headers {
            sizes,
            incomplete: None,
        }),
        // the Discoverer that runs next reports everything else
        Some(gst::MessageView::Error(e)) => Ok(Headers {
            sizes,
            incomplete: Some(format!("the read failed: {}", e.error())),
        }),
        _ => Ok(Headers {
            sizes,
            incomplete: Some(format!("not every stream was read within {timeout:?}")),
        }),
    }
}

/// Probes `uri` (`file:///…` or `http(s)://…`) within `timeout`: container, streams, codecs, size, rotation,
/// duration. Refuses what kiln does not transcode: a playlist (the demuxer would fetch what it names), headers that
/// declare more than 8K or more than their container ([`header_sizes`]), no video and no audio, a codec outside the
/// allowlist, no duration.
// Long by design: the Discoverer result read field by field into the typed probe, with a refusal per limit.
pub fn probe(uri: &str, timeout: Duration) -> Result<ProbeInfo, String> {
    crate::init().map_err(|e| e.to_string())?;
    refuse_playlist_file(uri)?;
    let limit = timeout.min(HEADER_TIMEOUT);
    let headers = header_sizes(uri, limit)?;
    if let Some(why) = &headers.incomplete {
        tracing::warn!("the input's headers, checked as far as they were read: {why}");
    }
    for stream in headers.sizes {
        kiln_model::vod::check_header_sizes(&stream).map_err(|e| e.to_string())?;
    }
    let d = gst_pbutils::Discoverer::new(gst::ClockTime::from_nseconds(timeout.as_nanos() as u64))
        .map_err(|e| format!("probe: {e}"))?;
    let info = d
        .discover_uri(uri)
        .map_err(|e| format!("cannot read the input: {e}"))?;
    let video = info.video_streams();
    let audio = info.audio_streams();
    for v in &video {
        let c = caps_name(v.caps());
        if !VIDEO_CODECS.contains(&c.as_str()) {
            return Err(format!("video codec `{c}` is not supported (supported: H.264, H.265, VP8, VP9, AV1, MPEG-1/2/4, Theora, MJPEG, raw)"));
        }
    }
    for a in &audio {
        let c = caps_name(a.caps());
        if !AUDIO_CODECS.contains(&c.as_str()) {
            return Err(format!("audio codec `{c}` is not supported (supported: AAC, MP3, Opus, Vorbis, AC-3, E-AC-3, FLAC, PCM)"));
        }
    }
    match info.result() {
        gst_pbutils::DiscovererResult::Ok => {}
        gst_pbutils::DiscovererResult::MissingPlugins => {
            return Err(format!(
                "no decoder on this host for the input: {}",
                info.missing_elements_installer_details().join(", ")
            ))
        }
        gst_pbutils::DiscovererResult::Timeout => {
            return Err(format!("probing the input took longer than {timeout:?}"))
        }
        r => return Err(format!("the input is not a readable media file ({r:?})")),
    }
    if video.is_empty() && audio.is_empty() {
        return Err("the input has neither video nor audio".into());
    }
    let duration_s = info.duration().map_or(0.0, |d| d.nseconds() as f64 / 1e9);
    if duration_s <= 0.0 {
        return Err("the input has no duration (not a finished file?)".into());
    }
    let video = video.first().map(|v| {
        let rot = rotation(v.tags());
        let (w, h) = (v.width(), v.height());
        let (w, h) = if rot == 90 || rot == 270 {
            (h, w)
        } else {
            (w, h)
        };
        let f = v.framerate();
        VideoProbe {
            codec: caps_name(v.caps()),
            width: w,
            height: h,
            fps: (f.numer().max(0) as u32, f.denom().max(1) as u32),
            rotation: rot,
        }
    });
    if let Some(v) = &video {
        if v.width == 0 || v.height == 0 {
            return Err("the video stream has no size".into());
        }
        if v.width > MAX_SOURCE_SIDE
            || v.height > MAX_SOURCE_SIDE
            || u64::from(v.width) * u64::from(v.height) > MAX_SOURCE_PIXELS
        {
            return Err(format!(
                "the video is {}x{}: larger than kiln accepts ({MAX_SOURCE_SIDE} a side, {MAX_SOURCE_PIXELS} pixels)",
                v.width, v.height
            ));
        }
    }
    Ok(ProbeInfo {
        duration_s,
        video,
        audio: audio
            .iter()
            .map(|a| AudioProbe {
                codec: caps_name(a.caps()),
                channels: a.channels(),
                sample_rate: a.sample_rate(),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2 s, 640x360 H.264 + AAC MP4 written by ffmpeg, its tracks in the order `maps` gives (`0` video, `1` audio).
    fn av_mp4(name: &str, maps: &[&str]) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("kiln-probe-{}-{name}.mp4", std::process::id()));
        let mut cmd = std::process::Command::new("ffmpeg");
        cmd.args([
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=640x360:rate=30",
        ])
        .args(["-f", "lavfi", "-i", "sine=sample_rate=48000", "-t", "2"]);
        for m in maps {
            cmd.args(["-map", m]);
        }
        let st = cmd
            .args(["-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac"])
            .arg(&path)
            .status()
            .expect("ffmpeg runs");
        assert!(st.success(), "ffmpeg: {st}");
        path
    }

    /// Every stream of an audio + video file reaches its sink, whichever track comes first: the header read ends
    /// on the preroll within its timeout (without a queue per stream it never prerolls), with the video size read.
    #[test]
    fn the_headers_of_every_stream_are_read_whichever_track_leads() {
        crate::init().unwrap();
        for (name, maps) in [
            ("video-first", ["0:v", "1:a"]),
            ("audio-first", ["1:a", "0:v"]),
        ] {
            let path = av_mp4(name, &maps);
            let uri = format!("file://{}", path.display());
            let h = header_sizes(&uri, HEADER_TIMEOUT);
            let _ = std::fs::remove_file(&path);
            let h = h.unwrap();
            assert!(
                h.incomplete.is_none(),
                "{name}: the preroll did not complete: {h:?}"
            );
            assert!(
                h.sizes.iter().any(|s| s.first() == Some(&(640, 360))),
                "{name}: the video stream's size was not read: {h:?}"
            );
        }
    }
}
