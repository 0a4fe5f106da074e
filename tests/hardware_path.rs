//! The hardware path as far as a GPU-less host can prove it: the daemon starts and reports an empty GPU inventory;
//! the policy matrix (gpu-only refused with a clear error, prefer-gpu and cpu-only run on x264); an encoder that
//! fails mid-stream (test-only fault injection, `fault-injection` feature — the seam a test cannot reach is the
//! NVENC hardware) makes kilnd rebuild the pipeline on the CPU, the playlist continues after one
//! EXT-X-DISCONTINUITY at a segment boundary, on the same timeline, and ffmpeg decodes straight across it; `file://` sources decode, loop and refuse paths
//! outside the media directory.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kiln_integration::{
    ffmpeg_frames_with, make_clip, parse_ll, small_stream_spec, Daemon, LlPlaylist, H264,
};

fn spec_with(policy: &str) -> String {
    small_stream_spec().replacen('{', &format!(r#"{{"policy": "{policy}", "#), 1)
}

/// The one EXT-X-DISCONTINUITY of rendition `r`'s playlist after the fallback: it stands at a segment boundary
/// (after a complete segment, before the new segment's MAP/PDT and first part, which for video is independent),
/// with DISCONTINUITY-SEQUENCE 0; MSNs and URIs continue across it, and so does the timeline (the new segment's
/// PDT is the previous segment's PDT + EXTINF, up to half a part of rebuild time not covered by GAP parts).
/// Returns the MSN of the segment it opens.
fn check_discontinuity(r: &str, text: &str, pl: &LlPlaylist) -> Result<u64> {
    ensure!(
        text.matches("#EXT-X-DISCONTINUITY\n").count() == 1,
        "{r}: one fallback, one discontinuity:\n{text}"
    );
    ensure!(
        text.contains("#EXT-X-DISCONTINUITY-SEQUENCE:0\n"),
        "{r}: DISCONTINUITY-SEQUENCE 0 while the discontinuity is listed:\n{text}"
    );
    let lines: Vec<&str> = text.lines().collect();
    let i = lines
        .iter()
        .position(|l| *l == "#EXT-X-DISCONTINUITY")
        .context("no discontinuity")?;
    ensure!(
        lines[i - 1].starts_with("seg-"),
        "{r}: the discontinuity follows `{}`, not a complete segment:\n{text}",
        lines[i - 1]
    );
    let first_part = lines[i + 1..]
        .iter()
        .find(|l| !l.starts_with("#EXT-X-MAP:") && !l.starts_with("#EXT-X-PROGRAM-DATE-TIME:"))
        .context("nothing after the discontinuity")?;
    ensure!(
        first_part.starts_with("#EXT-X-PART:"),
        "{r}: the discontinuity is followed by `{first_part}`, not the new segment's first part"
    );
    if r != "audio" {
        ensure!(
            first_part.ends_with(",INDEPENDENT=YES"),
            "{r}: the new segment starts with a dependent part: {first_part}"
        );
    }
    // which listed segment it opens: the number of complete segments before it
    let k = lines[..i].iter().filter(|l| l.starts_with("seg-")).count();
    ensure!(k >= 1, "{r}: no segment before the fallback:\n{text}");
    let (prev, new) = (&pl.segments[k - 1], &pl.segments[k]);
    for s in &pl.segments {
        if let Some(uri) = &s.uri {
            ensure!(
                *uri == format!("seg-{}.m4s", s.msn),
                "{r}: MEDIA-SEQUENCE and {uri} disagree"
            );
        }
        for (j, p) in s.parts.iter().enumerate() {
            ensure!(
                p.uri == format!("part-{}-{j}.m4s", s.msn),
                "{r}: MEDIA-SEQUENCE and {} disagree",
                p.uri
            );
        }
    }
    let pdt = |msn: u64| -> Result<f64> {
        let v = &pl.pdt.iter().find(|(m, _)| *m == msn).context("PDT")?.1;
        let t = &v[11..23];
        Ok(t[0..2].parse::<f64>()? * 3600.0
            + t[3..5].parse::<f64>()? * 60.0
            + t[6..].parse::<f64>()?)
    };
    let (p0, p1) = (pdt(prev.msn)?, pdt(new.msn)?);
    let extinf = prev.duration.context("EXTINF")?;
    ensure!(
        (p1 - (p0 + extinf)).abs() <= pl.part_target / 2.0 + 0.002,
        "{r}: segment {} starts at PDT {p1:.3}, the one before ends at {:.3}",
        new.msn,
        p0 + extinf
    );
    Ok(new.msn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_less_node_reports_no_gpus_and_applies_the_policy_matrix() -> Result<()> {
    let d = Daemon::start_default().await?;
    let (_, cap) = d.get_text("/v1/capacity").await?;
    let cap: serde_json::Value = serde_json::from_str(&cap)?;
    ensure!(cap["gpus"] == serde_json::json!([]), "{}", cap["gpus"]);
    ensure!(
        cap["gpu_inventory"]["note"]
            .as_str()
            .is_some_and(|n| n.contains("NVML")),
        "the empty inventory says why: {}",
        cap["gpu_inventory"]
    );

    // gpu-only: refused, saying why, and counted
    let (st, body) = d.put_stream("g", &spec_with("gpu-only")).await?;
    ensure!(st == 422, "{st} {body}");
    ensure!(body["error"]["code"] == "cannot_run_here", "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or("");
    ensure!(msg.contains("gpu-only") && msg.contains("NVENC"), "{msg}");
    let (_, m) = d.get_text("/metrics").await?;
    ensure!(
        m.lines()
            .any(|l| l.starts_with("kiln_stream_refusals_total{reason=\"policy\"} 1")),
        "policy refusal not counted"
    );
    let (st, _) = d.get_text("/v1/streams/g").await?;
    ensure!(st == 404, "a refused stream leaves nothing behind");

    // prefer-gpu (the default) and cpu-only run on x264, and say so
    for (id, policy) in [("p", "prefer-gpu"), ("c", "cpu-only")] {
        let (st, body) = d.put_stream(id, &spec_with(policy)).await?;
        ensure!(st == 201, "{policy}: {st} {body}");
        ensure!(
            body["policy"] == policy && body["backend"]["kind"] == "cpu",
            "{body}"
        );
    }
    let (st, body) = d.put_stream("x", &spec_with("gpu-first")).await?;
    ensure!(st == 400, "unknown policy: {st} {body}");
    d.wait_for_segments("p", "lo", 1).await?;
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoder_failure_mid_stream_falls_back_and_playback_continues() -> Result<()> {
    let d = Daemon::start_default().await?;
    let req: kiln_model::StreamRequest = serde_json::from_str(small_stream_spec())?;
    // rendition 0's encoder dies after 2.5 s of frames
    d.state
        .supervisor
        .create_with_encoder_fault("f", req, 75)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // wait (blocking reloads) until the playlist shows a discontinuity and two segments after it: the fault comes
    // after 2.5 s of frames and a rebuild takes about a second, so 30 s is far more than enough
    let path = "/live/f/hi/index.m3u8";
    let (text, pl) = d
        .follow_playlist(
            path,
            "hi shows a discontinuity with two segments after it",
            Duration::from_secs(30),
            |text, _| {
                text.find("#EXT-X-DISCONTINUITY\n")
                    .is_some_and(|i| text[i..].matches("#EXTINF").count() >= 2)
            },
        )
        .await?;
    let at = check_discontinuity("hi", &text, &pl)?;
    // the whole stream was rebuilt: every rendition has its one discontinuity at the same segment
    for r in ["lo", "audio"] {
        let (text, pl) = d
            .follow_playlist(
                &format!("/live/f/{r}/index.m3u8"),
                &format!("{r} lists segment {at} complete"),
                Duration::from_secs(10),
                |_, pl| pl.segments.iter().any(|s| s.msn == at && s.uri.is_some()),
            )
            .await?;
        let here = check_discontinuity(r, &text, &pl)?;
        ensure!(
            here == at,
            "{r}: discontinuity before segment {here}, hi's before {at}"
        );
    }
    let (_, status) = d.get_text("/v1/streams/f").await?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    ensure!(status["state"] == "running", "{status}");
    let fb = status["fallbacks"].as_array().context("fallbacks")?;
    ensure!(fb.len() == 1, "{status}");
    ensure!(
        fb[0]["reason"] == "encoder_error"
            && fb[0]["to"]["kind"] == "cpu"
            && fb[0]["error"]
                .as_str()
                .is_some_and(|e| e.contains("injected")),
        "{}",
        fb[0]
    );
    let (_, m) = d.get_text("/metrics").await?;
    ensure!(
        m.lines().any(|l| l.starts_with("kiln_fallbacks_total{")
            && l.contains("stream=\"f\"")
            && l.contains("reason=\"encoder_error\"")
            && l.ends_with(" 1")),
        "kiln_fallbacks_total not incremented"
    );

    // end the stream (ENDLIST), then ffmpeg decodes the whole window, across the discontinuity, without an error
    let res = d.http.delete(d.url("/v1/streams/f")).send().await?;
    ensure!(res.status() == 204);
    let (_, ended) = d.get_text(path).await?;
    ensure!(ended.contains("#EXT-X-ENDLIST"), "{ended}");
    let media_s: f64 = parse_ll(&ended)?
        .segments
        .iter()
        .filter_map(|s| s.duration)
        .sum();
    let frames = ffmpeg_frames_with(&d.url(path), 60, &[]).await?;
    let video = frames.first().copied().unwrap_or(0) as f64;
    // the hole while the pipeline was rebuilt is GAP parts (nothing to decode), so allow a second of missing
    // frames, never more frames than the media holds
    ensure!(
        video >= (media_s - 1.5) * 30.0 && video <= media_s * 30.0 + 2.0,
        "{video} frames decoded from {media_s:.2} s of playlist"
    );
    tokio::time::timeout(Duration::from_secs(5), d.shutdown()).await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sources_loop_and_stay_inside_the_media_directory() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("kiln-media-dir-{}", std::process::id()));
    let media = dir.join("media");
    std::fs::create_dir_all(media.join("clips"))?;
    // 2.5 s with a keyframe every 15 frames, with audio; 2 s of video alone
    make_clip(
        &media.join("clips/loop.mp4"),
        2.5,
        Some("testsrc2=size=320x180:rate=30"),
        &["sine=frequency=300:sample_rate=48000"],
        &[
            "-c:v", "libx264", "-g", "15", "-pix_fmt", "yuv420p", "-c:a", "aac",
        ],
    )
    .await?;
    make_clip(
        &media.join("clips/silent.mp4"),
        2.0,
        Some("testsrc2=size=320x180:rate=30"),
        &[],
        H264,
    )
    .await?;
    std::fs::write(media.join("clips/garbage.mp4"), vec![0x42u8; 4096])?;
    std::fs::write(dir.join("secret.mp4"), b"outside")?;
    #[cfg(unix)]
    std::os::unix::fs::symlink(dir.join("secret.mp4"), media.join("escape.mp4"))?;
    let d = Daemon::start(kilnd::Config {
        media_dir: Some(media.clone()),
        // the HTTP source below is on loopback; only that address is opened
        source_networks: kiln_model::net::UrlPolicy::parse("127.0.0.1/32")?,
        ..Default::default()
    })
    .await?;
    let spec = |src: &str| small_stream_spec().replace("test:pattern=ball", src);
    for (src, want) in [
        ("file:///../secret.mp4", 400),
        ("file:///clips/missing.mp4", 422),
        ("file:///escape.mp4", 422),
        ("file:///clips", 422),
        // URL sources on networks this daemon does not allow: refused before any pipeline exists
        ("rtsp://169.254.169.254/live", 422),
        ("srt://10.0.0.1:9000", 422),
        ("http://[::1]:1/a.mp4", 422),
        ("rtsp://127.0.0.2:8554/cam", 422),
    ] {
        let (st, body) = d.put_stream("bad", &spec(src)).await?;
        ensure!(st == want, "{src}: {st} {body}");
        if !src.starts_with("file:") {
            ensure!(
                body.to_string().contains("--allow-networks"),
                "{src}: the refusal names the flag: {body}"
            );
        }
    }
    let (st, body) = d
        .put_stream("file", &spec("file:///clips/loop.mp4"))
        .await?;
    ensure!(st == 201, "{st} {body}");
    // a 2.5 s clip gives 4 complete 2 s segments only by looping
    let pl = d.wait_for_segments("file", "hi", 4).await?;
    ensure!(!pl.endlist);
    let (_, status) = d.get_text("/v1/streams/file").await?;
    ensure!(status.contains("\"state\":\"running\""), "{status}");
    let frames = ffmpeg_frames_with(&d.url("/live/file/hi/index.m3u8"), 4, &[]).await?;
    ensure!(frames.first().copied().unwrap_or(0) >= 100, "{frames:?}");

    // the same clip as MPEG-TS over HTTP (fetched by kilnd's checked client into the pipeline): it plays once,
    // then the stream ends with ENDLIST on its own
    make_clip(
        &dir.join("loop.ts"),
        2.5,
        Some("testsrc2=size=320x180:rate=30"),
        &["sine=frequency=300:sample_rate=48000"],
        &[
            "-c:v", "libx264", "-g", "15", "-pix_fmt", "yuv420p", "-c:a", "aac", "-f", "mpegts",
        ],
    )
    .await?;
    let clip = std::fs::read(dir.join("loop.ts"))?;
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/loop.ts", server.local_addr()?);
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut sock, _)) = server.accept().await {
            let clip = clip.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: video/mp2t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    clip.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&clip).await;
            });
        }
    });
    let (st, body) = d.put_stream("url", &spec(&url)).await?;
    ensure!(st == 201, "{st} {body}");
    let (_, ended) = d
        .follow_playlist(
            "/live/url/hi/index.m3u8",
            "the 2.5 s URL source ends (ENDLIST)",
            Duration::from_secs(30),
            |_, pl| pl.endlist,
        )
        .await?;
    let media_s: f64 = ended.segments.iter().filter_map(|s| s.duration).sum();
    ensure!(
        (2.0..=3.2).contains(&media_s),
        "{media_s} s of a 2.5 s clip"
    );
    let (_, status) = d.get_text("/v1/streams/url").await?;
    ensure!(status.contains("\"state\":\"ended\""), "{status}");
    d.shutdown().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
