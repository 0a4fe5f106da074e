//! Advertised capacity against a measured ramp, with a bare-GStreamer anchor, all in one run on this host.
//!
//! 1. `kilnd calibrate --preset P` writes a CPU profile; a daemon started with it advertises `headroom[P]` streams.
//! 2. An independent ramp: a separate daemon whose profile books almost nothing (so admission never stops the
//!    ramp) gets one more stream of P over HTTP at each step; after a warm-up, a 15 s window measures every
//!    stream's media seconds from `/metrics` and the daemon's CPU from `/proc`. Reported: the largest count that
//!    keeps every stream at ≥ 0.98 × real time (one part of slack for the part in flight), and the largest that also stays within the 80 % CPU budget
//!    calibration uses. Goal: advertised within ±10 % of the latter.
//! 3. Anchor: the same ladder as bare `gst-launch-1.0` pipelines (test source → x264 per rendition → fakesink),
//!    unpaced, 4 at once: their aggregate throughput in "real-time streams" is what this host's x264 can do
//!    without kiln (no muxing, packaging, serving or CPU budget).
//!
//! Run with `benches/run` (builds kilnd --release first) or `cargo bench -p kiln-benches --bench capacity`.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kiln_integration::{cpu_ticks, kilnd_release_bin, spawn_kilnd, Proc};

const PRESET: &str = "live-360p-abr";

/// A release kilnd booking with the CPU profile at `profile`.
async fn start_kilnd(profile: &Path) -> Result<Proc> {
    let profile = profile.display().to_string();
    spawn_kilnd(
        "kilnd",
        kilnd_release_bin()?,
        &["--no-gpu", "--cpu-profile", &profile],
    )
    .await
}

async fn metrics(http: &reqwest::Client, base: &str) -> Result<String> {
    Ok(http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?)
}

/// Slowest rendition's media seconds per stream, from `/metrics`.
fn media_seconds(metrics: &str, streams: usize) -> Vec<f64> {
    (0..streams)
        .map(|i| {
            let tag = format!("stream=\"r{i}\"");
            metrics
                .lines()
                .filter(|l| l.starts_with("kiln_media_seconds_total{") && l.contains(&tag))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .fold(f64::MAX, f64::min)
        })
        .collect()
}

#[tokio::main]
async fn main() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("kiln-capacity-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let http = reqwest::Client::new();

    // 1. calibrate, then ask a daemon using the profile what it advertises
    let profile = dir.join("calibrated.toml");
    let t = Instant::now();
    let out = Command::new(kilnd_release_bin()?)
        .args([
            "--no-gpu",
            "calibrate",
            "--preset",
            PRESET,
            "--window-secs",
            "10",
            "--out",
        ])
        .arg(&profile)
        .output()?;
    ensure!(
        out.status.success(),
        "calibrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("calibrate took {:.0} s", t.elapsed().as_secs_f64());
    let advertised = {
        let k = start_kilnd(&profile).await?;
        let text = http
            .get(format!("{}/v1/capacity", k.url))
            .send()
            .await?
            .text()
            .await?;
        let cap: serde_json::Value = serde_json::from_str(&text)?;
        cap["headroom"][PRESET].as_u64().context("headroom")?
    };

    // 2. independent ramp on a daemon that books (almost) nothing
    let free = dir.join("free.toml");
    std::fs::write(
        &free,
        "name = \"bench-free\"\nstream_base_millicores = 1\nsource_millicores_per_mpx = 0.0001\n\
         x264_millicores_per_mpx = [0.0001, 0.0001, 0.0001, 0.0001, 0.0001, 0.0001]\naudio_millicores = 0\n\
         stream_base_memory_mib = 1\nmemory_mib_per_mpx = 0.0001\n",
    )?;
    let k = start_kilnd(&free).await?;
    let pid = k.pid();
    let body = format!(r#"{{"source": "test:pattern=ball", "preset": "{PRESET}"}}"#);
    let (mut at_realtime, mut in_budget) = (0usize, 0usize);
    println!("ramp of {PRESET} on {cores} cores (15 s windows):");
    for n in 1..=32usize {
        let res = http
            .put(format!("{}/v1/streams/r{}", k.url, n - 1))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await?;
        ensure!(res.status().is_success(), "PUT: {}", res.status());
        tokio::time::sleep(Duration::from_secs(5)).await; // warm-up of the new stream (part of the method)
        let m0 = media_seconds(&metrics(&http, &k.url).await?, n);
        let (t0, c0) = (Instant::now(), cpu_ticks(pid, false));
        tokio::time::sleep(Duration::from_secs(15)).await; // the measurement window
        let m1 = media_seconds(&metrics(&http, &k.url).await?, n);
        let wall = t0.elapsed().as_secs_f64();
        let cpu = (cpu_ticks(pid, false) - c0) as f64 * 10.0 / wall; // millicores (100 ticks/s)
        let ratio = m0
            .iter()
            .zip(&m1)
            .map(|(a, b)| (b - a) / wall)
            .fold(f64::MAX, f64::min);
        // media advances a part (334 ms) at a time: allow the one part a window can cut in flight
        let rt = ratio + 0.334 / wall >= 0.98;
        let budget = cpu <= 0.8 * cores * 1000.0;
        println!("  {n:2} streams: slowest {ratio:.3} x real time, kilnd {cpu:.0} millicores");
        if rt && at_realtime == n - 1 {
            at_realtime = n;
        }
        if rt && budget && in_budget == n - 1 {
            in_budget = n;
        }
        if !rt {
            break;
        }
    }
    drop(k);

    // 3. anchor: bare gst-launch pipelines of the same ladder, unpaced, 4 at once, 10 s of media each
    let anchor_procs = 4usize;
    let t = Instant::now();
    let children: Vec<Child> = (0..anchor_procs)
        .map(|_| {
            Command::new("gst-launch-1.0")
                .args(["-q", "videotestsrc", "pattern=ball", "num-buffers=300", "!"])
                .args([
                    "video/x-raw,format=I420,width=640,height=360,framerate=30/1",
                    "!",
                    "tee",
                    "name=t",
                ])
                .args([
                    "t.",
                    "!",
                    "queue",
                    "!",
                    "x264enc",
                    "speed-preset=superfast",
                    "tune=zerolatency",
                ])
                .args([
                    "bitrate=800",
                    "!",
                    "fakesink",
                    "t.",
                    "!",
                    "queue",
                    "!",
                    "videoconvertscale",
                    "!",
                ])
                .args([
                    "video/x-raw,width=320,height=180",
                    "!",
                    "x264enc",
                    "speed-preset=superfast",
                ])
                .args(["tune=zerolatency", "bitrate=300", "!", "fakesink"])
                .spawn()
        })
        .collect::<std::io::Result<_>>()?;
    for mut c in children {
        ensure!(c.wait()?.success(), "gst-launch failed");
    }
    let anchor_streams = anchor_procs as f64 * 10.0 / t.elapsed().as_secs_f64();

    println!("\n{PRESET} on this {cores}-core host");
    println!("  advertised after kilnd calibrate:            {advertised}");
    println!("  measured ramp, all streams at real time:     {at_realtime}");
    println!("  measured ramp, real time and ≤ 80 % CPU:     {in_budget}");
    println!(
        "  advertised / measured (within budget):       {:.2}  (goal 0.90–1.10)",
        advertised as f64 / in_budget.max(1) as f64
    );
    println!(
        "  anchor: bare gst-launch x264, 100 % CPU:     {anchor_streams:.1} real-time streams"
    );
    println!(
        "  kiln at real time / anchor:                  {:.2}",
        at_realtime as f64 / anchor_streams
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
