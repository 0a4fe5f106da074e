//! VOD transcode: kiln against ffmpeg doing the same ladder, measured in the same run.
//!
//! Input: a 1080p30 H.264/AAC clip made by ffmpeg (moving test pattern, 20 s by default, `KILN_VOD_SECONDS`).
//! - kiln: a release `kilnd` (`KILND`, default `target/release/kilnd`) runs the job with the `vod-1080p-abr` preset
//!   (1080p 4.5 Mb/s, 720p 2.5, 480p 1.2, 360p 0.7, x264 `medium`, 4 s GOP without scene cuts or B-frames, AAC
//!   128 kb/s), plus HLS/DASH manifests and thumbnails;
//! - anchor: one ffmpeg process decodes once, splits, scales and encodes the same four renditions with libx264 at the
//!   same settings (`medium`, bitrate, GOP, no scene cut, no B-frames) plus AAC, into fragmented MP4 files;
//! - second anchor: one bare `gst-launch-1.0` with the elements kiln links, into fakesinks (splits kiln's overhead
//!   into GStreamer's and kiln's own).
//!
//! Printed: wall time and CPU time (user + system, the whole process) of each, and the ratios.
//! Run: `cargo build --release -p kilnd && cargo bench -p kiln-benches --bench vod`.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kiln_integration::{cpu_ticks, kilnd_release_bin, make_clip, spawn_kilnd, wait_job};

const TICKS: f64 = 100.0;

/// Runs an anchor to the end; returns its wall and CPU seconds (once waited for, a child's times are in our
/// children's counters).
fn run_measured(program: &str, args: &[String]) -> Result<(f64, f64)> {
    let before = cpu_ticks(std::process::id(), true);
    let t = Instant::now();
    let st = Command::new(program).args(args).status()?;
    let wall = t.elapsed().as_secs_f64();
    ensure!(st.success(), "{program} (anchor) failed: {st}");
    let cpu = (cpu_ticks(std::process::id(), true) - before) as f64 / TICKS;
    Ok((wall, cpu))
}

fn main() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let seconds: u32 = std::env::var("KILN_VOD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let dir = std::env::temp_dir().join(format!("kiln-vod-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("in"))?;
    let input = dir.join("in/1080p.mp4");
    rt.block_on(make_clip(
        &input,
        f64::from(seconds),
        Some("testsrc2=size=1920x1080:rate=30"),
        &["sine=frequency=440:sample_rate=48000"],
        &[
            "-c:v", "libx264", "-preset", "veryfast", "-b:v", "8M", "-pix_fmt", "yuv420p", "-c:a",
            "aac",
        ],
    ))
    .context("making the input")?;
    println!("## VOD ladder: {seconds} s of 1080p30 → 1080p/720p/480p/360p (x264 medium) + AAC\n");

    // anchor: ffmpeg, one decode, the same ladder and settings
    let ladder = [
        (1920, 1080, 4500),
        (1280, 720, 2500),
        (852, 480, 1200),
        (640, 360, 700),
    ];
    let mut args: Vec<String> = vec![
        "-v".into(),
        "error".into(),
        "-y".into(),
        "-i".into(),
        input.display().to_string(),
    ];
    let mut graph = format!("[0:v]split={}", ladder.len());
    for i in 0..ladder.len() {
        graph.push_str(&format!("[s{i}]"));
    }
    for (i, (w, h, _)) in ladder.iter().enumerate() {
        graph.push_str(&format!(";[s{i}]scale={w}:{h}[v{i}]"));
    }
    args.extend(["-filter_complex".into(), graph]);
    for (i, (_, _, kbps)) in ladder.iter().enumerate() {
        for a in [
            "-map".to_string(),
            format!("[v{i}]"),
            "-c:v".into(),
            "libx264".into(),
            "-preset".into(),
            "medium".into(),
            "-b:v".into(),
            format!("{kbps}k"),
            "-g".into(),
            "120".into(),
            "-keyint_min".into(),
            "120".into(),
            "-sc_threshold".into(),
            "0".into(),
            "-bf".into(),
            "0".into(),
            "-movflags".into(),
            "+frag_keyframe+empty_moov+default_base_moof".into(),
            dir.join(format!("ff{i}.mp4")).display().to_string(),
        ] {
            args.push(a);
        }
    }
    for a in [
        "-map",
        "0:a",
        "-c:a",
        "aac",
        "-b:a",
        "128k",
        "-movflags",
        "+frag_keyframe+empty_moov+default_base_moof",
    ] {
        args.push(a.into());
    }
    args.push(dir.join("ff-audio.mp4").display().to_string());
    let (ff_wall, ff_cpu) = run_measured("ffmpeg", &args)?;

    // second anchor: the same elements kiln links (avdec_h264 → tee → videoscale → videoconvert → x264enc with
    // kiln's properties, AAC), as one bare gst-launch-1.0 with fakesinks: no muxing, no files, no thumbnails.
    // kiln / this = kiln's own overhead; this / ffmpeg = GStreamer's.
    let mut gst: Vec<String> = vec![
        "-q".into(),
        "filesrc".into(),
        format!("location={}", input.display()),
        "!".into(),
        "qtdemux".into(),
        "name=d".into(),
        "d.video_0".into(),
        "!".into(),
        "queue".into(),
        "!".into(),
        "h264parse".into(),
        "!".into(),
        "avdec_h264".into(),
        "!".into(),
        "tee".into(),
        "name=t".into(),
    ];
    for (w, h, kbps) in &ladder {
        for a in [
            "t.".to_string(),
            "!".into(),
            "queue".into(),
            "!".into(),
            "videoscale".into(),
            "!".into(),
            "videoconvert".into(),
            "!".into(),
            format!("video/x-raw,format=I420,width={w},height={h},pixel-aspect-ratio=1/1"),
            "!".into(),
            "x264enc".into(),
            format!("bitrate={kbps}"),
            "speed-preset=medium".into(),
            "key-int-max=120".into(),
            "bframes=0".into(),
            "option-string=scenecut=0:open-gop=0".into(),
            "!".into(),
            "h264parse".into(),
            "!".into(),
            "fakesink".into(),
            // no preroll wait: x264's lookahead holds frames while the audio sink would block the demuxer
            "async=false".into(),
        ] {
            gst.push(a);
        }
    }
    for a in [
        "d.audio_0",
        "!",
        "queue",
        "!",
        "aacparse",
        "!",
        "avdec_aac",
        "!",
        "audioconvert",
        "!",
        "audioresample",
        "!",
        "avenc_aac",
        "bitrate=128000",
        "!",
        "fakesink",
        "async=false",
    ] {
        gst.push(a.into());
    }
    let (gst_wall, gst_cpu) = run_measured("gst-launch-1.0", &gst)?;

    // kiln: a release daemon, the job over HTTP, polled until done
    let result = rt.block_on(async {
        let (data, inp) = (dir.join("data"), dir.join("in"));
        let (data, inp) = (data.display().to_string(), inp.display().to_string());
        let args = [
            "--no-gpu",
            "--vod-concurrency",
            "1",
            "--data-dir",
            &data,
            "--vod-input-dir",
            &inp,
        ];
        let kilnd = spawn_kilnd("kilnd", kilnd_release_bin()?, &args).await?;
        let (base, pid) = (kilnd.url.clone(), kilnd.pid());
        let http = reqwest::Client::new();
        let idle = cpu_ticks(pid, false);
        let t = Instant::now();
        let r = http
            .post(format!("{base}/v1/jobs"))
            .body(serde_json::json!({"input": format!("file://{}", input.display()), "preset": "vod-1080p-abr"}).to_string())
            .header("content-type", "application/json")
            .send()
            .await?;
        let v: serde_json::Value = serde_json::from_str(&r.text().await?)?;
        let id = v["id"].as_str().context("job id")?.to_string();
        // x264 medium on four rungs: generously bounded at 30 × real time
        let limit = Duration::from_secs(60 + 30 * u64::from(seconds));
        let v = wait_job(&http, &base, &id, limit).await?;
        ensure!(v["state"] == "done", "kiln job: {v}");
        let cpu = (cpu_ticks(pid, false) - idle) as f64 / TICKS;
        Ok::<_, anyhow::Error>((t.elapsed().as_secs_f64(), cpu))
    });
    let (kiln_wall, kiln_cpu) = result?;
    println!("| | wall s | CPU s | × real time |");
    println!("|---|---|---|---|");
    println!(
        "| ffmpeg (anchor) | {ff_wall:.1} | {ff_cpu:.1} | {:.2} |",
        f64::from(seconds) / ff_wall
    );
    println!(
        "| bare gst-launch, same elements (anchor) | {gst_wall:.1} | {gst_cpu:.1} | {:.2} |",
        f64::from(seconds) / gst_wall
    );
    println!(
        "| kiln | {kiln_wall:.1} | {kiln_cpu:.1} | {:.2} |",
        f64::from(seconds) / kiln_wall
    );
    println!(
        "\nkiln / ffmpeg: wall {:.2}, CPU {:.2}",
        kiln_wall / ff_wall,
        kiln_cpu / ff_cpu
    );
    println!(
        "kiln / bare gst-launch: wall {:.2}, CPU {:.2}; bare gst-launch / ffmpeg: wall {:.2}, CPU {:.2}",
        kiln_wall / gst_wall,
        kiln_cpu / gst_cpu,
        gst_wall / ff_wall,
        gst_cpu / ff_cpu
    );
    println!("(kiln's figures include HLS/DASH manifests and thumbnails; CPU is the whole daemon process)");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
