//! Streaming threads run below the server's priority (`kiln_media::priority`): a real pipeline's threads, read
//! back from `/proc`. Its own test binary: the setting is process-wide.

use std::time::{Duration, Instant};

use kiln_media::{pipeline::channel_sink, LivePipeline, MediaEvent};
use kiln_model::{EncoderSettings, Fraction, StreamPlan, Timing, VideoRendition, X264Speed};

/// `(name, nice)` of every thread of this process.
fn threads() -> Vec<(String, i32)> {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
        .filter_map(|stat| {
            let (head, rest) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1.to_string();
            // after the name: state is field 3, nice field 19
            let nice = rest.split_whitespace().nth(16)?.parse().ok()?;
            Some((name, nice))
        })
        .collect()
}

fn this_threads_nice() -> i32 {
    let me = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let rest = me.rsplit_once(')').unwrap().1;
    rest.split_whitespace().nth(16).unwrap().parse().unwrap()
}

#[test]
fn streaming_threads_run_below_the_server_and_the_caller_does_not() {
    if let Err(e) = kiln_media::init() {
        eprintln!("skipping: {e}");
        return;
    }
    let base = this_threads_nice();
    kiln_media::priority::set_streaming_nice(7);
    let plan = StreamPlan::new(
        "nice-test",
        "test:pattern=ball",
        vec![VideoRendition {
            name: "v".into(),
            width: 160,
            height: 90,
            fps: Fraction::new(30, 1),
            bitrate_kbps: 100,
            codec: Default::default(),
        }],
        None,
        Timing::default(),
        EncoderSettings {
            x264_speed: X264Speed::Ultrafast,
            ..Default::default()
        },
    )
    .unwrap();
    let (sink, rx) = channel_sink();
    let p = LivePipeline::build(&plan, sink).expect("pipeline builds");
    p.start().expect("pipeline starts");
    // a part out means every thread on its way (source, queue, encoder, muxer) has started
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left).expect("a part within 30 s") {
            MediaEvent::Part { .. } => break,
            MediaEvent::Error { message, .. } => panic!("pipeline error: {message}"),
            _ => {}
        }
    }
    let all = threads();
    p.stop();
    // GStreamer names a streaming thread after its pad (`vsrc:src`, `q-v:src`, …); the encoder's own threads
    // are started from one and carry its name
    let streaming: Vec<_> = all.iter().filter(|(n, _)| n.ends_with(":src")).collect();
    assert!(
        streaming.len() >= 3,
        "expected the source's, queue's and muxer's threads: {all:?}"
    );
    let target = (base + 7).min(19);
    for (name, nice) in &streaming {
        assert_eq!(*nice, target, "{name} (all: {all:?})");
    }
    assert_eq!(
        this_threads_nice(),
        base,
        "the thread that built the pipeline keeps its priority"
    );
}
