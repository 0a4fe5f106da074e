//! VOD jobs end to end: inputs made by ffmpeg at test time, a real daemon, real pipelines, outputs checked by
//! ffprobe and decoded by ffmpeg (HLS and DASH). Bad inputs fail with a reason and leave other jobs alone; a
//! daemon killed with -9 finishes every job after a restart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kiln_integration::{
    make_clip, poll_json, poll_until, spawn_kilnd, wait_job, Daemon, Polled, H264, H264_AAC,
};
use serde_json::{json, Value};

const KILND: &str = env!("CARGO_BIN_EXE_kiln-it-kilnd");

/// A fresh scratch directory for test `name` and its `in/` folder (inputs).
fn scratch(name: &str) -> Result<(PathBuf, PathBuf)> {
    let d = std::env::temp_dir().join(format!("kiln-vod-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("in"))?;
    Ok((d.clone(), d.join("in")))
}

/// The end of a test that passed: its daemon stopped, its scratch directory removed (kept when a test fails).
async fn finish(d: Daemon, dir: &Path) -> Result<()> {
    d.shutdown().await?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// A 30 fps H.264/AAC test clip of `size` (`WxH`).
async fn av_clip(path: &Path, seconds: f64, size: &str) -> Result<()> {
    let video = format!("testsrc2=size={size}:rate=30");
    make_clip(
        path,
        seconds,
        Some(&video),
        &["sine=sample_rate=48000"],
        H264_AAC,
    )
    .await
}

/// A daemon running VOD jobs with their data in `dir/{data}` and inputs from `dir/in`; `tweak` changes the rest.
async fn vod_daemon(
    dir: &Path,
    data: &str,
    tweak: impl FnOnce(&mut kilnd::jobs::JobsConfig),
) -> Result<Daemon> {
    let mut jobs = kilnd::jobs::JobsConfig::new(dir.join(data));
    jobs.input_dir = Some(dir.join("in"));
    tweak(&mut jobs);
    Daemon::start(kilnd::Config {
        jobs: Some(jobs),
        ..Default::default()
    })
    .await
}

/// Sets the first track header's (the video track's) transformation matrix to a 90° clockwise rotation.
fn rotate_90(path: &Path) -> Result<()> {
    let mut d = std::fs::read(path)?;
    let at = d.windows(4).position(|w| w == b"tkhd").context("no tkhd")?;
    let version = d[at + 4];
    // after the type: version+flags (4), times and ids (20 or 32), reserved (8), layer..reserved (8)
    let matrix = at + 4 + 4 + if version == 1 { 32 } else { 20 } + 8 + 8;
    let m: [u32; 9] = [0, 0x0001_0000, 0, 0xFFFF_0000, 0, 0, 0, 0, 0x4000_0000];
    for (i, v) in m.iter().enumerate() {
        d[matrix + 4 * i..matrix + 4 * i + 4].copy_from_slice(&v.to_be_bytes());
    }
    std::fs::write(path, d)?;
    Ok(())
}

/// The first frame, as ffmpeg displays it, in 90×160 gray.
async fn gray_frame(input: &str) -> Result<Vec<u8>> {
    let o = tokio::process::Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-i",
            input,
            "-frames:v",
            "1",
            "-vf",
            "scale=90:160,format=gray",
            "-f",
            "rawvideo",
            "-",
        ])
        .output()
        .await?;
    ensure!(
        o.status.success() && o.stdout.len() == 90 * 160,
        "ffmpeg frame of {input}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(o.stdout)
}

async fn ffprobe(args: &[&str]) -> Result<Value> {
    let o = tokio::process::Command::new("ffprobe")
        .args(["-v", "error", "-of", "json"])
        .args(args)
        .output()
        .await?;
    ensure!(
        o.status.success(),
        "ffprobe {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(serde_json::from_slice(&o.stdout)?)
}

/// Decodes every stream of `url` to the end; fails on any decode error.
async fn ffmpeg_decodes(url: &str) -> Result<()> {
    let o = tokio::process::Command::new("ffmpeg")
        .args([
            "-v", "error", "-xerror", "-i", url, "-map", "0", "-f", "null", "-",
        ])
        .output()
        .await?;
    ensure!(
        o.status.success(),
        "ffmpeg could not decode {url}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

/// An HTTP server on 127.0.0.1:0 serving the files of `dir` by name, and `/redirect?to=URL` (302 to URL).
async fn serve_dir(dir: &Path) -> Result<String> {
    use axum::extract::{Path as UrlPath, Query};
    use axum::http::{header, StatusCode};
    use axum::response::{IntoResponse, Redirect, Response};
    let dir = dir.to_path_buf();
    let app = axum::Router::new()
        .route(
            "/redirect",
            axum::routing::get(
                |Query(q): Query<std::collections::HashMap<String, String>>| async move {
                    Redirect::to(q.get("to").map_or("/", String::as_str)).into_response()
                },
            ),
        )
        .route(
            "/{name}",
            axum::routing::get(move |UrlPath(name): UrlPath<String>| {
                let dir = dir.clone();
                async move {
                    let ok = !name.contains(['/', '\\']) && !name.starts_with('.');
                    match std::fs::read(dir.join(&name)) {
                        Ok(b) if ok => ([(header::CONTENT_TYPE, "video/mp4")], b).into_response(),
                        _ => StatusCode::NOT_FOUND.into_response(),
                    }
                    .into_response() as Response
                }
            }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", l.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    Ok(url)
}

async fn submit(http: &reqwest::Client, base: &str, body: Value) -> Result<String> {
    let r = http
        .post(format!("{base}/v1/jobs"))
        .json(&body)
        .send()
        .await?;
    let status = r.status();
    let v: Value = r.json().await?;
    ensure!(status == 201, "submit {body}: {status} {v}");
    Ok(v["id"].as_str().context("id")?.to_string())
}

struct Expect {
    file: &'static str,
    /// (width, height) per rendition, in ladder order.
    sizes: Vec<(u64, u64)>,
    frames: u64,
    audio: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_common_input_becomes_a_checked_ladder() -> Result<()> {
    let (dir, inp) = scratch("ladder")?;
    let tone = "sine=frequency=440:sample_rate=48000";
    // h264/aac mp4, 480p: two rungs of vod-1080p-abr (480p, 360p)
    make_clip(
        &inp.join("h264.mp4"),
        4.0,
        Some("testsrc2=size=854x480:rate=30"),
        &[tone],
        H264_AAC,
    )
    .await?;
    // vp9/opus webm at 25 fps: output keeps 25 fps (never more frames than the source)
    make_clip(
        &inp.join("vp9.webm"),
        3.0,
        Some("testsrc2=size=640x360:rate=25"),
        &[tone],
        &[
            "-c:v",
            "libvpx-vp9",
            "-deadline",
            "realtime",
            "-cpu-used",
            "8",
            "-c:a",
            "libopus",
        ],
    )
    .await?;
    // hevc in mkv, with two audio tracks (the first is encoded)
    make_clip(
        &inp.join("hevc.mkv"),
        3.0,
        Some("testsrc2=size=640x360:rate=30"),
        &[tone, "sine=frequency=880:sample_rate=44100"],
        &[
            "-c:v",
            "libx265",
            "-preset",
            "ultrafast",
            "-x265-params",
            "log-level=error",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
        ],
    )
    .await?;
    // no audio
    make_clip(
        &inp.join("silent.mp4"),
        3.0,
        Some("testsrc2=size=640x360:rate=30"),
        &[],
        H264,
    )
    .await?;
    // portrait by rotation: coded 640x360, displayed 360x640 (a phone's way). ffmpeg 5.1 cannot write a display
    // matrix, so the track header's matrix is set to a 90° rotation after the fact.
    make_clip(
        &inp.join("rotated.mp4"),
        3.0,
        Some("testsrc2=size=640x360:rate=30"),
        &[tone],
        H264_AAC,
    )
    .await?;
    rotate_90(&inp.join("rotated.mp4"))?;
    // odd resolution (VP9 allows it): rounded down to even, never up
    make_clip(
        &inp.join("odd.webm"),
        3.0,
        Some("testsrc2=size=641x359:rate=30"),
        &[],
        &[
            "-c:v",
            "libvpx-vp9",
            "-deadline",
            "realtime",
            "-cpu-used",
            "8",
        ],
    )
    .await?;
    // MPEG-TS and QuickTime containers
    for f in ["h264.ts", "h264.mov"] {
        make_clip(
            &inp.join(f),
            2.0,
            Some("testsrc2=size=640x360:rate=30"),
            &[tone],
            H264_AAC,
        )
        .await?;
    }
    // (input, (width, height) per rendition in ladder order, frames, audio)
    let cases: Vec<Expect> = [
        ("h264.mp4", &[(854, 480), (640, 360)][..], 120, true),
        ("vp9.webm", &[(640, 360)], 75, true),
        ("hevc.mkv", &[(640, 360)], 90, true),
        ("silent.mp4", &[(640, 360)], 90, false),
        ("rotated.mp4", &[(360, 640)], 90, true),
        ("h264.ts", &[(640, 360)], 60, true),
        ("h264.mov", &[(640, 360)], 60, true),
        ("odd.webm", &[(640, 358)], 90, false),
    ]
    .into_iter()
    .map(|(file, sizes, frames, audio)| Expect {
        file,
        sizes: sizes.to_vec(),
        frames,
        audio,
    })
    .collect();
    let d = vod_daemon(&dir, "data", |j| {
        j.max_concurrent = 2;
    })
    .await?;
    let mut ids = Vec::new();
    for c in &cases {
        let input = format!("file://{}", inp.join(c.file).display());
        ids.push(
            submit(
                &d.http,
                &d.base,
                json!({"input": input, "x264_speed": "veryfast", "thumbnail_interval_s": 1}),
            )
            .await?,
        );
    }
    for (c, id) in cases.iter().zip(&ids) {
        let st = wait_job(&d.http, &d.base, id, Duration::from_secs(180)).await?;
        ensure!(st["state"] == "done", "{}: {st}", c.file);
        ensure!(
            st["progress"] == 1.0 && st["speed"].as_f64().unwrap_or(0.0) > 0.0,
            "{}: {st}",
            c.file
        );
        let renditions = st["renditions"].as_array().context("renditions")?;
        let sizes: Vec<(u64, u64)> = renditions
            .iter()
            .map(|r| (r["width"].as_u64().unwrap(), r["height"].as_u64().unwrap()))
            .collect();
        ensure!(
            sizes == c.sizes,
            "{}: ladder {sizes:?}, expected {:?}",
            c.file,
            c.sizes
        );
        for r in renditions {
            let url = d.url(r["playlist"].as_str().unwrap());
            let p = ffprobe(&[
                "-count_frames",
                "-select_streams",
                "v:0",
                "-show_entries",
                "stream=codec_name,width,height,nb_read_frames",
                &url,
            ])
            .await?;
            let s = &p["streams"][0];
            ensure!(s["codec_name"] == "h264", "{}: {p}", c.file);
            ensure!(
                (s["width"].as_u64(), s["height"].as_u64())
                    == (r["width"].as_u64(), r["height"].as_u64()),
                "{}: {p}",
                c.file
            );
            let frames: u64 = s["nb_read_frames"].as_str().unwrap_or("0").parse()?;
            ensure!(
                frames.abs_diff(c.frames) <= 1,
                "{} {}: {frames} frames, source has {}",
                c.file,
                r["name"],
                c.frames
            );
        }
        // upright frames, and no rotation left in the output for players to apply again
        let top = d.url(renditions[0]["playlist"].as_str().unwrap());
        let side = ffprobe(&[
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream_side_data=rotation",
            &top,
        ])
        .await?;
        ensure!(
            !side.to_string().contains("rotation"),
            "{}: output still carries a rotation: {side}",
            c.file
        );
        if c.file == "rotated.mp4" {
            // the first frame as ffmpeg displays the source (it applies the matrix) against ours
            let src = gray_frame(&inp.join(c.file).display().to_string()).await?;
            let ours = gray_frame(&top).await?;
            let mad = src
                .iter()
                .zip(&ours)
                .map(|(a, b)| u64::from(a.abs_diff(*b)))
                .sum::<u64>() as f64
                / src.len() as f64;
            ensure!(mad < 20.0, "rotated.mp4: the output's first frame differs from the upright source by {mad:.1} per pixel");
        }
        let master = d.url(st["links"]["master"].as_str().context("master")?);
        let text = d.http.get(&master).send().await?.text().await?;
        ensure!(
            text.contains("mp4a.40.2") == c.audio,
            "{}: audio in master: {text}",
            c.file
        );
        let media = d
            .http
            .get(d.url(renditions[0]["playlist"].as_str().unwrap()))
            .send()
            .await?
            .text()
            .await?;
        ensure!(
            media.contains("#EXT-X-PLAYLIST-TYPE:VOD")
                && media.trim_end().ends_with("#EXT-X-ENDLIST"),
            "{media}"
        );
        ffmpeg_decodes(&master).await?;
        ffmpeg_decodes(&d.url(st["links"]["mpd"].as_str().context("mpd")?)).await?;
        // thumbnails: one per second of video, in the sprite and the WebVTT index
        let expected = kiln_model::vod::thumbnail_count(
            c.frames as f64 / if c.file == "vp9.webm" { 25.0 } else { 30.0 },
            1,
        );
        ensure!(
            st["thumbnails"].as_u64() == Some(u64::from(expected)),
            "{}: {} thumbnails, expected {expected}",
            c.file,
            st["thumbnails"]
        );
        let vtt = d
            .http
            .get(d.url(st["links"]["thumbnails_vtt"].as_str().context("vtt")?))
            .send()
            .await?
            .text()
            .await?;
        ensure!(
            vtt.matches("sprite.jpg#xywh=").count() == expected as usize,
            "{}: {vtt}",
            c.file
        );
        for l in ["poster", "sprite"] {
            let b = d
                .http
                .get(d.url(st["links"][l].as_str().context("image")?))
                .send()
                .await?
                .bytes()
                .await?;
            ensure!(
                b.starts_with(&[0xFF, 0xD8]),
                "{}: {l} is not a JPEG",
                c.file
            );
        }
    }
    // the capacity planner's view: jobs by state, media transcoded
    let m = d.http.get(d.url("/metrics")).send().await?.text().await?;
    ensure!(m.contains("kiln_vod_jobs{state=\"done\"} 8"), "{m}");
    let media: f64 = m
        .lines()
        .find(|l| l.starts_with("kiln_vod_media_seconds_total "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .context("kiln_vod_media_seconds_total")?;
    ensure!(
        (media - 23.0).abs() < 0.5,
        "media seconds {media}, expected 4 + 5 × 3 + 2 × 2"
    );
    // no path outside a job's directory can be named
    for bad in [
        "/vod/../jobs/x",
        "/vod/x/..%2F..%2Fetc",
        &format!("/vod/{}/..", ids[0]),
    ] {
        let r = d.http.get(d.url(bad)).send().await?;
        ensure!(r.status() == 404, "{bad}: {}", r.status());
    }
    finish(d, &dir).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_fail_with_a_reason_and_other_jobs_finish() -> Result<()> {
    let (dir, inp) = scratch("bad")?;
    av_clip(&inp.join("good.mp4"), 3.0, "640x360").await?;
    std::fs::write(inp.join("empty.mp4"), b"")?;
    let good = std::fs::read(inp.join("good.mp4"))?;
    // no faststart: the moov is at the end, so the first half has none
    std::fs::write(inp.join("truncated.mp4"), &good[..good.len() / 2])?;
    let mut x: u64 = 0x2545F4914F6CDD1D;
    let garbage: Vec<u8> = (0..200_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(inp.join("garbage.mp4"), garbage)?;
    // a playlist is not media: probing it would plug hlsdemux, which fetches what it names with its own client
    std::fs::write(
        inp.join("list.m3u8"),
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\nhttp://10.1.2.3/seg0.ts\n#EXT-X-ENDLIST\n",
    )?;
    make_clip(
        &inp.join("ffv1.mkv"),
        1.0,
        Some("testsrc2=size=320x240:rate=30"),
        &[],
        &["-c:v", "ffv1"],
    )
    .await?;
    // the adversarial decode bomb's shape: a track whose container entry (stsd avc1 width/height) says 64x64 while
    // its SPS declares more (here 640x360; the file had 7680x4320)
    let mut inflated = good.clone();
    let stsd = inflated
        .windows(4)
        .position(|w| w == b"stsd")
        .context("an stsd box")?;
    let at = stsd
        + inflated[stsd..]
            .windows(4)
            .position(|w| w == b"avc1")
            .context("an avc1 sample entry")?;
    anyhow::ensure!(
        inflated[at + 28..at + 32] == [2, 0x80, 1, 0x68],
        "640x360 where expected"
    );
    // after the fourcc: reserved (6), data reference index (2), pre-defined/reserved (16), then width and height
    inflated[at + 28..at + 32].copy_from_slice(&[0, 64, 0, 64]);
    std::fs::write(inp.join("inflated.mp4"), inflated)?;
    // a real 8K picture: its decode and ladder need more memory than one job may use by default
    make_clip(
        &inp.join("8k.mp4"),
        0.1,
        Some("color=c=gray:size=7680x4320:rate=10"),
        &[],
        &[
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
        ],
    )
    .await?;
    // pictures that grow mid-file past the size the probe read (and admission booked): 320x180, then 1280x720
    let ts = [
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",
        "-f",
        "mpegts",
    ];
    make_clip(
        &inp.join("small.ts"),
        1.0,
        Some("testsrc2=size=320x180:rate=30"),
        &[],
        &ts,
    )
    .await?;
    make_clip(
        &inp.join("large.ts"),
        1.0,
        Some("testsrc2=size=1280x720:rate=30"),
        &[],
        &ts,
    )
    .await?;
    let mut grow = std::fs::read(inp.join("small.ts"))?;
    grow.extend(std::fs::read(inp.join("large.ts"))?);
    std::fs::write(inp.join("grow.ts"), grow)?;
    make_clip(
        &inp.join("huge.mp4"),
        0.2,
        Some("color=c=gray:size=8400x64:rate=10"),
        &[],
        H264,
    )
    .await?;
    // longer than this daemon's limit (5 s here, 12 h by default): refused from the probe, before decoding
    make_clip(
        &inp.join("long.mp4"),
        6.0,
        Some("color=c=gray:size=160x90:rate=10"),
        &[],
        H264,
    )
    .await?;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    // http(s) inputs: a server on loopback, which this daemon allows (127.0.0.1 only; the default is none)
    let web = serve_dir(&inp).await?;
    let loopback = kiln_model::net::UrlPolicy::parse("127.0.0.1/32")?;
    let d = vod_daemon(&dir, "data", |j| {
        j.max_concurrent = 2;
        j.url_policy = loopback;
        j.max_duration_s = 5;
    })
    .await?;
    let f = |n: &str| format!("file://{}", inp.join(n).display());
    let bad = [
        (f("empty.mp4"), "empty"),
        (f("long.mp4"), "longer than the 5 s one job may transcode"),
        (f("truncated.mp4"), ""),
        (f("garbage.mp4"), ""),
        (f("list.m3u8"), "is a playlist (application/x-hls)"),
        (f("ffv1.mkv"), "not supported"),
        // refused from the stream header, before any decoder runs
        (
            f("huge.mp4"),
            "the stream header declares 8400x64: larger than kiln accepts",
        ),
        (
            f("inflated.mp4"),
            "the container says the video is 64x64 but its stream header declares 640x368",
        ),
        (f("8k.mp4"), "more than the 1024 MiB one job may use"),
        (f("grow.ts"), "grew to 1280x720 mid-file"),
        (format!("http://127.0.0.1:{closed}/a.mp4"), "refused"),
        (format!("{web}/nothing-here.mp4"), "404"),
        (format!("{web}/garbage.mp4"), ""),
        // server-side request forgery: internal addresses, directly, by name, or through a redirect
        (
            "http://169.254.169.254/latest/meta-data/".to_string(),
            "169.254.169.254 is a link-local address",
        ),
        (
            format!("http://[::1]:{closed}/a.mp4"),
            "::1 is a loopback address",
        ),
        (
            format!("{web}/redirect?to=http://10.1.2.3/a.mp4"),
            "10.1.2.3 is a private address",
        ),
        (f("missing.mp4"), "No such file"),
        (
            "file:///etc/hostname".to_string(),
            "outside the input directory",
        ),
    ];
    let mut ids = Vec::new();
    for (input, _) in &bad {
        ids.push(
            submit(
                &d.http,
                &d.base,
                json!({"input": input, "x264_speed": "veryfast"}),
            )
            .await?,
        );
    }
    let good_id = submit(
        &d.http,
        &d.base,
        json!({"input": f("good.mp4"), "x264_speed": "veryfast", "priority": -1}),
    )
    .await?;
    // the same file over http, through a redirect
    let good_http = submit(
        &d.http,
        &d.base,
        json!({"input": format!("{web}/redirect?to=/good.mp4"), "x264_speed": "veryfast", "priority": -1}),
    )
    .await?;
    // malformed requests are refused at submit time
    for body in [
        json!({"input": "ftp://x/y"}),
        json!({"input": "file://relative"}),
        json!({"input": f("good.mp4"), "preset": "nope"}),
        json!({"inputt": "x"}),
    ] {
        let r = d.http.post(d.url("/v1/jobs")).json(&body).send().await?;
        ensure!(r.status() == 400, "{body}: {}", r.status());
    }
    for ((input, reason), id) in bad.iter().zip(&ids) {
        let st = wait_job(&d.http, &d.base, id, Duration::from_secs(60)).await?;
        ensure!(st["state"] == "failed", "{input}: {st}");
        let err = st["error"].as_str().unwrap_or("");
        ensure!(
            !err.is_empty() && err.contains(reason),
            "{input}: error `{err}` should say `{reason}`"
        );
        eprintln!("{input}: {err}");
    }
    let st = wait_job(&d.http, &d.base, &good_id, Duration::from_secs(120)).await?;
    ensure!(st["state"] == "done", "the good job: {st}");
    ffmpeg_decodes(&d.url(st["links"]["master"].as_str().unwrap())).await?;
    // the list filters by state and limits
    let failed: Value = d
        .http
        .get(d.url("/v1/jobs?state=failed"))
        .send()
        .await?
        .json()
        .await?;
    let failed = failed.as_array().context("list")?;
    ensure!(
        failed.len() == bad.len() && failed.iter().all(|j| j["state"] == "failed"),
        "?state=failed: {} jobs",
        failed.len()
    );
    let one: Value = d
        .http
        .get(d.url("/v1/jobs?state=failed&limit=1"))
        .send()
        .await?
        .json()
        .await?;
    ensure!(one.as_array().map(Vec::len) == Some(1), "limit=1: {one}");
    for q in ["state=bogus", "limit=0", "limit=x"] {
        let st = d
            .http
            .get(d.url(&format!("/v1/jobs?{q}")))
            .send()
            .await?
            .status();
        ensure!(st == 400, "?{q}: {st}");
    }
    let st = wait_job(&d.http, &d.base, &good_http, Duration::from_secs(120)).await?;
    let size = std::fs::metadata(inp.join("good.mp4"))?.len();
    ensure!(
        st["state"] == "done" && st["input_bytes"] == size && st["input_total_bytes"] == size,
        "the good job over http: {st}"
    );
    ffmpeg_decodes(&d.url(st["links"]["master"].as_str().unwrap())).await?;
    ensure!(
        std::fs::read_dir(dir.join("data").join("inputs"))?.count() == 0,
        "downloads are deleted when their jobs end"
    );
    let (_, metrics) = d.get_text("/metrics").await?;
    ensure!(
        metrics
            .lines()
            .any(|l| l.starts_with("kiln_vod_input_bytes_total ")
                && l.split(' ').nth(1).and_then(|v| v.parse::<f64>().ok()) >= Some(size as f64)),
        "kiln_vod_input_bytes_total counts the download"
    );
    // cancel: a queued job is cancelled; a finished one cannot be
    let r = d
        .http
        .delete(d.url(&format!("/v1/jobs/{good_id}")))
        .send()
        .await?;
    ensure!(r.status() == 409, "cancel after done: {}", r.status());
    finish(d, &dir).await
}

/// kill -9 with jobs queued and running; the restarted daemon (same data directory) finishes all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_survive_kill_9() -> Result<()> {
    let (dir, inp) = scratch("restart")?;
    av_clip(&inp.join("clip.mp4"), 10.0, "854x480").await?;
    let data = dir.join("data");
    let (data, inp_s) = (data.display().to_string(), inp.display().to_string());
    let argv = [
        "--data-dir",
        &data,
        "--vod-input-dir",
        &inp_s,
        "--vod-concurrency",
        "1",
    ];
    let mut p = spawn_kilnd("kilnd", KILND, &argv).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()?;
    let input = format!("file://{}", inp.join("clip.mp4").display());
    // the first job starts at once; the next two wait, and the higher priority must start first. They are submitted
    // once the first runs: submitted together, the dispatcher's first pass may see all three and rightly start the
    // higher-priority one (seen on a loaded CI host).
    let first = submit(&http, &p.url, json!({"input": input})).await?;
    let url = format!("{}/v1/jobs/{first}", p.url);
    poll_json(
        &http,
        &url,
        "the first job starts",
        Duration::from_secs(30),
        |st| st["state"] != "queued",
    )
    .await?;
    let low = submit(&http, &p.url, json!({"input": input, "priority": 1})).await?;
    let high = submit(&http, &p.url, json!({"input": input, "priority": 5})).await?;
    let ids = [first.clone(), low.clone(), high.clone()];
    // kill while the first one runs (medium, the preset's speed, is slow enough to catch)
    poll_until(
        "the first job runs",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            let st: Value = http.get(&url).send().await?.json().await?;
            ensure!(st["state"] != "done", "finished before the kill: {st}");
            Ok(
                if st["state"] == "running" && st["progress"].as_f64().unwrap_or(0.0) > 0.0 {
                    Polled::Done(())
                } else {
                    Polled::NotYet(st.to_string())
                },
            )
        },
    )
    .await?;
    for id in [&low, &high] {
        let queued: Value = http
            .get(format!("{}/v1/jobs/{id}", p.url))
            .send()
            .await?
            .json()
            .await?;
        ensure!(queued["state"] == "queued", "{queued}");
    }
    p.kill().await?;
    let mut logs = vec![p.log_text()];
    let mut p = spawn_kilnd("kilnd", KILND, &argv).await?;
    // a clean stop (SIGTERM) while a job runs: the daemon exits promptly and the job goes back to the queue
    let running_job = |list: &Value| -> Option<String> {
        let j = list.as_array()?.iter().find(|j| j["state"] == "running")?;
        Some(j["id"].as_str()?.to_string())
    };
    let list = poll_json(
        &http,
        &format!("{}/v1/jobs", p.url),
        "a job runs after the restart",
        Duration::from_secs(60),
        |list| running_job(list).is_some(),
    )
    .await?;
    let running = running_job(&list).context("running job")?;
    p.signal("TERM").await?;
    let st = p.wait_exit(Duration::from_secs(15)).await?;
    ensure!(st.success(), "kilnd exited with {st} on SIGTERM");
    logs.push(p.log_text());
    let mut p = spawn_kilnd("kilnd", KILND, &argv).await?;
    let st: Value = http
        .get(format!("{}/v1/jobs/{running}", p.url))
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        matches!(st["state"].as_str(), Some("queued" | "running")),
        "interrupted job after SIGTERM: {st}"
    );
    for id in &ids {
        let st = wait_job(&http, &p.url, id, Duration::from_secs(200)).await?;
        ensure!(st["state"] == "done", "{id} after restart: {st}");
        ffmpeg_decodes(&format!(
            "{}{}",
            p.url,
            st["links"]["master"].as_str().unwrap()
        ))
        .await?;
    }
    let get = |id: String| {
        let (http, url) = (http.clone(), p.url.clone());
        async move {
            anyhow::Ok(
                http.get(format!("{url}/v1/jobs/{id}"))
                    .send()
                    .await?
                    .json::<Value>()
                    .await?,
            )
        }
    };
    let st = get(first).await?;
    ensure!(
        st["attempts"] == 2,
        "the interrupted job restarted once: {st}"
    );
    let (l, h) = (get(low).await?, get(high).await?);
    ensure!(
        h["started_unix_ms"].as_u64() < l["started_unix_ms"].as_u64(),
        "priority 5 started after priority 1: {h} {l}"
    );
    logs.push(p.log_text());
    // GStreamer's CRITICALs are bugs (a wrong unref, a bad probe): none in any of the three daemons' logs
    for (i, l) in logs.iter().enumerate() {
        let first = l.lines().find(|l| l.contains("CRITICAL")).unwrap_or("");
        ensure!(
            !l.contains("CRITICAL"),
            "daemon {i} logged CRITICALs: {first}"
        );
        ensure!(l.contains("job started"), "daemon {i}'s log is empty: {l}");
    }
    p.kill().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// kilnctl against a daemon: submit, list, cancel a queued job, watch one to the end (exit status follows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kilnctl_submits_lists_cancels_and_watches() -> Result<()> {
    const KILNCTL: &str = env!("CARGO_BIN_EXE_kiln-it-kilnctl");
    let (dir, inp) = scratch("kilnctl")?;
    av_clip(&inp.join("clip.mp4"), 4.0, "640x360").await?;
    let d = vod_daemon(&dir, "data", |j| {
        j.max_concurrent = 1;
    })
    .await?;
    let ctl = |args: &[&str]| {
        let mut c = tokio::process::Command::new(KILNCTL);
        c.arg("--server").arg(&d.base).args(args);
        c
    };
    let clip = inp.join("clip.mp4").display().to_string();
    let first = ctl(&["jobs", "submit", &clip]).output().await?;
    ensure!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let first_id = String::from_utf8(first.stdout)?.trim().to_string();
    // one runs at a time: the second waits in the queue and can be cancelled there
    let second = ctl(&["jobs", "submit", &clip, "--priority", "-3"])
        .output()
        .await?;
    let second_id = String::from_utf8(second.stdout)?.trim().to_string();
    let cancel = ctl(&["jobs", "cancel", &second_id]).output().await?;
    let said = String::from_utf8(cancel.stdout)?;
    ensure!(
        cancel.status.success() && said.contains("cancelled"),
        "cancel: {said}"
    );
    let list = String::from_utf8(ctl(&["jobs", "list"]).output().await?.stdout)?;
    ensure!(
        list.contains(&first_id) && list.contains(&second_id) && list.contains("cancelled"),
        "{list}"
    );
    // delete: refused while a job has not finished (the first is queued or running), done for the cancelled one
    let early = ctl(&["jobs", "delete", &first_id]).output().await?;
    ensure!(
        !early.status.success() && String::from_utf8(early.stderr)?.contains("409"),
        "deleting an unfinished job"
    );
    let del = ctl(&["jobs", "delete", &second_id]).output().await?;
    ensure!(
        del.status.success() && String::from_utf8(del.stdout)?.contains("deleted"),
        "delete"
    );
    let gone = d
        .http
        .get(d.url(&format!("/v1/jobs/{second_id}")))
        .send()
        .await?;
    ensure!(gone.status() == 404, "a deleted job: {}", gone.status());
    ensure!(
        !dir.join("data/jobs")
            .join(format!("{second_id}.json"))
            .exists(),
        "the deleted job's record is still on disk"
    );
    let watch = ctl(&["jobs", "watch", &first_id]).output().await?;
    let out = String::from_utf8(watch.stdout)?;
    let bar = String::from_utf8(watch.stderr)?;
    ensure!(watch.status.success(), "watch: {out} {bar}");
    ensure!(
        out.contains(&format!("{first_id}: done")) && out.contains("/master.m3u8"),
        "{out}"
    );
    ensure!(bar.contains("100.0%"), "no progress bar: {bar}");
    // get: the job's document; list --json: the API's list
    let got = ctl(&["jobs", "get", &first_id]).output().await?;
    let doc: serde_json::Value = serde_json::from_slice(&got.stdout)?;
    ensure!(
        got.status.success() && doc["id"] == first_id.as_str() && doc["state"] == "done",
        "{doc}"
    );
    let listed = ctl(&["--json", "jobs", "list"]).output().await?;
    let all: serde_json::Value = serde_json::from_slice(&listed.stdout)?;
    ensure!(
        all.as_array()
            .is_some_and(|a| a.iter().any(|j| j["id"] == first_id.as_str())),
        "{all}"
    );
    // a job that fails makes `watch` exit non-zero
    let bad = ctl(&[
        "jobs",
        "submit",
        &inp.join("nope.mp4").display().to_string(),
        "--watch",
    ])
    .output()
    .await?;
    ensure!(!bad.status.success(), "watching a failed job exited 0");
    ensure!(
        String::from_utf8(bad.stdout)?.contains("failed"),
        "bad job output"
    );
    // a malformed request: the daemon's message, non-zero exit
    let malformed = ctl(&["jobs", "submit", "ftp://x/y"]).output().await?;
    ensure!(
        !malformed.status.success() && String::from_utf8(malformed.stderr)?.contains("400"),
        "malformed"
    );
    finish(d, &dir).await
}

/// A daemon with an API token: kilnctl without `KILN_TOKEN` gets the daemon's 401 and exits non-zero; with it, the
/// same command works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kilnctl_sends_the_api_token() -> Result<()> {
    const KILNCTL: &str = env!("CARGO_BIN_EXE_kiln-it-kilnctl");
    const TOKEN: &str = "kilnctl-token-0123456789";
    let (dir, _) = scratch("kilnctl-token")?;
    let d = Daemon::start(kilnd::Config {
        api_token: Some(TOKEN.into()),
        jobs: Some(kilnd::jobs::JobsConfig::new(dir.join("data"))),
        ..Default::default()
    })
    .await?;
    let list = |token: Option<&str>| {
        let mut c = tokio::process::Command::new(KILNCTL);
        c.arg("--server").arg(&d.base).args(["jobs", "list"]);
        c.env_remove("KILN_TOKEN");
        if let Some(t) = token {
            c.env("KILN_TOKEN", t);
        }
        c.output()
    };
    let out = list(None).await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        !out.status.success() && text.contains("401"),
        "without the token: {} {text}",
        out.status
    );
    let out = list(Some(TOKEN)).await?;
    ensure!(
        out.status.success(),
        "with the token: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    finish(d, &dir).await
}

/// `--vod-retention-hours` (here 1 s): a finished job's record and outputs are deleted after the retention; a
/// purge by hand (`DELETE …?purge=true`) deletes a done job's outputs at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_deleted_after_the_retention_or_on_request() -> Result<()> {
    let (dir, inp) = scratch("retention")?;
    make_clip(
        &inp.join("clip.mp4"),
        2.0,
        Some("testsrc2=size=320x240:rate=30"),
        &[],
        H264,
    )
    .await?;
    std::fs::write(inp.join("empty.mp4"), b"")?;
    let d = vod_daemon(&dir, "data", |j| {
        j.retention = Some(Duration::from_secs(1));
    })
    .await?;
    let f = |n: &str| format!("file://{}", inp.join(n).display());
    let failing = submit(&d.http, &d.base, json!({"input": f("empty.mp4")})).await?;
    let st = wait_job(&d.http, &d.base, &failing, Duration::from_secs(30)).await?;
    ensure!(st["state"] == "failed", "{st}");
    let url = d.url(&format!("/v1/jobs/{failing}"));
    poll_until(
        "the failed job is deleted after the retention",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || async {
            let status = d.http.get(&url).send().await?.status();
            Ok(match status.as_u16() {
                404 => Polled::Done(()),
                _ => Polled::NotYet(format!("still there ({status})")),
            })
        },
    )
    .await?;
    ensure!(!dir
        .join("data/jobs")
        .join(format!("{failing}.json"))
        .exists());
    // by hand, right after it is done (before the sweep can): outputs gone, playback 404
    let d2 = vod_daemon(&dir, "data2", |_| {}).await?;
    let good = submit(
        &d2.http,
        &d2.base,
        json!({"input": f("clip.mp4"), "x264_speed": "veryfast"}),
    )
    .await?;
    let st = wait_job(&d2.http, &d2.base, &good, Duration::from_secs(60)).await?;
    ensure!(st["state"] == "done", "{st}");
    let master = st["links"]["master"]
        .as_str()
        .context("master")?
        .to_string();
    ensure!(d2.http.get(d2.url(&master)).send().await?.status() == 200);
    // finished files are served with Range, HEAD and conditional requests (tower-http's ServeFile)
    let name = st["renditions"][0]["name"].as_str().context("rendition")?;
    let seg = d2.url(&format!("/vod/{good}/{name}/seg-1.m4s"));
    let full = d2.http.get(&seg).send().await?;
    ensure!(full.status() == 200, "{}", full.status());
    ensure!(full.headers()["content-type"] == "video/mp4");
    let etag = full.headers().get("etag").cloned().context("an ETag")?;
    let modified = full
        .headers()
        .get("last-modified")
        .cloned()
        .context("Last-Modified")?;
    let body = full.bytes().await?;
    ensure!(body.len() > 100, "segment of {} bytes", body.len());
    let part = d2
        .http
        .get(&seg)
        .header("range", "bytes=10-19")
        .send()
        .await?;
    ensure!(part.status() == 206, "range: {}", part.status());
    ensure!(
        part.headers()["content-range"] == format!("bytes 10-19/{}", body.len()).as_str(),
        "{:?}",
        part.headers()
    );
    ensure!(part.bytes().await? == body[10..20], "the range's bytes");
    let head = d2.http.head(&seg).send().await?;
    ensure!(head.status() == 200);
    ensure!(head.headers()["content-length"] == body.len().to_string().as_str());
    for (h, v) in [("if-none-match", etag), ("if-modified-since", modified)] {
        let r = d2.http.get(&seg).header(h, v).send().await?;
        ensure!(r.status() == 304, "{h}: {}", r.status());
    }
    let r = d2
        .http
        .delete(d2.url(&format!("/v1/jobs/{good}?purge=true")))
        .send()
        .await?;
    ensure!(r.status() == 204, "purge: {}", r.status());
    ensure!(d2.http.get(d2.url(&master)).send().await?.status() == 404);
    ensure!(
        !dir.join("data2/vod").join(&good).exists(),
        "outputs remain"
    );
    let r = d2
        .http
        .delete(d2.url(&format!("/v1/jobs/{good}?purge=true")))
        .send()
        .await?;
    ensure!(r.status() == 404, "purging twice: {}", r.status());
    d.shutdown().await?;
    finish(d2, &dir).await
}
