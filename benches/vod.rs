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

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

fn kilnd_bin() -> Result<PathBuf> {
    let bin = std::env::var_os("KILND")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/kilnd"));
    ensure!(
        bin.exists(),
        "{} missing: cargo build --release -p kilnd",
        bin.display()
    );
    Ok(bin)
}

/// utime + stime of a process, in clock ticks (`/proc/{pid}/stat`), children included when `children`.
fn cpu_ticks(pid: u32, children: bool) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // after "pid (comm)": state, ppid, pgrp, session, tty, tpgid, flags, 4 fault counters, utime, stime,
            // cutime, cstime
            let f: Vec<i64> = s
                .rsplit(')')
                .next()?
                .split_whitespace()
                .skip(1)
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            let base = f.get(10)? + f.get(11)?;
            Some(
                (if children {
                    base + f.get(12)? + f.get(13)?
                } else {
                    base
                })
                .max(0) as u64,
            )
        })
        .unwrap_or(0)
}

const TICKS: f64 = 100.0;

fn main() -> Result<()> {
    let seconds: u32 = std::env::var("KILN_VOD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let dir = std::env::temp_dir().join(format!("kiln-vod-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("in"))?;
    let input = dir.join("in/1080p.mp4");
    let st = Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=1920x1080:rate=30",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:sample_rate=48000",
        ])
        .args([
            "-t",
            &seconds.to_string(),
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-b:v",
            "8M",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
        ])
        .arg(&input)
        .status()?;
    ensure!(st.success(), "making the input");
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
    let before = cpu_ticks(std::process::id(), true);
    let t = Instant::now();
    let st = Command::new("ffmpeg").args(&args).status()?;
    let ff_wall = t.elapsed().as_secs_f64();
    ensure!(st.success(), "ffmpeg anchor failed");
    // the child has been waited for: its times are in our children's counters
    let ff_cpu = (cpu_ticks(std::process::id(), true) - before) as f64 / TICKS;

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
    let before = cpu_ticks(std::process::id(), true);
    let t = Instant::now();
    let st = Command::new("gst-launch-1.0").args(&gst).status()?;
    let gst_wall = t.elapsed().as_secs_f64();
    ensure!(st.success(), "gst-launch anchor failed");
    let gst_cpu = (cpu_ticks(std::process::id(), true) - before) as f64 / TICKS;

    // kiln: a release daemon, the job over HTTP, polled until done
    let mut child = Command::new(kilnd_bin()?)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--no-gpu",
            "--vod-concurrency",
            "1",
            "--data-dir",
        ])
        .arg(dir.join("data"))
        .arg("--vod-input-dir")
        .arg(dir.join("in"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().context("stdout")?),
        &mut line,
    )?;
    let base = line
        .trim()
        .strip_prefix("kilnd listening on ")
        .context("kilnd address")?
        .to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let pid = child.id();
    let result = rt.block_on(async {
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
        loop {
            let v: serde_json::Value = serde_json::from_str(&http.get(format!("{base}/v1/jobs/{id}")).send().await?.text().await?)?;
            match v["state"].as_str() {
                Some("done") => break,
                Some("failed" | "cancelled") => bail!("kiln job: {v}"),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        Ok::<_, anyhow::Error>((t.elapsed().as_secs_f64(), (cpu_ticks(pid, false) - idle) as f64 / TICKS))
    });
    let _ = child.kill();
    let _ = child.wait();
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
