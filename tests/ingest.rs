//! Live ingest with real publishers on loopback: ffmpeg pushing RTMP and RTMPS (FLV, x264 with a 2 s GOP and AAC,
//! as OBS does) and SRT (MPEG-TS, with the stream's passphrase), GStreamer's `srtsink`, and hand-made hostile peers (an
//! `rml_rtmp` client sending HEVC, random bytes, a truncated handshake, a silent connection). Every picture is small
//! so that publishers, the daemon's decode and its ladder fit on two cores.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kiln_integration::{ffmpeg_frames, poll_until, small_stream_spec, Daemon, Polled};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Child;

const LADDER: &str = r#""renditions": [
      {"name": "hi", "width": 320, "height": 180, "fps": 30, "bitrate_kbps": 300},
      {"name": "lo", "width": 160, "height": 90, "fps": 30, "bitrate_kbps": 120}],
    "audio": {"bitrate_kbps": 64}"#;

/// A daemon with both listeners on free loopback ports, room for every test stream, and a 3 s idle timeout.
async fn daemon(auth_url: Option<String>) -> Result<Daemon> {
    daemon_with(auth_url, None, Duration::from_secs(15)).await
}

/// [`daemon`], plus an RTMPS listener (and HTTPS) with the certificate `tls`.
async fn daemon_with(
    auth_url: Option<String>,
    tls: Option<kilnd::TlsFiles>,
    first_picture: Duration,
) -> Result<Daemon> {
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let config = kilnd::Config {
        ingest: kilnd::config::IngestConfig {
            rtmp_listen: Some(any),
            rtmps_listen: tls.is_some().then_some(any),
            srt_listen: Some(any),
            idle_timeout: Duration::from_secs(3),
            first_picture_timeout: first_picture,
            auth_url,
            ..Default::default()
        },
        tls,
        capacity: kiln_model::capacity::Resources {
            cpu_millicores: 64_000,
            memory_mib: 64_000,
            ..Default::default()
        },
        gpus: Some(Vec::new()),
        ..Default::default()
    };
    Daemon::start(config).await
}

/// `host:port` of the RTMP and SRT listeners.
fn listeners(d: &Daemon) -> Result<(String, String)> {
    let a = d
        .state
        .supervisor
        .ingest_addrs
        .get()
        .context("ingest addresses")?;
    Ok((
        a.rtmp.clone().context("rtmp")?,
        a.srt.clone().context("srt")?,
    ))
}

/// Creates a `publish:` stream; returns its 201 `ingest` object.
async fn publish_stream(d: &Daemon, id: &str) -> Result<serde_json::Value> {
    let body = format!(r#"{{"source": "publish:", {LADDER}}}"#);
    let (code, v) = d.put_stream(id, &body).await?;
    ensure!(code == 201, "PUT {id}: {code} {v}");
    Ok(v["ingest"].clone())
}

async fn status(d: &Daemon, id: &str) -> Result<serde_json::Value> {
    let (code, text) = d.get_text(&format!("/v1/streams/{id}")).await?;
    ensure!(code == 200, "GET {id}: {code} {text}");
    Ok(serde_json::from_str(&text)?)
}

/// Waits until the stream is in `state` (and, for `running`, has a publisher).
async fn wait_state(
    d: &Daemon,
    id: &str,
    state: &str,
    limit: Duration,
) -> Result<serde_json::Value> {
    poll_until(
        &format!("stream {id} {state}"),
        limit,
        Duration::from_millis(250),
        || async move {
            let (code, text) = d.get_text(&format!("/v1/streams/{id}")).await?;
            if code == 404 {
                return Ok(Polled::NotYet("no such stream yet".into()));
            }
            let s: serde_json::Value = serde_json::from_str(&text)?;
            Ok(if s["state"] == state {
                Polled::Done(s)
            } else {
                Polled::NotYet(format!("{} errors {}", s["state"], s["errors"]))
            })
        },
    )
    .await
}

/// ffmpeg publishing a moving test picture and a tone for `seconds` (real time) to `url` as `format`.
fn ffmpeg_publish(url: &str, format: &str, size: &str, seconds: u32) -> Result<Child> {
    ffmpeg_publish_with(url, format, size, seconds, "libx264")
}

/// [`ffmpeg_publish`] with another video encoder (`libx265`: HEVC).
fn ffmpeg_publish_with(
    url: &str,
    format: &str,
    size: &str,
    seconds: u32,
    encoder: &str,
) -> Result<Child> {
    ffmpeg_publish_as(url, format, size, 30, seconds, encoder, &[])
}

/// [`ffmpeg_publish`] at `fps`, with `encoder` and `extra` encoder arguments (a profile).
fn ffmpeg_publish_as(
    url: &str,
    format: &str,
    size: &str,
    fps: u32,
    seconds: u32,
    encoder: &str,
    extra: &[&str],
) -> Result<Child> {
    tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-loglevel", "error", "-re"])
        .args([
            "-f",
            "lavfi",
            "-i",
            &format!("testsrc2=size={size}:rate={fps}"),
        ])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
        .args(["-t", &seconds.to_string()])
        .args([
            "-c:v",
            encoder,
            "-preset",
            "ultrafast",
            "-tune",
            "zerolatency",
        ])
        .args([
            "-g", "60", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "64k",
        ])
        .args(extra)
        .args(["-f", format, url])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting ffmpeg")
}

/// Waits for a publisher that must be refused: it exits with an error within `limit`.
async fn refused(mut child: Child, limit: Duration) -> Result<String> {
    let status = tokio::time::timeout(limit, child.wait())
        .await
        .context("the refused publisher kept running")??;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err).await;
    }
    ensure!(!status.success(), "the publisher was not refused: {err}");
    Ok(err)
}

/// The value of one series in `/metrics`.
async fn metric(d: &Daemon, series: &str) -> Result<f64> {
    let (_, text) = d.get_text("/metrics").await?;
    Ok(text
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0))
}

/// Init + every complete segment rendition `r` of `id` lists, in one local file.
async fn window_file(d: &Daemon, id: &str, r: &str) -> Result<tempfile::NamedTempFile> {
    let (_, text) = d.get_text(&format!("/live/{id}/{r}/index.m3u8")).await?;
    let mut bytes = d
        .get_bytes(&format!("/live/{id}/{r}/init.mp4"))
        .await?
        .to_vec();
    let segs: Vec<&str> = text.lines().filter(|l| l.starts_with("seg-")).collect();
    ensure!(!segs.is_empty(), "no segment listed:\n{text}");
    for seg in segs {
        bytes.extend_from_slice(&d.get_bytes(&format!("/live/{id}/{r}/{seg}")).await?);
    }
    let mut f = tempfile::NamedTempFile::new()?;
    std::io::Write::write_all(&mut f, &bytes)?;
    Ok(f)
}

/// Mean luma (0-255) of the last frame of the newest complete segment of rendition `r`: the slate is dark
/// (~40), ffmpeg's testsrc2 bright (~120).
async fn newest_luma(d: &Daemon, id: &str, r: &str) -> Result<f64> {
    let (_, text) = d.get_text(&format!("/live/{id}/{r}/index.m3u8")).await?;
    let seg = text
        .lines()
        .rfind(|l| l.starts_with("seg-"))
        .context("no segment")?;
    let mut bytes = d
        .get_bytes(&format!("/live/{id}/{r}/init.mp4"))
        .await?
        .to_vec();
    bytes.extend_from_slice(&d.get_bytes(&format!("/live/{id}/{r}/{seg}")).await?);
    let mut f = tempfile::NamedTempFile::new()?;
    std::io::Write::write_all(&mut f, &bytes)?;
    let out = tokio::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(f.path())
        .args([
            "-map",
            "0:v",
            "-vf",
            "scale=32:18,format=gray",
            "-f",
            "rawvideo",
            "-",
        ])
        .output()
        .await?;
    let n = out.stdout.len();
    ensure!(
        out.status.success() && n >= 576 && n % 576 == 0,
        "ffmpeg ({n} bytes): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout[n - 576..]
        .iter()
        .map(|&b| f64::from(b))
        .sum::<f64>()
        / 576.0)
}

/// (width, height, decoded frames) of the newest complete segment of rendition `r` (ffprobe).
async fn newest_segment_probe(d: &Daemon, id: &str, r: &str) -> Result<(u64, u64, u64)> {
    let (_, text) = d.get_text(&format!("/live/{id}/{r}/index.m3u8")).await?;
    let seg = text
        .lines()
        .rfind(|l| l.starts_with("seg-"))
        .context("no segment")?;
    let mut bytes = d
        .get_bytes(&format!("/live/{id}/{r}/init.mp4"))
        .await?
        .to_vec();
    bytes.extend_from_slice(&d.get_bytes(&format!("/live/{id}/{r}/{seg}")).await?);
    let mut f = tempfile::NamedTempFile::new()?;
    std::io::Write::write_all(&mut f, &bytes)?;
    let out = tokio::process::Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-count_frames"])
        .args([
            "-show_entries",
            "stream=width,height,nb_read_frames",
            "-of",
            "csv=p=0",
        ])
        .arg(f.path())
        .output()
        .await?;
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let v: Vec<u64> = line.split(',').filter_map(|x| x.parse().ok()).collect();
    ensure!(
        v.len() == 3,
        "ffprobe: {line:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((v[0], v[1], v[2]))
}

/// Polls until the newest segment of `id`'s `hi` rendition is the slate (`slate`) or the publisher's picture.
async fn wait_picture(d: &Daemon, id: &str, slate: bool) -> Result<f64> {
    if slate {
        wait_luma(d, id, 0.0..70.0, "the slate").await
    } else {
        wait_luma(d, id, 90.0..255.0, "the publisher's picture").await
    }
}

/// Polls until the mean luma of the newest segment of `id`'s `hi` rendition is in `range` (`what` it shows).
async fn wait_luma(d: &Daemon, id: &str, range: std::ops::Range<f64>, what: &str) -> Result<f64> {
    poll_until(
        &format!("{id} shows {what}"),
        Duration::from_secs(20),
        Duration::from_millis(500),
        || async {
            let luma = newest_luma(d, id, "hi").await?;
            Ok(if range.contains(&luma) {
                Polled::Done(luma)
            } else {
                Polled::NotYet(format!("mean luma {luma:.0}"))
            })
        },
    )
    .await
}

/// Polls until `id`'s `resilience.active_input` is `input` and the stretch of slate is open (`slate`) or closed
/// (`source`); returns the status.
async fn wait_input(
    d: &Daemon,
    id: &str,
    input: &str,
    limit: Duration,
) -> Result<serde_json::Value> {
    poll_until(
        &format!("{id} on {input}"),
        limit,
        Duration::from_millis(50),
        || async {
            let s = status(d, id).await?;
            // the bookkeeping follows the switch by an event: wait for both
            let counted = (input == "slate") != s["resilience"]["slate_since_unix_ms"].is_null();
            Ok(if s["resilience"]["active_input"] == input && counted {
                Polled::Done(s)
            } else {
                Polled::NotYet(format!("{} {}", s["state"], s["resilience"]))
            })
        },
    )
    .await
}

/// An RTMP publisher plays on every rendition; when it is killed the slate goes on air at once and the playlists
/// keep growing at real time on the same timeline (no discontinuity); a second publisher at another picture size,
/// frame rate and H.264 profile takes over from the slate, and the ladder stays the same (size, 30 fps); ffmpeg decodes the whole window (publisher, slate, publisher) with -xerror; the
/// losses, reconnects and slate seconds are in the status and the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_publisher_is_bridged_by_the_slate_and_the_next_one_takes_over_at_another_size(
) -> Result<()> {
    let d = daemon(None).await?;
    let ingest = publish_stream(&d, "r1").await?;
    let key = ingest["key"].as_str().context("key")?.to_string();
    let url = ingest["rtmp_url"].as_str().context("rtmp_url")?.to_string();
    ensure!(
        key.len() >= 22 && url.ends_with(&format!("/live/{key}")),
        "{ingest}"
    );
    ensure!(
        ingest["srt_url"]
            .as_str()
            .is_some_and(|u| u.contains("passphrase=")),
        "{ingest}"
    );
    let waiting = status(&d, "r1").await?;
    ensure!(waiting["state"] == "waiting", "{waiting}");
    ensure!(waiting["resilience"]["active_input"] == "none", "{waiting}");

    let mut first = ffmpeg_publish(&url, "flv", "320x180", 60)?;
    let s = wait_state(&d, "r1", "running", Duration::from_secs(30)).await?;
    let p = &s["publisher"];
    ensure!(p["protocol"] == "rtmp", "{s}");
    ensure!(
        p["codecs"].to_string().contains("h264") && p["codecs"].to_string().contains("aac"),
        "{s}"
    );
    // the key is shown once, in the 201: never in a status or the list
    let (_, list) = d.get_text("/v1/streams").await?;
    ensure!(
        !s.to_string().contains(&key) && !list.contains(&key),
        "the key leaked: {s}"
    );
    let counts = ffmpeg_frames(&d.url("/live/r1/master.m3u8"), 6, true).await?;
    ensure!(
        counts.len() == 3,
        "expected 2 video + 1 audio streams, got {counts:?}"
    );
    let video: Vec<usize> = counts
        .iter()
        .copied()
        .filter(|c| (150..=181).contains(c))
        .collect();
    ensure!(
        video.len() >= 2,
        "each video rendition carries ~180 frames in 6 s: {counts:?}"
    );
    ensure!(
        counts.iter().all(|c| *c > 0),
        "a stream decoded nothing: {counts:?}"
    );
    ensure!(metric(&d, r#"kiln_ingest_bytes_total{protocol="rtmp"}"#).await? > 10_000.0);
    wait_picture(&d, "r1", false).await?;

    // the publisher dies: the slate is on air at once, the stream stays running and keeps its timeline
    first.kill().await?;
    let killed = Instant::now();
    let s = wait_input(&d, "r1", "slate", Duration::from_secs(5)).await?;
    let switch = killed.elapsed();
    ensure!(s["state"] == "running" && s["publisher"].is_null(), "{s}");
    ensure!(s["resilience"]["source_losses"] == 1, "{s}");
    ensure!(
        s["resilience"]["ends_at_unix_ms"].as_u64().is_some(),
        "the default window is 30 s: {s}"
    );
    let before = s["renditions"][0]["last_msn"]
        .as_u64()
        .context("last_msn")?;
    // real time on the slate, timed from `before`
    let t = Instant::now();
    let luma = wait_picture(&d, "r1", true).await?;
    poll_until(
        "r1 grows on the slate",
        Duration::from_secs(6),
        Duration::from_millis(100),
        || async {
            let msn = status(&d, "r1").await?["renditions"][0]["last_msn"]
                .as_u64()
                .unwrap_or(0);
            Ok(if msn >= before + 3 {
                Polled::Done(())
            } else {
                Polled::NotYet(format!("msn {msn}"))
            })
        },
    )
    .await?;
    // not a burst either: 3 segment boundaries are 2 × 2 s of media apart; the slate may catch up at most the
    // publisher's own lateness (its frames reached the encoders up to ~0.7 s after their time)
    let grew = t.elapsed();
    ensure!(
        grew >= Duration::from_millis(3000),
        "3 segments of slate in {grew:?}: faster than real time"
    );
    eprintln!(
        "slate on air {switch:?} after the kill (mean luma {luma:.0}); 3 segments in {:?}",
        grew
    );

    // a publisher at another size, frame rate (25) and profile (baseline) comes back and takes over from the slate
    let second = ffmpeg_publish_as(
        &url,
        "flv",
        "256x144",
        25,
        40,
        "libx264",
        &["-profile:v", "baseline"],
    )?;
    let connected = Instant::now();
    let s = wait_input(&d, "r1", "source", Duration::from_secs(20)).await?;
    eprintln!(
        "the second publisher on air {:?} after it started",
        connected.elapsed()
    );
    ensure!(
        s["state"] == "running" && s["resilience"]["reconnects"] == 1,
        "{s}"
    );
    ensure!(
        s["resilience"]["slate_seconds"].as_f64().unwrap_or(0.0) >= 4.0,
        "{s}"
    );
    wait_picture(&d, "r1", false).await?;
    // the ladder stays the same: a full segment of the 25 fps publisher is 2 s at 30 fps, at the rendition's size
    let probe = newest_segment_probe(&d, "r1", "hi").await?;
    ensure!(
        probe == (320, 180, 60),
        "the newest hi segment after the 25 fps publisher: {probe:?} (width, height, frames)"
    );
    for r in ["hi", "lo", "audio"] {
        let (_, text) = d.get_text(&format!("/live/r1/{r}/index.m3u8")).await?;
        ensure!(
            !text.contains("#EXT-X-DISCONTINUITY\n"),
            "{r}: the slate broke the timeline:\n{text}"
        );
        let f = window_file(&d, "r1", r).await?;
        let out = tokio::process::Command::new("ffmpeg")
            .args(["-v", "error", "-xerror", "-i"])
            .arg(f.path())
            .args(["-f", "null", "-"])
            .output()
            .await?;
        ensure!(
            out.status.success() && out.stderr.is_empty(),
            "{r}: ffmpeg -xerror across the slate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ensure!(metric(&d, r#"kiln_stream_source_losses_total{stream="r1"}"#).await? == 1.0);
    ensure!(metric(&d, r#"kiln_stream_reconnects_total{stream="r1"}"#).await? == 1.0);
    ensure!(metric(&d, r#"kiln_stream_slate_seconds_total{stream="r1"}"#).await? >= 4.0);
    ensure!(metric(&d, r#"kiln_stream_on_slate{stream="r1"}"#).await? == 0.0);
    // deleting the stream cuts its publisher off, and its key stops working
    let res = d.http.delete(d.url("/v1/streams/r1")).send().await?;
    ensure!(res.status() == 204, "DELETE: {}", res.status());
    refused(second, Duration::from_secs(15)).await?;
    refused(
        ffmpeg_publish(&url, "flv", "160x90", 5)?,
        Duration::from_secs(15),
    )
    .await?;
    d.shutdown().await
}

/// With nobody back within `reconnect_window_s` the stream ends (ENDLIST, `ended`); `mode: end` ends it as soon
/// as the publisher goes, and when an encoder failure's rebuild cuts the publisher off (test-only fault); absurd
/// windows and an `on_source_loss` on a stream that is not `publish:` are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_nobody_comes_back_in_its_window_or_at_once_with_mode_end() -> Result<()>
{
    let d = daemon(None).await?;
    for (id, loss) in [
        ("w1", r#"{"mode": "slate", "reconnect_window_s": 2}"#),
        ("w2", r#"{"mode": "end"}"#),
        ("w3", r#"{"mode": "end"}"#),
    ] {
        let body = format!(r#"{{"source": "publish:", "on_source_loss": {loss}, {LADDER}}}"#);
        let (code, v) = d.put_stream(id, &body).await?;
        ensure!(code == 201, "PUT {id}: {code} {v}");
        let url = v["ingest"]["rtmp_url"]
            .as_str()
            .context("rtmp_url")?
            .to_string();
        let mut publisher = ffmpeg_publish(&url, "flv", "320x180", 60)?;
        wait_state(&d, id, "running", Duration::from_secs(30)).await?;
        if id == "w3" {
            ensure!(d.state.supervisor.inject_encoder_error(id), "no encoder");
        } else {
            publisher.kill().await?;
        }
        let killed = Instant::now();
        let s = wait_state(&d, id, "ended", Duration::from_secs(15)).await?;
        let took = killed.elapsed();
        let (_, text) = d.get_text(&format!("/live/{id}/hi/index.m3u8")).await?;
        ensure!(text.contains("#EXT-X-ENDLIST"), "{id}: no ENDLIST:\n{text}");
        ensure!(s["resilience"]["source_losses"] == 1, "{s}");
        if id == "w3" {
            ensure!(s["fallbacks"].as_array().map(Vec::len) == Some(1), "{s}");
            refused(publisher, Duration::from_secs(10)).await?;
        }
        eprintln!("{id}: ended {took:?} after the kill (or the fault)");
        if id == "w1" {
            ensure!(
                took >= Duration::from_millis(1900),
                "{id} ended before its window: {took:?}"
            );
        } else {
            ensure!(
                took < Duration::from_secs(5),
                "{id} (mode end) took {took:?}"
            );
        }
    }
    for (body, what) in [
        (
            r#"{"source": "publish:", "on_source_loss": {"reconnect_window_s": 999999}}"#,
            "reconnect_window_s",
        ),
        (
            r#"{"source": "test:", "on_source_loss": {"mode": "slate"}}"#,
            "publish:",
        ),
        (
            r#"{"source": "publish:", "on_source_loss": {"mode": "pray"}}"#,
            "`slate` or `end`",
        ),
        (
            r#"{"source": "publish:", "on_source_loss": {"source_timeout_ms": 50}}"#,
            "source_timeout_ms: 200 to 60000",
        ),
    ] {
        let (code, v) = d.put_stream("bad", body).await?;
        ensure!(
            (400..500).contains(&code) && v.to_string().contains(what),
            "{body}: {code} {v}"
        );
    }
    d.shutdown().await
}

/// A publisher that stays connected but stops sending (its process stopped with SIGSTOP, as a frozen encoder
/// would) is lost after the stream's `source_timeout_ms`, not before, and the slate goes on air.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_stops_sending_is_lost_after_its_source_timeout() -> Result<()> {
    let d = daemon(None).await?;
    let body = format!(
        r#"{{"source": "publish:", "on_source_loss": {{"source_timeout_ms": 800}}, {LADDER}}}"#
    );
    let (code, v) = d.put_stream("st", &body).await?;
    ensure!(code == 201, "PUT: {code} {v}");
    ensure!(
        v["resilience"]["on_source_loss"]["source_timeout_ms"] == 800,
        "{v}"
    );
    let url = v["ingest"]["rtmp_url"].as_str().context("rtmp_url")?;
    let mut publisher = ffmpeg_publish(url, "flv", "320x180", 60)?;
    wait_state(&d, "st", "running", Duration::from_secs(30)).await?;
    wait_picture(&d, "st", false).await?;
    let pid = publisher.id().context("ffmpeg pid")?.to_string();
    let stop = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()?;
    ensure!(stop.success(), "kill -STOP {pid}");
    let frozen = Instant::now();
    let s = wait_input(&d, "st", "slate", Duration::from_secs(10)).await?;
    let took = frozen.elapsed();
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status();
    publisher.kill().await?;
    eprintln!("the slate went on air {took:?} after the publisher froze (source_timeout_ms 800)");
    ensure!(
        took >= Duration::from_millis(750) && took < Duration::from_millis(2500),
        "the stall was detected after {took:?}, not after 800 ms"
    );
    ensure!(
        s["resilience"]["source_losses"] == 1 && s["publisher"].is_null(),
        "{s}"
    );
    ensure!(
        s["errors"]
            .to_string()
            .contains("no frame from the publisher for 800 ms"),
        "{s}"
    );
    wait_picture(&d, "st", true).await?;
    d.shutdown().await
}

/// ffmpeg (libsrt) listening for kilnd's call on `port` with a moving picture and a tone (MPEG-TS, 2 s GOP) for
/// `seconds`.
fn ffmpeg_srt_listener(port: u16, seconds: u32) -> Result<Child> {
    ffmpeg_publish(
        &format!("srt://127.0.0.1:{port}?mode=listener&pkt_size=1316"),
        "mpegts",
        "320x180",
        seconds,
    )
}

/// ffmpeg listening on SRT `port` with a white picture (mean luma ~235: told apart from testsrc2's ~120 and the
/// slate's ~40) and a tone.
fn ffmpeg_white_srt_listener(port: u16, seconds: u32) -> Result<Child> {
    ffmpeg_white(
        &format!("srt://127.0.0.1:{port}?mode=listener&pkt_size=1316"),
        "mpegts",
        seconds,
    )
}

/// ffmpeg sending a white picture and a tone to `url` as `format` for `seconds`.
fn ffmpeg_white(url: &str, format: &str, seconds: u32) -> Result<Child> {
    tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-loglevel", "error", "-re"])
        .args(["-f", "lavfi", "-i", "color=c=white:size=320x180:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=660:sample_rate=48000"])
        .args(["-t", &seconds.to_string()])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-tune",
            "zerolatency",
        ])
        .args([
            "-g", "60", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "64k",
        ])
        .args(["-f", format, url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting ffmpeg")
}

/// Polls until `id`'s `resilience.<field>` is `n`; returns the status.
async fn wait_resilience(d: &Daemon, id: &str, field: &str, n: u64) -> Result<serde_json::Value> {
    poll_until(
        &format!("{id}: {field} = {n}"),
        Duration::from_secs(5),
        Duration::from_millis(50),
        || async {
            let s = status(d, id).await?;
            Ok(if s["resilience"][field] == n {
                Polled::Done(s)
            } else {
                Polled::NotYet(s["resilience"].to_string())
            })
        },
    )
    .await
}

/// Polls until `id`'s backup is healthy (`healthy`) or not; returns its restarts and the status.
async fn wait_backup(
    d: &Daemon,
    id: &str,
    healthy: bool,
    limit: Duration,
) -> Result<(u64, serde_json::Value)> {
    poll_until(
        &format!("{id}'s backup healthy: {healthy}"),
        limit,
        Duration::from_millis(100),
        || async {
            let s = status(d, id).await?;
            let b = &s["resilience"]["backup"];
            let restarts = b["restarts"].as_u64().unwrap_or(0);
            // unhealthy counts once the daemon has started it again
            let done = b["healthy"] == healthy && (healthy || restarts >= 1);
            Ok(if done {
                Polled::Done((restarts, s.clone()))
            } else {
                Polled::NotYet(b.to_string())
            })
        },
    )
    .await
}

/// A daemon that ingests (RTMP, SRT) and may pull sources from loopback; with `hooks` (a receiver and a data
/// directory), it sends webhooks there.
async fn daemon_pulling(hooks: Option<(&Receiver, &std::path::Path)>) -> Result<Daemon> {
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    Daemon::start(kilnd::Config {
        webhooks: hooks.map(|(rx, dir)| kilnd::webhooks::WebhookConfig {
            url: rx.url.clone(),
            secret: WEBHOOK_SECRET.as_bytes().to_vec(),
            dir: dir.join("webhooks"),
        }),
        source_networks: kiln_model::net::UrlPolicy::parse("127.0.0.1/32")?,
        ingest: kilnd::config::IngestConfig {
            rtmp_listen: Some(any),
            srt_listen: Some(any),
            ..Default::default()
        },
        capacity: kiln_model::capacity::Resources {
            cpu_millicores: 64_000,
            memory_mib: 64_000,
            ..Default::default()
        },
        gpus: Some(Vec::new()),
        ..Default::default()
    })
    .await
}

/// Automatic input failover with two ffmpeg senders: an RTMP publisher (the source) and an SRT listener kilnd
/// calls (the backup, a white picture), decoded all the time. Killing the publisher puts the backup on air at
/// once, not the slate; the publisher that comes back waits in standby for `failback_s` (3 s) and then takes over
/// again. Pixels say which input is on air; ffmpeg decodes the window across both switches with -xerror; the
/// status and the metrics count one failover and one failback; nothing of it adds a discontinuity. Then the
/// backup's own failures: off air it is started again until it answers; on air (the source gone) the slate
/// replaces it, and it replaces the slate when it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_goes_on_air_when_the_publisher_dies_and_hands_back_after_failback_s(
) -> Result<()> {
    let rx = receiver().await?;
    let data = tempfile::tempdir()?;
    let d = daemon_pulling(Some((&rx, data.path()))).await?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let backup = ffmpeg_white_srt_listener(port, 90)?;
    let body = format!(
        r#"{{"source": "publish:", "backup": {{"source": "srt://127.0.0.1:{port}", "failback_s": 3}},
            "on_source_loss": {{"source_timeout_ms": 1000}}, {LADDER}}}"#
    );
    let (code, v) = d.put_stream("bk", &body).await?;
    ensure!(code == 201, "PUT: {code} {v}");
    ensure!(v["resilience"]["backup"]["failback_s"] == 3, "{v}");
    let url = v["ingest"]["rtmp_url"]
        .as_str()
        .context("rtmp_url")?
        .to_string();
    let mut first = ffmpeg_publish(&url, "flv", "320x180", 90)?;
    wait_state(&d, "bk", "running", Duration::from_secs(30)).await?;
    wait_luma(&d, "bk", 90.0..200.0, "the publisher's picture").await?;
    wait_backup(&d, "bk", true, Duration::from_secs(20)).await?;

    first.kill().await?;
    let killed = Instant::now();
    wait_input(&d, "bk", "backup", Duration::from_secs(5)).await?;
    let failover = killed.elapsed();
    // the counters follow the switch by an event
    let s = wait_resilience(&d, "bk", "failovers", 1).await?;
    ensure!(
        s["state"] == "running"
            && s["resilience"]["source_losses"] == 1
            && s["resilience"]["slate_since_unix_ms"].is_null(),
        "{s}"
    );
    let luma = wait_luma(&d, "bk", 200.0..256.0, "the backup's white picture").await?;
    eprintln!(
        "the backup on air {failover:?} after the publisher was killed (mean luma {luma:.0})"
    );

    let second = ffmpeg_publish(&url, "flv", "320x180", 60)?;
    let started = Instant::now();
    // it decodes behind the backup first (the status says when it takes over if it goes on decoding): the
    // backup stays on air for failback_s
    let decoding = poll_until(
        "the publisher decodes in standby",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || async {
            let s = status(&d, "bk").await?;
            Ok(match s["resilience"]["failback_at_unix_ms"].as_u64() {
                Some(at) => Polled::Done((at, s)),
                None => Polled::NotYet(s["resilience"].to_string()),
            })
        },
    )
    .await?;
    let (failback_at, s) = decoding;
    ensure!(
        s["resilience"]["active_input"] == "backup",
        "the source took over before failback_s: {s}"
    );
    wait_input(&d, "bk", "source", Duration::from_secs(30)).await?;
    let on_air_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let failback_ms = on_air_ms as i64 - (failback_at as i64 - 3000);
    eprintln!(
        "the source on air {failback_ms} ms after it first decoded in standby ({:?} after ffmpeg started; \
         failback_s 3)",
        started.elapsed()
    );
    ensure!(
        on_air_ms + 100 >= failback_at,
        "the failback came {} ms before failback_s had passed",
        failback_at - on_air_ms
    );
    let s = wait_resilience(&d, "bk", "failbacks", 1).await?;
    ensure!(s["resilience"]["failovers"] == 1, "{s}");
    wait_luma(&d, "bk", 90.0..200.0, "the publisher's picture again").await?;
    for r in ["hi", "audio"] {
        let (_, text) = d.get_text(&format!("/live/bk/{r}/index.m3u8")).await?;
        ensure!(
            !text.contains("#EXT-X-DISCONTINUITY\n"),
            "{r}: a switch broke the timeline:\n{text}"
        );
        let f = window_file(&d, "bk", r).await?;
        let out = tokio::process::Command::new("ffmpeg")
            .args(["-v", "error", "-xerror", "-i"])
            .arg(f.path())
            .args(["-f", "null", "-"])
            .output()
            .await?;
        ensure!(
            out.status.success() && out.stderr.is_empty(),
            "{r}: ffmpeg -xerror across the switches: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ensure!(
        metric(
            &d,
            r#"kiln_stream_failovers_total{stream="bk",to="backup"}"#
        )
        .await?
            == 1.0
    );
    ensure!(
        metric(
            &d,
            r#"kiln_stream_failovers_total{stream="bk",to="source"}"#
        )
        .await?
            == 1.0
    );
    ensure!(
        metric(
            &d,
            r#"kiln_stream_active_input{input="source",stream="bk"}"#
        )
        .await?
            == 1.0
    );

    // the backup dies off air: it is started again until it answers
    drop(backup);
    let (restarted, s) = wait_backup(&d, "bk", false, Duration::from_secs(15)).await?;
    ensure!(restarted >= 1, "{s}");
    let mut backup = ffmpeg_white_srt_listener(port, 90)?;
    wait_backup(&d, "bk", true, Duration::from_secs(30)).await?;
    // failover again; then the backup dies on air with the source still gone: the slate
    drop(second);
    wait_input(&d, "bk", "backup", Duration::from_secs(5)).await?;
    wait_resilience(&d, "bk", "failovers", 2).await?;
    backup.kill().await?;
    let s = wait_input(&d, "bk", "slate", Duration::from_secs(5)).await?;
    ensure!(s["state"] == "running", "{s}");
    wait_picture(&d, "bk", true).await?;
    // the backup answers again: it replaces the slate
    let _backup = ffmpeg_white_srt_listener(port, 60)?;
    wait_input(&d, "bk", "backup", Duration::from_secs(30)).await?;
    wait_resilience(&d, "bk", "failovers", 3).await?;
    wait_luma(&d, "bk", 200.0..256.0, "the backup again").await?;
    // the platform heard every switch, in order, signed
    rx.expect(
        "bk",
        &[
            "stream.created",
            "source.connected",
            "stream.started",
            "source.lost",
            "source.failover",
            "source.connected",
            "source.failover",
            "source.lost",
            "source.failover",
            "source.lost",
            "source.failover",
        ],
    )
    .await?;
    ensure!(
        rx.got.lock().iter().all(|(_, ok)| *ok),
        "a webhook was not signed right"
    );
    let last = rx.events_of("bk").last().cloned().context("events")?;
    ensure!(
        last["data"]["resilience"]["active_input"] == "backup",
        "the last failover's data: {last}"
    );
    // a backup that is not a pulled live source, or on a stream that cannot lose its source, is refused
    for (body, what) in [
        (
            r#"{"source": "srt://127.0.0.1:9", "backup": {"source": "publish:"}}"#,
            "needs a `publish:` stream",
        ),
        (
            r#"{"source": "publish:", "backup": {"source": "file:///a.mp4"}}"#,
            "live input",
        ),
        (
            r#"{"source": "publish:", "ingest": {"backup_key": "bbbbbbbbbbbbbbbbbbbbbbbb"}}"#,
            "backup_key",
        ),
        (
            r#"{"source": "test:", "backup": {"source": "srt://127.0.0.1:9"}}"#,
            "backup applies",
        ),
        (
            r#"{"source": "publish:", "backup": {"source": "srt://127.0.0.1:9", "failback_s": 99999}}"#,
            "failback_s",
        ),
    ] {
        let (code, v) = d.put_stream("badbk", body).await?;
        ensure!(
            code == 400 && v.to_string().contains(what),
            "{body}: {code} {v}"
        );
    }
    d.shutdown().await
}

/// A `publish:` backup: two ffmpeg publishers, the primary over RTMP (testsrc2) and the backup over SRT with the
/// stream id `<id>/backup` (a white picture). A backup publisher is refused before the primary has started the
/// stream; once connected it is decoded in standby; killing the primary puts it on air within the source
/// timeout; the primary back waits out `failback_s` and takes over again. Pixels say which input is on air;
/// ffmpeg decodes the window across both switches with -xerror. Then the backup publisher leaves off air: the
/// backup is unhealthy, a second one takes its place (counted as a restart), and a third is refused as busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_publisher_is_the_backup_and_goes_on_air_when_the_primary_dies() -> Result<()> {
    let d = daemon_pulling(None).await?;
    let body = format!(
        r#"{{"source": "publish:", "backup": {{"source": "publish:", "failback_s": 3}},
            "on_source_loss": {{"source_timeout_ms": 1000}}, {LADDER}}}"#
    );
    let (code, v) = d.put_stream("pb2", &body).await?;
    ensure!(code == 201, "PUT: {code} {v}");
    let ingest = &v["ingest"];
    let backup_key = ingest["backup"]["key"].as_str().context("backup key")?;
    ensure!(
        backup_key.len() >= 22 && ingest["key"] != backup_key,
        "{ingest}"
    );
    let url = ingest["rtmp_url"].as_str().context("rtmp_url")?.to_string();
    let backup_rtmp = ingest["backup"]["rtmp_url"]
        .as_str()
        .context("backup rtmp_url")?;
    ensure!(backup_rtmp.ends_with(backup_key), "{ingest}");
    let backup_srt = ingest["backup"]["srt_url"]
        .as_str()
        .context("backup srt_url")?
        .to_string();
    ensure!(backup_srt.contains("pb2%2Fbackup"), "{backup_srt}");
    // before the primary: nothing to be the backup of
    let early = refused(
        ffmpeg_white(backup_rtmp, "flv", 30)?,
        Duration::from_secs(20),
    )
    .await?;
    eprintln!("a backup publisher before the primary: {early}");

    let mut primary = ffmpeg_publish(&url, "flv", "320x180", 90)?;
    wait_state(&d, "pb2", "running", Duration::from_secs(30)).await?;
    wait_luma(&d, "pb2", 90.0..200.0, "the primary's picture").await?;
    let backup = ffmpeg_white(&format!("{backup_srt}&pkt_size=1316"), "mpegts", 90)?;
    let (restarts, s) = wait_backup(&d, "pb2", true, Duration::from_secs(20)).await?;
    ensure!(
        restarts == 0 && s["resilience"]["backup"]["publisher"]["protocol"] == "srt",
        "{s}"
    );
    ensure!(s["resilience"]["active_input"] == "source", "{s}");

    primary.kill().await?;
    let killed = Instant::now();
    wait_input(&d, "pb2", "backup", Duration::from_secs(5)).await?;
    let failover = killed.elapsed();
    let luma = wait_luma(
        &d,
        "pb2",
        200.0..256.0,
        "the backup publisher's white picture",
    )
    .await?;
    eprintln!(
        "the backup publisher on air {failover:?} after the primary was killed (luma {luma:.0})"
    );
    let s = wait_resilience(&d, "pb2", "failovers", 1).await?;
    ensure!(s["resilience"]["slate_since_unix_ms"].is_null(), "{s}");

    let mut primary = ffmpeg_publish(&url, "flv", "320x180", 90)?;
    let started = Instant::now();
    wait_input(&d, "pb2", "source", Duration::from_secs(30)).await?;
    ensure!(
        started.elapsed() >= Duration::from_secs(3),
        "the primary took over {:?} after it reconnected, before failback_s (3 s)",
        started.elapsed()
    );
    eprintln!(
        "the primary back on air {:?} after it reconnected (failback_s 3)",
        started.elapsed()
    );
    wait_resilience(&d, "pb2", "failbacks", 1).await?;
    wait_luma(&d, "pb2", 90.0..200.0, "the primary's picture again").await?;
    let (_, text) = d.get_text("/live/pb2/hi/index.m3u8").await?;
    ensure!(
        !text.contains("#EXT-X-DISCONTINUITY\n"),
        "a switch broke the timeline:\n{text}"
    );
    let f = window_file(&d, "pb2", "hi").await?;
    let out = tokio::process::Command::new("ffmpeg")
        .args(["-v", "error", "-xerror", "-i"])
        .arg(f.path())
        .args(["-f", "null", "-"])
        .output()
        .await?;
    ensure!(
        out.status.success() && out.stderr.is_empty(),
        "ffmpeg -xerror across the switches: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // the backup publisher leaves off air: unhealthy, its slot free; the next one replaces it
    drop(backup);
    poll_until(
        "the backup publisher gone",
        Duration::from_secs(15),
        Duration::from_millis(100),
        || async {
            let s = status(&d, "pb2").await?;
            let b = &s["resilience"]["backup"];
            Ok(if b["healthy"] == false && b["publisher"].is_null() {
                Polled::Done(())
            } else {
                Polled::NotYet(b.to_string())
            })
        },
    )
    .await?;
    let _again = ffmpeg_white(backup_rtmp, "flv", 60)?;
    let (restarts, s) = wait_backup(&d, "pb2", true, Duration::from_secs(20)).await?;
    ensure!(
        restarts == 1 && s["resilience"]["backup"]["publisher"]["protocol"] == "rtmp",
        "{s}"
    );
    let busy = refused(
        ffmpeg_white(backup_rtmp, "flv", 30)?,
        Duration::from_secs(20),
    )
    .await?;
    eprintln!("a second backup publisher: {busy}");
    ensure!(
        metric(
            &d,
            r#"kiln_ingest_rejections_total{protocol="rtmp",reason="busy"}"#
        )
        .await?
            >= 2.0,
        "the early and the second backup publisher are counted as busy"
    );
    ensure!(
        metric(
            &d,
            r#"kiln_stream_failovers_total{stream="pb2",to="backup"}"#
        )
        .await?
            == 1.0
    );
    encoder_faults_rebuild_the_stream_on_the_slate(&d, &mut primary, &url, backup_rtmp).await?;
    d.shutdown().await
}

/// The CPU fallback of a `publish:` stream (test-only encoder fault): the pipeline is rebuilt on the slate (a
/// publisher's bytes fed the old pipeline and cannot be replayed), the stream keeps running, and the inputs come
/// back onto it. With the backup on air: the backup publisher (cut off by the rebuild) reconnects and replaces
/// the slate. On the slate: the primary comes back and takes over. With the primary on air: it is cut off (a
/// counted loss) and takes over again when it reconnects. ffmpeg decodes the window across the rebuilds.
async fn encoder_faults_rebuild_the_stream_on_the_slate(
    d: &Daemon,
    primary: &mut Child,
    url: &str,
    backup_rtmp: &str,
) -> Result<()> {
    let fallbacks = |s: &serde_json::Value| s["fallbacks"].as_array().map_or(0, |f| f.len());
    primary.kill().await?;
    let s = wait_input(d, "pb2", "backup", Duration::from_secs(5)).await?;
    let losses = &s["resilience"]["source_losses"];
    ensure!(d.state.supervisor.inject_encoder_error("pb2"), "no encoder");
    let s = wait_input(d, "pb2", "slate", Duration::from_secs(15)).await?;
    // the loss was counted when the backup went on air
    ensure!(
        s["state"] == "running"
            && fallbacks(&s) == 1
            && s["resilience"]["source_losses"] == *losses,
        "{s}"
    );
    wait_picture(d, "pb2", true).await?;
    // the backup publisher comes back (a real encoder retries): it replaces the slate
    let backup = ffmpeg_white(backup_rtmp, "flv", 60)?;
    let s = wait_input(d, "pb2", "backup", Duration::from_secs(20)).await?;
    ensure!(s["resilience"]["backup"]["restarts"] == 2, "{s}");
    wait_luma(d, "pb2", 200.0..256.0, "the backup after the rebuild").await?;
    // on the slate itself: the backup leaves, the encoder fails, the primary comes back
    drop(backup);
    wait_input(d, "pb2", "slate", Duration::from_secs(10)).await?;
    ensure!(d.state.supervisor.inject_encoder_error("pb2"), "no encoder");
    let s = poll_until(
        "the second rebuild",
        Duration::from_secs(15),
        Duration::from_millis(100),
        || async {
            let s = status(d, "pb2").await?;
            Ok(if fallbacks(&s) == 2 {
                Polled::Done(s)
            } else {
                Polled::NotYet(s["fallbacks"].to_string())
            })
        },
    )
    .await?;
    ensure!(
        s["state"] == "running" && s["resilience"]["active_input"] == "slate",
        "{s}"
    );
    let primary = ffmpeg_publish(url, "flv", "320x180", 60)?;
    wait_input(d, "pb2", "source", Duration::from_secs(30)).await?;
    wait_luma(d, "pb2", 90.0..200.0, "the primary after the rebuilds").await?;
    // the encoder fails with the primary on air: its bytes cannot be replayed into the new pipeline, so it is
    // cut off (a loss: the slate), and the publisher that reconnects takes over from the slate
    let losses = status(d, "pb2").await?["resilience"]["source_losses"]
        .as_u64()
        .unwrap_or(0);
    ensure!(d.state.supervisor.inject_encoder_error("pb2"), "no encoder");
    let s = wait_input(d, "pb2", "slate", Duration::from_secs(15)).await?;
    ensure!(
        fallbacks(&s) == 3 && s["resilience"]["source_losses"] == losses + 1,
        "{s}"
    );
    let cut = refused(primary, Duration::from_secs(10)).await?;
    eprintln!("the primary cut off by the rebuild: {cut}");
    let _primary = ffmpeg_publish(url, "flv", "320x180", 60)?;
    wait_input(d, "pb2", "source", Duration::from_secs(30)).await?;
    wait_luma(d, "pb2", 90.0..200.0, "the primary after the third rebuild").await?;
    let f = window_file(d, "pb2", "hi").await?;
    let out = tokio::process::Command::new("ffmpeg")
        .args(["-v", "error", "-xerror", "-i"])
        .arg(f.path())
        .args(["-f", "null", "-"])
        .output()
        .await?;
    ensure!(
        out.status.success() && out.stderr.is_empty(),
        "ffmpeg -xerror across the rebuilds: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A pulled SRT source (kilnd calls ffmpeg) that dies mid-stream: the slate goes on air, kilnd calls again with
/// backoff while nobody answers, and when ffmpeg listens again its picture takes over from the slate on the same
/// timeline; ffmpeg decodes the whole window across both switches with -xerror; the status counts the loss, the
/// attempts and the reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pulled_srt_source_that_dies_is_bridged_by_the_slate_and_called_again() -> Result<()> {
    let d = Daemon::start(kilnd::Config {
        source_networks: kiln_model::net::UrlPolicy::parse("127.0.0.1/32")?,
        capacity: kiln_model::capacity::Resources {
            cpu_millicores: 64_000,
            memory_mib: 64_000,
            ..Default::default()
        },
        gpus: Some(Vec::new()),
        ..Default::default()
    })
    .await?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut first = ffmpeg_srt_listener(port, 60)?;
    let body = format!(
        r#"{{"source": "srt://127.0.0.1:{port}", "on_source_loss": {{"source_timeout_ms": 1000, "reconnect_window_s": 120}}, {LADDER}}}"#
    );
    let (code, v) = d.put_stream("pull", &body).await?;
    ensure!(code == 201, "PUT: {code} {v}");
    wait_state(&d, "pull", "running", Duration::from_secs(30)).await?;
    wait_picture(&d, "pull", false).await?;

    first.kill().await?;
    let killed = Instant::now();
    let s = wait_input(&d, "pull", "slate", Duration::from_secs(10)).await?;
    eprintln!(
        "the slate went on air {:?} after the SRT sender died",
        killed.elapsed()
    );
    ensure!(
        s["state"] == "running" && s["resilience"]["source_losses"] == 1,
        "{s}"
    );
    wait_picture(&d, "pull", true).await?;
    // nobody answers for a while: kilnd keeps calling
    poll_until(
        "kilnd calls the source again",
        Duration::from_secs(15),
        Duration::from_millis(250),
        || async {
            let s = status(&d, "pull").await?;
            let n = s["resilience"]["retries"].as_u64().unwrap_or(0);
            Ok(if n >= 2 {
                Polled::Done(())
            } else {
                Polled::NotYet(format!("{} retries", n))
            })
        },
    )
    .await?;

    let _second = ffmpeg_srt_listener(port, 60)?;
    let listening = Instant::now();
    let s = wait_input(&d, "pull", "source", Duration::from_secs(30)).await?;
    eprintln!(
        "the source back on air {:?} after ffmpeg listened again ({} attempts in all)",
        listening.elapsed(),
        s["resilience"]["retries"]
    );
    ensure!(
        s["state"] == "running"
            && s["resilience"]["reconnects"] == 1
            && s["resilience"]["source_losses"] == 1,
        "{s}"
    );
    wait_picture(&d, "pull", false).await?;
    for r in ["hi", "audio"] {
        let (_, text) = d.get_text(&format!("/live/pull/{r}/index.m3u8")).await?;
        ensure!(
            !text.contains("#EXT-X-DISCONTINUITY\n"),
            "{r}: the slate broke the timeline:\n{text}"
        );
        let f = window_file(&d, "pull", r).await?;
        let out = tokio::process::Command::new("ffmpeg")
            .args(["-v", "error", "-xerror", "-i"])
            .arg(f.path())
            .args(["-f", "null", "-"])
            .output()
            .await?;
        ensure!(
            out.status.success() && out.stderr.is_empty(),
            "{r}: ffmpeg -xerror across the slate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ensure!(metric(&d, r#"kiln_stream_reconnects_total{stream="pull"}"#).await? == 1.0);
    d.shutdown().await
}

/// A pulled source with a backup (both SRT listeners kilnd calls): when the source dies the backup goes on air,
/// kilnd pulls the source again behind it, and once the source answers and has decoded for `failback_s` it takes
/// over again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pulled_source_fails_over_to_its_backup_and_back_once_it_answers_again() -> Result<()> {
    let d = daemon_pulling(None).await?;
    // two distinct free ports (both bound at once)
    let (a, b) = (
        std::net::UdpSocket::bind("127.0.0.1:0")?,
        std::net::UdpSocket::bind("127.0.0.1:0")?,
    );
    let (main, spare) = (a.local_addr()?.port(), b.local_addr()?.port());
    drop((a, b));
    let mut source = ffmpeg_srt_listener(main, 90)?;
    let _backup = ffmpeg_white_srt_listener(spare, 90)?;
    let body = format!(
        r#"{{"source": "srt://127.0.0.1:{main}", "backup": {{"source": "srt://127.0.0.1:{spare}", "failback_s": 2}},
            "on_source_loss": {{"source_timeout_ms": 1000}}, {LADDER}}}"#
    );
    let (code, v) = d.put_stream("pb", &body).await?;
    ensure!(code == 201, "PUT: {code} {v}");
    wait_state(&d, "pb", "running", Duration::from_secs(30)).await?;
    wait_luma(&d, "pb", 90.0..200.0, "the source's picture").await?;
    wait_backup(&d, "pb", true, Duration::from_secs(20)).await?;

    source.kill().await?;
    let killed = Instant::now();
    wait_input(&d, "pb", "backup", Duration::from_secs(10)).await?;
    eprintln!(
        "the backup on air {:?} after the pulled source died",
        killed.elapsed()
    );
    wait_resilience(&d, "pb", "failovers", 1).await?;
    wait_luma(&d, "pb", 200.0..256.0, "the backup's picture").await?;

    let _source = ffmpeg_srt_listener(main, 60)?;
    let back = Instant::now();
    // pulled again behind the backup: it decodes in standby first, and the backup stays on air meanwhile
    let (failback_at, s) = poll_until(
        "the source decodes in standby",
        Duration::from_secs(40),
        Duration::from_millis(50),
        || async {
            let s = status(&d, "pb").await?;
            Ok(match s["resilience"]["failback_at_unix_ms"].as_u64() {
                Some(at) => Polled::Done((at, s)),
                None => Polled::NotYet(s["resilience"].to_string()),
            })
        },
    )
    .await?;
    ensure!(
        s["resilience"]["active_input"] == "backup",
        "the source took over before failback_s: {s}"
    );
    wait_input(&d, "pb", "source", Duration::from_secs(20)).await?;
    let on_air_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    eprintln!(
        "the source on air again {:?} after it listened again, {} ms after it first decoded in standby \
         (failback_s 2)",
        back.elapsed(),
        on_air_ms as i64 - (failback_at as i64 - 2000)
    );
    ensure!(
        on_air_ms + 100 >= failback_at,
        "the failback came before failback_s had passed"
    );
    let s = wait_resilience(&d, "pb", "failbacks", 1).await?;
    ensure!(
        s["resilience"]["retries"].as_u64().unwrap_or(0) >= 1
            && s["resilience"]["source_losses"] == 1
            && s["resilience"]["slate_seconds"] == 0.0,
        "the backup bridged the whole loss, without the slate: {s}"
    );
    wait_luma(&d, "pb", 90.0..200.0, "the source's picture again").await?;
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srt_publishers_from_ffmpeg_and_srtsink_share_one_port_each_on_its_stream() -> Result<()> {
    let d = daemon(None).await?;
    let (_, srt) = listeners(&d)?;
    let port = srt.rsplit(':').next().context("port")?.to_string();
    let mut urls = Vec::new();
    for id in ["s1", "s2", "s3"] {
        urls.push(publish_stream(&d, id).await?);
    }
    // ffmpeg takes the publish URL verbatim
    let _a = ffmpeg_publish(
        urls[0]["srt_url"].as_str().context("srt_url")?,
        "mpegts",
        "320x180",
        45,
    )?;
    let s1 = wait_state(&d, "s1", "running", Duration::from_secs(30)).await?;
    ensure!(s1["publisher"]["protocol"] == "srt", "{s1}");
    for id in ["s2", "s3"] {
        ensure!(
            status(&d, id).await?["state"] == "waiting",
            "{id} started with s1's publisher"
        );
    }
    // GStreamer's srtsink, with the stream id and passphrase as properties (SPS/PPS repeated at every IDR, as
    // live encoders send them)
    let pass = urls[1]["passphrase"].as_str().context("passphrase")?;
    // (SPS/PPS before every IDR and 7 TS packets per SRT message: what a live GStreamer sender needs)
    let sender = "-q videotestsrc is-live=true pattern=ball ! video/x-raw,format=I420,width=320,height=180,framerate=30/1 \
        ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=60 ! h264parse config-interval=-1 ! mux. \
        audiotestsrc is-live=true ! audioconvert ! avenc_aac ! aacparse ! mux. \
        mpegtsmux name=mux alignment=7 ! srtsink";
    let _b = tokio::process::Command::new("gst-launch-1.0")
        .args(sender.split_whitespace())
        .arg(format!("uri=srt://127.0.0.1:{port}"))
        .arg("streamid=#!::r=s2,m=publish")
        .arg(format!("passphrase={pass}"))
        .arg("pbkeylen=16")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    wait_state(&d, "s2", "running", Duration::from_secs(30)).await?;
    ensure!(status(&d, "s3").await?["state"] == "waiting");
    // a third publisher on the same port, at the same time, in HEVC
    let _c = ffmpeg_publish_with(
        urls[2]["srt_url"].as_str().context("srt_url")?,
        "mpegts",
        "256x144",
        30,
        "libx265",
    )?;
    wait_state(&d, "s3", "running", Duration::from_secs(30)).await?;
    let mut addrs = Vec::new();
    for id in ["s1", "s2", "s3"] {
        let s = status(&d, id).await?;
        ensure!(
            s["state"] == "running" && s["publisher"]["protocol"] == "srt",
            "{s}"
        );
        addrs.push(
            s["publisher"]["address"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    addrs.sort();
    addrs.dedup();
    ensure!(
        addrs.len() == 3,
        "three publishers, three addresses: {addrs:?}"
    );
    for id in ["s1", "s2", "s3"] {
        let c = ffmpeg_frames(&d.url(&format!("/live/{id}/hi/index.m3u8")), 3, false).await?;
        ensure!(c.len() == 1 && c[0] >= 60, "{id}: {c:?}");
    }
    ensure!(metric(&d, r#"kiln_ingest_publishers{protocol="srt"}"#).await? == 3.0);
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_keys_passphrases_streams_and_busy_keys_are_refused_and_counted() -> Result<()> {
    let d = daemon(None).await?;
    let (rtmp, srt) = listeners(&d)?;
    let (code, v) = d.put_stream("steady", small_stream_spec()).await?;
    ensure!(code == 201, "{v}");
    let k1 = publish_stream(&d, "k1").await?;
    let k2 = publish_stream(&d, "k2").await?;
    let steady = r#"kiln_input_frames_total{stream="steady"}"#;
    wait_state(&d, "steady", "running", Duration::from_secs(30)).await?;
    let frames_before = metric(&d, steady).await?;

    let _live = ffmpeg_publish(
        k1["rtmp_url"].as_str().context("url")?,
        "flv",
        "320x180",
        60,
    )?;
    wait_state(&d, "k1", "running", Duration::from_secs(30)).await?;
    let limit = Duration::from_secs(15);
    // RTMP: an unknown key, and a second publisher on a live key
    refused(
        ffmpeg_publish(
            &format!("rtmp://{rtmp}/live/{}", "x".repeat(24)),
            "flv",
            "160x90",
            5,
        )?,
        limit,
    )
    .await?;
    refused(
        ffmpeg_publish(k1["rtmp_url"].as_str().context("url")?, "flv", "160x90", 5)?,
        limit,
    )
    .await?;
    // SRT: a wrong passphrase, a stream that does not exist, no passphrase at all
    let good = k2["srt_url"].as_str().context("srt_url")?;
    let pass = k2["passphrase"].as_str().context("passphrase")?;
    refused(
        ffmpeg_publish(
            &good.replace(pass, "not-the-passphrase"),
            "mpegts",
            "160x90",
            5,
        )?,
        limit,
    )
    .await?;
    refused(
        ffmpeg_publish(&good.replace("r%3Dk2", "r%3Dnope"), "mpegts", "160x90", 5)?,
        limit,
    )
    .await?;
    let no_pass = format!("srt://{srt}?streamid=k2");
    refused(ffmpeg_publish(&no_pass, "mpegts", "160x90", 5)?, limit).await?;

    for (labels, what) in [
        (
            r#"protocol="rtmp",reason="unknown_key""#,
            "unknown RTMP key",
        ),
        (r#"protocol="rtmp",reason="busy""#, "second RTMP publisher"),
        (
            r#"protocol="srt",reason="bad_passphrase""#,
            "wrong passphrase",
        ),
        (
            r#"protocol="srt",reason="unknown_stream""#,
            "unknown SRT stream",
        ),
        (
            r#"protocol="srt",reason="no_passphrase""#,
            "unencrypted SRT publisher",
        ),
    ] {
        let n = metric(&d, &format!("kiln_ingest_rejections_total{{{labels}}}")).await?;
        ensure!(n >= 1.0, "{what} not counted");
    }
    // nothing refused touched the streams that run
    let k1s = status(&d, "k1").await?;
    ensure!(k1s["state"] == "running", "{k1s}");
    ensure!(status(&d, "k2").await?["state"] == "waiting");
    // every documented ingest and resilience series is exported (docs/metrics.md, "Live ingest series")
    let (_, text) = d.get_text("/metrics").await?;
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))?;
    let section = doc
        .split("## Live ingest series")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .context("docs/metrics.md has no live ingest section")?;
    let names: Vec<&str> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .collect();
    ensure!(names.len() == 13, "{names:?}");
    for n in names {
        ensure!(
            text.contains(&format!("# TYPE {n} ")),
            "{n} is documented but not exported"
        );
    }
    let frames_after = metric(&d, steady).await?;
    ensure!(
        frames_after > frames_before + 30.0,
        "steady stalled: {frames_before} → {frames_after}"
    );
    d.shutdown().await
}

/// A platform's publish-authorization endpoint: allows one key (as stream `authed`), refuses the rest.
async fn auth_server() -> Result<(String, tokio::task::JoinHandle<()>)> {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/auth",
        post(|axum::Json(v): axum::Json<serde_json::Value>| async move {
            if v["name"] == ALLOWED_KEY && v["protocol"] == "rtmp" {
                (
                    axum::http::StatusCode::OK,
                    axum::Json(
                        serde_json::json!({"stream_id": "authed", "preset": "live-360p-abr"}),
                    ),
                )
            } else {
                (
                    axum::http::StatusCode::FORBIDDEN,
                    axum::Json(serde_json::json!({})),
                )
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/auth", l.local_addr()?);
    let task = tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    Ok((url, task))
}

const ALLOWED_KEY: &str = "allowed-by-the-platform-0001";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_auth_url_creates_the_streams_it_allows_and_refuses_the_rest() -> Result<()> {
    let (auth, _server) = auth_server().await?;
    let d = daemon(Some(auth)).await?;
    let (rtmp, _) = listeners(&d)?;
    let denied = ffmpeg_publish(
        &format!("rtmp://{rtmp}/live/some-other-key-000000000"),
        "flv",
        "160x90",
        5,
    )?;
    refused(denied, Duration::from_secs(15)).await?;
    ensure!(
        metric(
            &d,
            r#"kiln_ingest_rejections_total{protocol="rtmp",reason="auth_denied"}"#
        )
        .await?
            >= 1.0
    );
    let (code, _) = d.get_text("/v1/streams/authed").await?;
    ensure!(code == 404, "a denied publisher created a stream");

    let _ok = ffmpeg_publish(
        &format!("rtmp://{rtmp}/live/{ALLOWED_KEY}"),
        "flv",
        "320x180",
        30,
    )?;
    let s = wait_state(&d, "authed", "running", Duration::from_secs(30)).await?;
    ensure!(
        s["renditions"].as_array().is_some_and(|r| r.len() == 3),
        "the 360p preset: {s}"
    );
    let c = ffmpeg_frames(&d.url("/live/authed/360p/index.m3u8"), 3, false).await?;
    ensure!(c.len() == 1 && c[0] >= 60, "{c:?}");
    d.shutdown().await
}

/// Publishes over RTMP by hand (`rml_rtmp`'s client): handshake, connect `live`, publish `key`, then `video`
/// messages. Returns once the server has closed the connection (or `limit` passes: an error).
async fn rtmp_client_publish(
    addr: &str,
    key: &str,
    video: Vec<Vec<u8>>,
    limit: Duration,
) -> Result<()> {
    use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
    use rml_rtmp::sessions::{
        ClientSession, ClientSessionConfig, ClientSessionEvent, ClientSessionResult,
        PublishRequestType,
    };
    use rml_rtmp::time::RtmpTimestamp;
    let mut sock = TcpStream::connect(addr).await?;
    let mut hs = Handshake::new(PeerType::Client);
    sock.write_all(&hs.generate_outbound_p0_and_p1()?).await?;
    let mut buf = vec![0u8; 8192];
    let rest = loop {
        let n = sock.read(&mut buf).await?;
        ensure!(n > 0, "closed in the handshake");
        match hs.process_bytes(&buf[..n])? {
            HandshakeProcessResult::InProgress { response_bytes } => {
                sock.write_all(&response_bytes).await?
            }
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => {
                sock.write_all(&response_bytes).await?;
                break remaining_bytes;
            }
        }
    };
    let (mut session, _) = ClientSession::new(ClientSessionConfig::new())?;
    let send = |r: ClientSessionResult| match r {
        ClientSessionResult::OutboundResponse(p) => p.bytes,
        _ => Vec::new(),
    };
    sock.write_all(&send(session.request_connection("live".into())?))
        .await?;
    let mut input = rest;
    let mut published = false;
    let deadline = Instant::now() + limit;
    let mut sent_video = false;
    loop {
        for r in session.handle_input(&input)? {
            match r {
                ClientSessionResult::OutboundResponse(p) => sock.write_all(&p.bytes).await?,
                ClientSessionResult::RaisedEvent(ClientSessionEvent::ConnectionRequestAccepted) => {
                    sock.write_all(&send(
                        session.request_publishing(key.into(), PublishRequestType::Live)?,
                    ))
                    .await?;
                }
                ClientSessionResult::RaisedEvent(ClientSessionEvent::PublishRequestAccepted) => {
                    published = true
                }
                _ => {}
            }
        }
        if published && !sent_video {
            for (i, v) in video.iter().enumerate() {
                let r = session.publish_video_data(
                    v.clone().into(),
                    RtmpTimestamp::new(i as u32 * 33),
                    false,
                )?;
                if sock.write_all(&send(r)).await.is_err() {
                    return Ok(()); // already closed
                }
            }
            sent_video = true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sock.read(&mut buf)).await {
            Err(_) => bail!("the server kept the connection open for {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(()),
            Ok(Ok(n)) => input = buf[..n].to_vec(),
        }
    }
}

/// How long until the server closes a connection that has sent `first` and then nothing.
async fn closed_after(addr: &str, first: &[u8], limit: Duration) -> Result<Duration> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(first).await?;
    let start = Instant::now();
    let mut buf = vec![0u8; 65536];
    loop {
        match tokio::time::timeout(limit, s.read(&mut buf)).await {
            Err(_) => bail!("still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// `seconds` of random bytes: TCP connections to `rtmp` (a new one whenever the server closes the last), UDP
/// datagrams to `srt`.
async fn random_bytes(rtmp: &str, srt: &str, seconds: u64) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut noise = move |buf: &mut [u8]| {
        for b in buf.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = seed as u8;
        }
    };
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    udp.connect(srt).await?;
    let mut tcp = None;
    let mut buf = vec![0u8; 1316];
    while Instant::now() < end {
        noise(&mut buf);
        let _ = udp.send(&buf).await;
        if tcp.is_none() {
            tcp = TcpStream::connect(rtmp).await.ok();
        }
        if let Some(s) = tcp.as_mut() {
            if s.write_all(&buf).await.is_err() {
                tcp = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_pictures_hevc_noise_and_silent_peers_are_refused_and_the_daemon_stays_healthy(
) -> Result<()> {
    let d = daemon(None).await?;
    let (rtmp, srt) = listeners(&d)?;
    let (code, v) = d.put_stream("steady", small_stream_spec()).await?;
    ensure!(code == 201, "{v}");
    wait_state(&d, "steady", "running", Duration::from_secs(30)).await?;
    let h1 = publish_stream(&d, "h1").await?;
    let key = h1["key"].as_str().context("key")?.to_string();
    let parts = r#"kiln_parts_published_total{rendition="hi",stream="steady"}"#;
    let parts_before = metric(&d, parts).await?;

    // 4K into a 320x180 reservation: refused at the first video message (the SPS), before any pipeline
    let big = ffmpeg_publish(
        h1["rtmp_url"].as_str().context("url")?,
        "flv",
        "3840x2160",
        3,
    )?;
    refused(big, Duration::from_secs(30)).await?;
    let s = status(&d, "h1").await?;
    ensure!(
        s["errors"].to_string().contains("3840x2160") && s["state"] == "waiting",
        "{s}"
    );
    ensure!(
        metric(
            &d,
            r#"kiln_ingest_rejections_total{protocol="rtmp",reason="too_large"}"#
        )
        .await?
            >= 1.0
    );

    // 720p over SRT: MPEG-TS names no size up front, so the parsed caps are checked before decoding
    let srt720 = ffmpeg_publish(
        h1["srt_url"].as_str().context("srt_url")?,
        "mpegts",
        "1280x720",
        20,
    )?;
    poll_until(
        "h1 refuses 720p over SRT",
        Duration::from_secs(30),
        Duration::from_millis(250),
        || async {
            let s = status(&d, "h1").await?;
            Ok(if s["errors"].to_string().contains("1280x720") {
                Polled::Done(())
            } else {
                Polled::NotYet(s.to_string())
            })
        },
    )
    .await?;
    drop(srt720);
    wait_state(&d, "h1", "waiting", Duration::from_secs(20)).await?;

    // HEVC over enhanced RTMP (IsExHeader | keyframe | SequenceStart, "hvc1", a config record)
    let hevc = vec![vec![0x90, b'h', b'v', b'c', b'1', 1, 2, 3, 4]];
    rtmp_client_publish(&rtmp, &key, hevc, Duration::from_secs(10)).await?;
    let s = status(&d, "h1").await?;
    ensure!(s["errors"].to_string().contains("hevc"), "{s}");
    ensure!(
        metric(
            &d,
            r#"kiln_ingest_rejections_total{protocol="rtmp",reason="codec"}"#
        )
        .await?
            >= 1.0
    );

    // a truncated handshake and a connection that never says anything are closed after the idle timeout (3 s)
    let truncated = closed_after(&rtmp, &[3, 0, 0, 0, 0, 1, 2, 3], Duration::from_secs(10)).await?;
    let silent = closed_after(&rtmp, &[], Duration::from_secs(10)).await?;
    ensure!(
        truncated >= Duration::from_secs(2) && silent >= Duration::from_secs(2),
        "{truncated:?} {silent:?}"
    );
    ensure!(
        metric(
            &d,
            r#"kiln_ingest_rejections_total{protocol="rtmp",reason="timeout"}"#
        )
        .await?
            >= 2.0
    );

    // an SRT publisher stays connected through what follows
    let h2 = publish_stream(&d, "h2").await?;
    let _steady_srt = ffmpeg_publish(
        h2["srt_url"].as_str().context("srt_url")?,
        "mpegts",
        "160x90",
        60,
    )?;
    let before = wait_state(&d, "h2", "running", Duration::from_secs(30)).await?;
    let since = before["publisher"]["connected_unix_ms"]
        .as_u64()
        .context("connected")?;

    // a handshake that srt-protocol 0.4.4 panics on (a conclusion with extension type 6): the port's guard drops
    // it before the library parses it (without the guard, every SRT publisher on the port was cut off)
    let mut crafted = vec![0x80, 0, 0, 0];
    crafted.extend_from_slice(&[0; 12]);
    for w in [5u32, 4, 1234, 1500, 8192, u32::MAX, 0x1111, 0, 0, 0, 0, 0] {
        crafted.extend_from_slice(&w.to_be_bytes());
    }
    crafted.extend_from_slice(&[0, 6, 0, 1, b'l', b'i', b'v', b'e']);
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    for _ in 0..10 {
        udp.send_to(&crafted, &srt).await?;
    }

    // 10 s of random bytes into both listeners
    random_bytes(&rtmp, &srt, 10).await?;
    ensure!(
        metric(
            &d,
            r#"kiln_ingest_rejections_total{protocol="rtmp",reason="protocol"}"#
        )
        .await?
            >= 1.0
    );

    // still healthy: the steady stream kept publishing, and both listeners still take a real publisher
    let (code, _) = d.get_text("/healthz").await?;
    ensure!(code == 200);
    ensure!(
        metric(&d, parts).await? > parts_before + 20.0,
        "the steady stream stalled"
    );
    let after = status(&d, "h2").await?;
    ensure!(
        after["state"] == "running"
            && after["publisher"]["connected_unix_ms"].as_u64() == Some(since),
        "the SRT publisher was cut off by hostile datagrams: {after}"
    );
    let _srt_ok = ffmpeg_publish(
        h1["srt_url"].as_str().context("srt_url")?,
        "mpegts",
        "320x180",
        20,
    )?;
    wait_state(&d, "h1", "running", Duration::from_secs(30)).await?;
    d.shutdown().await
}

/// A self-signed certificate for 127.0.0.1 (openssl), in a fresh directory.
fn self_signed() -> Result<kilnd::TlsFiles> {
    let dir = std::env::temp_dir().join(format!("kiln-rtmps-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let st = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("openssl")?;
    ensure!(st.success(), "openssl could not make a certificate");
    Ok(kilnd::TlsFiles { cert, key })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_publishes_over_rtmps_with_the_daemons_certificate() -> Result<()> {
    let d = daemon_with(None, Some(self_signed()?), Duration::from_secs(15)).await?;
    let body = format!(r#"{{"source": "publish:", {LADDER}}}"#);
    // the daemon serves HTTPS now: the harness's client speaks plain HTTP, so the stream is made behind it
    let req: kiln_model::StreamRequest = serde_json::from_str(&body)?;
    let (h, _) = d.state.supervisor.create("tls1", req).await?;
    let info = d.state.supervisor.ingest_info(&h).context("ingest info")?;
    let url = info.rtmps_url.context("rtmps_url")?;
    ensure!(url.starts_with("rtmps://127.0.0.1:"), "{url}");
    // ffmpeg does not verify the certificate unless asked (tls_verify=0), as OBS users with a self-signed one do
    let _p = ffmpeg_publish(&url, "flv", "320x180", 20)?;
    poll_until(
        "tls1 running",
        Duration::from_secs(30),
        Duration::from_millis(250),
        || async {
            Ok(match h.state() {
                kiln_model::StreamState::Running => Polled::Done(()),
                s => Polled::NotYet(format!("{s:?} {:?}", h.status().errors)),
            })
        },
    )
    .await?;
    let p = h.status().publisher.context("publisher")?;
    ensure!(
        p.codecs.contains(&"h264".to_string()) && p.bytes > 10_000,
        "{p:?}"
    );
    d.shutdown().await
}

/// The video tags of an FLV file: (timestamp ms, body).
fn flv_video_tags(flv: &[u8]) -> Result<Vec<(u32, Vec<u8>)>> {
    ensure!(flv.starts_with(b"FLV"), "not FLV");
    let mut at = usize::from(flv[8]) + 4; // header, PreviousTagSize0
    let mut tags = Vec::new();
    while at + 11 <= flv.len() {
        let kind = flv[at];
        let size = u32::from_be_bytes([0, flv[at + 1], flv[at + 2], flv[at + 3]]) as usize;
        let ts = u32::from_be_bytes([flv[at + 7], flv[at + 4], flv[at + 5], flv[at + 6]]);
        let body = flv.get(at + 11..at + 11 + size).context("truncated tag")?;
        if kind == 9 {
            tags.push((ts, body.to_vec()));
        }
        at += 11 + size + 4;
    }
    Ok(tags)
}

/// An RTMP publisher whose clock starts 1.5 s before the 32-bit wrap and then jumps an hour ahead: every fragment's
/// `tfdt` is where the previous one ended. (Two layers keep it: kiln's `kiln_model::ingest::flv::Timeline`, and
/// GStreamer's `flvdemux`, which resyncs on jumps over 2 s by itself: with the Timeline bypassed this test still
/// passed. It checks the outcome; the Timeline's own rule is unit- and property-tested.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_clock_that_wraps_and_jumps_keeps_tfdt_continuous() -> Result<()> {
    use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
    use rml_rtmp::sessions::{
        ClientSession, ClientSessionConfig, ClientSessionEvent, ClientSessionResult,
        PublishRequestType,
    };
    use rml_rtmp::time::RtmpTimestamp;
    let dir = std::env::temp_dir().join(format!("kiln-jump-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("clip.flv");
    let st = tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-loglevel", "error", "-y"])
        .args([
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x180:rate=30",
            "-t",
            "7",
        ])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-tune",
            "zerolatency",
            "-g",
            "30",
        ])
        .args(["-pix_fmt", "yuv420p", "-an", "-f", "flv"])
        .arg(&file)
        .status()
        .await?;
    ensure!(st.success(), "ffmpeg could not make the clip");
    let tags = flv_video_tags(&std::fs::read(&file)?)?;
    let _ = std::fs::remove_dir_all(&dir);
    ensure!(tags.len() >= 200, "{} video tags", tags.len());

    let d = daemon(None).await?;
    let (rtmp, _) = listeners(&d)?;
    let body = r#"{"source": "publish:", "audio": {"enabled": false},
        "renditions": [{"name": "hi", "width": 320, "height": 180, "fps": 30, "bitrate_kbps": 300}]}"#;
    let (code, v) = d.put_stream("jump", body).await?;
    ensure!(code == 201, "{v}");
    let key = v["ingest"]["key"].as_str().context("key")?.to_string();

    // handshake, connect, publish (as rtmp_client_publish does), then the tags in real time
    let mut sock = TcpStream::connect(&rtmp).await?;
    let mut hs = Handshake::new(PeerType::Client);
    sock.write_all(&hs.generate_outbound_p0_and_p1()?).await?;
    let mut buf = vec![0u8; 8192];
    let mut input = loop {
        let n = sock.read(&mut buf).await?;
        ensure!(n > 0, "closed in the handshake");
        match hs.process_bytes(&buf[..n])? {
            HandshakeProcessResult::InProgress { response_bytes } => {
                sock.write_all(&response_bytes).await?
            }
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => {
                sock.write_all(&response_bytes).await?;
                break remaining_bytes;
            }
        }
    };
    let (mut session, _) = ClientSession::new(ClientSessionConfig::new())?;
    let bytes_of = |r: ClientSessionResult| match r {
        ClientSessionResult::OutboundResponse(p) => p.bytes,
        _ => Vec::new(),
    };
    sock.write_all(&bytes_of(session.request_connection("live".into())?))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    'publish: loop {
        for r in session.handle_input(&input)? {
            match r {
                ClientSessionResult::OutboundResponse(p) => sock.write_all(&p.bytes).await?,
                ClientSessionResult::RaisedEvent(ClientSessionEvent::ConnectionRequestAccepted) => {
                    let r = session.request_publishing(key.clone(), PublishRequestType::Live)?;
                    sock.write_all(&bytes_of(r)).await?;
                }
                ClientSessionResult::RaisedEvent(ClientSessionEvent::PublishRequestAccepted) => {
                    break 'publish
                }
                _ => {}
            }
        }
        ensure!(Instant::now() < deadline, "publish not accepted");
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await??;
        ensure!(n > 0, "closed before publishing");
        input = buf[..n].to_vec();
    }
    let start = Instant::now();
    for (ts, body) in &tags {
        tokio::time::sleep_until((start + Duration::from_millis(u64::from(*ts))).into()).await;
        // 1.5 s before 2^32 ms at the start, and an hour ahead from 3.5 s on
        let mut clock = ts.wrapping_add(u32::MAX - 1_500);
        if *ts >= 3_500 {
            clock = clock.wrapping_add(3_600_000);
        }
        let r =
            session.publish_video_data(body.clone().into(), RtmpTimestamp::new(clock), false)?;
        sock.write_all(&bytes_of(r)).await?;
    }

    // every fragment the playlist lists (whole segments, then the open segment's parts), in order, starts where the
    // previous one ended
    let s = status(&d, "jump").await?;
    ensure!(s["state"] == "running", "{s}");
    let (_, text) = d.get_text("/live/jump/hi/index.m3u8").await?;
    let pl = kiln_integration::parse_ll(&text)?;
    let init = d
        .get_bytes(&format!("/live/jump/hi/{}", pl.map_uri))
        .await?;
    let (mut prev, mut total, mut timescale) = (None::<u64>, 0u64, 1u64);
    for seg in &pl.segments {
        let uris: Vec<String> = match &seg.uri {
            Some(u) => vec![u.clone()],
            None => seg.parts.iter().map(|p| p.uri.clone()).collect(),
        };
        for uri in uris {
            let bytes = d.get_bytes(&format!("/live/jump/hi/{uri}")).await?;
            let f = kiln_integration::fragment(&init, &bytes)?;
            timescale = u64::from(f.timescale.max(1));
            for (tfdt, dur) in &f.moofs {
                if let Some(end) = prev {
                    ensure!(*tfdt == end, "{uri}: tfdt {tfdt} != {end}");
                }
                prev = Some(tfdt + dur);
                total += dur;
            }
        }
    }
    ensure!(
        total >= 5 * timescale,
        "the fragments cover only {} s across the wrap and the jump",
        total as f64 / timescale as f64
    );
    d.shutdown().await
}

/// A publisher whose bytes flow but never decode (GStreamer's `mpegtsmux` without `alignment=7` behind `srtsink`:
/// SRT messages split TS packets, so the SPS/PPS never arrive whole) is cut off after the first-picture timeout
/// (5 s here) with a reason, and the stream waits for the next publisher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_whose_bytes_never_decode_is_cut_off_after_the_first_picture_timeout(
) -> Result<()> {
    let d = daemon_with(None, None, Duration::from_secs(5)).await?;
    let (_, srt) = listeners(&d)?;
    let ingest = publish_stream(&d, "nodec").await?;
    let pass = ingest["passphrase"].as_str().context("passphrase")?;
    let sender = "-q videotestsrc is-live=true ! video/x-raw,format=I420,width=320,height=180,framerate=30/1 \
        ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=60 ! h264parse ! mux. \
        audiotestsrc is-live=true ! audioconvert ! avenc_aac ! aacparse ! mux. mpegtsmux name=mux ! srtsink";
    let _p = tokio::process::Command::new("gst-launch-1.0")
        .args(sender.split_whitespace())
        .arg(format!("uri=srt://{srt}"))
        .arg("streamid=#!::r=nodec,m=publish")
        .arg(format!("passphrase={pass}"))
        .arg("pbkeylen=16")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    poll_until(
        "nodec is cut off",
        Duration::from_secs(30),
        Duration::from_millis(250),
        || async {
            let s = status(&d, "nodec").await?;
            Ok(if s["errors"].to_string().contains("nothing decodable") {
                Polled::Done(())
            } else {
                Polled::NotYet(s.to_string())
            })
        },
    )
    .await?;
    wait_state(&d, "nodec", "waiting", Duration::from_secs(10)).await?;
    let n = metric(
        &d,
        r#"kiln_ingest_disconnections_total{protocol="srt",reason="no_picture"}"#,
    )
    .await?;
    ensure!(n >= 1.0, "no_picture disconnections: {n}");
    d.shutdown().await
}

/// A publisher over `--ingest-max-bitrate-kbps` (300 here; ffmpeg sends about 1,500 kbit/s of noise-like video)
/// is cut off at the end of its first 5 s window, with the reason, and the slate stands in until the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_over_the_bitrate_limit_is_cut_off() -> Result<()> {
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let config = kilnd::Config {
        ingest: kilnd::config::IngestConfig {
            rtmp_listen: Some(any),
            max_bitrate_kbps: 300,
            ..Default::default()
        },
        gpus: Some(Vec::new()),
        ..Default::default()
    };
    let d = Daemon::start(config).await?;
    let body = r#"{"source": "publish:", "audio": {"enabled": false},
        "renditions": [{"name": "hi", "width": 320, "height": 180, "fps": 30, "bitrate_kbps": 300}]}"#;
    let (code, v) = d.put_stream("fat", body).await?;
    ensure!(code == 201, "{v}");
    let url = v["ingest"]["rtmp_url"]
        .as_str()
        .context("rtmp_url")?
        .to_string();
    let fat = tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-loglevel", "error", "-re"])
        .args([
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x180:rate=30,noise=alls=100:allf=t",
        ])
        .args([
            "-t",
            "30",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-b:v",
            "1500k",
        ])
        .args([
            "-minrate", "1500k", "-maxrate", "1500k", "-bufsize", "500k", "-an",
        ])
        .args(["-f", "flv", &url])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    refused(fat, Duration::from_secs(20)).await?;
    // it was on air: the slate stands in
    let s = wait_input(&d, "fat", "slate", Duration::from_secs(10)).await?;
    ensure!(
        s["errors"]
            .to_string()
            .contains("--ingest-max-bitrate-kbps"),
        "{s}"
    );
    let n = metric(
        &d,
        r#"kiln_ingest_disconnections_total{protocol="rtmp",reason="bitrate"}"#,
    )
    .await?;
    ensure!(n == 1.0, "bitrate disconnections: {n}");
    d.shutdown().await
}

/// The webhooks' HMAC key in these tests.
const WEBHOOK_SECRET: &str = "kiln-test-webhook-secret-0123456789";

/// A webhook receiver on loopback: records every delivery it accepts (event and whether its signature is right,
/// checked here with an HMAC of our own) and answers 503 while `down`, counting those refusals.
struct Receiver {
    url: String,
    got: std::sync::Arc<parking_lot::Mutex<Vec<(serde_json::Value, bool)>>>,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    refused: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// `t=…,v1=…` is HMAC-SHA256(secret, "t.body"), and `t` is within 5 minutes of now.
fn signed_right(header: &str, body: &[u8]) -> bool {
    use hmac::Mac;
    let (Some(t), Some(v1)) = (
        header.split(',').find_map(|p| p.strip_prefix("t=")),
        header.split(',').find_map(|p| p.strip_prefix("v1=")),
    ) else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let fresh = t.parse::<u64>().is_ok_and(|t| t.abs_diff(now) < 300);
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).expect("any key");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    fresh && hex::decode(v1).is_ok_and(|v| mac.verify_slice(&v).is_ok())
}

async fn receiver() -> Result<Receiver> {
    use std::sync::atomic::Ordering;
    let got = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (g, d, r) = (got.clone(), down.clone(), refused.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: bytes::Bytes| {
            let (g, d, r) = (g.clone(), d.clone(), r.clone());
            async move {
                if d.load(Ordering::SeqCst) {
                    r.fetch_add(1, Ordering::SeqCst);
                    return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                }
                let sig = headers
                    .get("kiln-signature")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let ok = signed_right(sig, &body);
                match serde_json::from_slice::<serde_json::Value>(&body) {
                    Ok(ev) => g.lock().push((ev, ok)),
                    Err(_) => return axum::http::StatusCode::BAD_REQUEST,
                }
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(Receiver {
        url,
        got,
        down,
        refused,
    })
}

impl Receiver {
    /// Distinct events received (by id) for `subject` (a stream or job id), in the order they arrived.
    fn events_of(&self, subject: &str) -> Vec<serde_json::Value> {
        let mut seen = std::collections::HashSet::new();
        self.got
            .lock()
            .iter()
            .map(|(e, _)| e.clone())
            .filter(|e| e["stream"] == subject || e["job"] == subject)
            .filter(|e| seen.insert(e["id"].to_string()))
            .collect()
    }

    /// Waits until `subject`'s events are exactly `types`, in that order and in increasing `seq`.
    async fn expect(&self, subject: &str, types: &[&str]) -> Result<()> {
        poll_until(
            &format!("{subject}: {types:?}"),
            Duration::from_secs(60),
            Duration::from_millis(200),
            || async {
                let evs = self.events_of(subject);
                let kinds: Vec<&str> = evs.iter().filter_map(|e| e["type"].as_str()).collect();
                if kinds.len() < types.len() {
                    return Ok(Polled::NotYet(format!("{kinds:?}")));
                }
                ensure!(kinds == types, "{subject}: got {kinds:?}, want {types:?}");
                let seqs: Vec<u64> = evs.iter().filter_map(|e| e["seq"].as_u64()).collect();
                ensure!(
                    seqs.windows(2).all(|w| w[0] < w[1]),
                    "{subject}: out of order: {seqs:?}"
                );
                Ok(Polled::Done(()))
            },
        )
        .await
    }
}

/// Every event type reaches the receiver, signed, and each stream's and job's events in order; events raised
/// while the receiver answers 503 are retried and arrive once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_report_every_event_signed_in_order_and_outlast_a_receiver_outage() -> Result<()> {
    let rx = receiver().await?;
    rx.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let dir = tempfile::tempdir()?;
    let media = dir.path().join("media");
    std::fs::create_dir_all(&media)?;
    std::fs::write(media.join("junk.ts"), vec![0x5au8; 64 << 10])?;
    kiln_integration::make_clip(
        &media.join("clip.mp4"),
        1.0,
        Some("testsrc2=size=160x90:rate=30"),
        &["sine=frequency=440:sample_rate=48000"],
        &["-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac"],
    )
    .await?;
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let config = kilnd::Config {
        ingest: kilnd::config::IngestConfig {
            rtmp_listen: Some(any),
            ..Default::default()
        },
        media_dir: Some(media.clone()),
        jobs: Some(kilnd::jobs::JobsConfig {
            input_dir: Some(media.clone()),
            ..kilnd::jobs::JobsConfig::new(dir.path().join("data"))
        }),
        webhooks: Some(kilnd::webhooks::WebhookConfig {
            url: rx.url.clone(),
            secret: WEBHOOK_SECRET.as_bytes().to_vec(),
            dir: dir.path().join("data/webhooks"),
        }),
        capacity: kiln_model::capacity::Resources {
            cpu_millicores: 64_000,
            memory_mib: 64_000,
            ..Default::default()
        },
        gpus: Some(Vec::new()),
        ..Default::default()
    };
    let d = Daemon::start(config).await?;
    // an encoder that fails mid-stream (the test-only fault) and its fallback, while the receiver is down
    let req: kiln_model::StreamRequest = serde_json::from_str(small_stream_spec())?;
    d.state
        .supervisor
        .create_with_encoder_fault("f", req, 90)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    poll_until(
        "f falls back",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let s = status(&d, "f").await?;
            Ok(
                if s["fallbacks"].as_array().is_some_and(|f| !f.is_empty()) {
                    Polled::Done(())
                } else {
                    Polled::NotYet(s["state"].to_string())
                },
            )
        },
    )
    .await?;
    ensure!(
        rx.refused.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "nothing was tried during the outage"
    );
    rx.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let res = d.http.delete(d.url("/v1/streams/f")).send().await?;
    ensure!(res.status() == 204);
    rx.expect(
        "f",
        &[
            "stream.created",
            "stream.started",
            "encoder.fallback",
            "stream.ended",
        ],
    )
    .await?;

    // a publisher comes and goes (mode end: the stream ends with it)
    let body =
        format!(r#"{{"source": "publish:", "on_source_loss": {{"mode": "end"}}, {LADDER}}}"#);
    let (code, v) = d.put_stream("p", &body).await?;
    ensure!(code == 201, "{v}");
    let url = v["ingest"]["rtmp_url"]
        .as_str()
        .context("rtmp_url")?
        .to_string();
    let mut publisher = ffmpeg_publish(&url, "flv", "320x180", 60)?;
    wait_state(&d, "p", "running", Duration::from_secs(30)).await?;
    publisher.kill().await?;
    rx.expect(
        "p",
        &[
            "stream.created",
            "source.connected",
            "stream.started",
            "source.lost",
            "stream.ended",
        ],
    )
    .await?;

    // a source that is not media fails the stream; a job fails, another is done
    let (code, v) = d
        .put_stream(
            "bad",
            &format!(r#"{{"source": "file:///junk.ts", {LADDER}}}"#),
        )
        .await?;
    ensure!(code == 201, "{v}");
    rx.expect("bad", &["stream.created", "stream.failed"])
        .await?;
    let mut jobs = Vec::new();
    for input in ["junk.ts", "clip.mp4"] {
        let body = serde_json::json!({
            "input": format!("file://{}", media.join(input).display()),
            "renditions": [{"name": "lo", "width": 160, "height": 90, "fps": 30, "bitrate_kbps": 100}],
            "x264_speed": "veryfast",
            "outputs": {"thumbnails": false},
        });
        let r = d.http.post(d.url("/v1/jobs")).json(&body).send().await?;
        ensure!(r.status() == 201, "job {input}: {}", r.status());
        let v: serde_json::Value = r.json().await?;
        jobs.push(v["id"].as_str().context("job id")?.to_string());
    }
    rx.expect(&jobs[0], &["job.failed"]).await?;
    rx.expect(&jobs[1], &["job.done"]).await?;
    let got = rx.got.lock().clone();
    ensure!(
        got.iter().all(|(_, ok)| *ok),
        "a delivery was not signed right"
    );
    let types: std::collections::BTreeSet<&str> =
        got.iter().filter_map(|(e, _)| e["type"].as_str()).collect();
    // source.failover needs a backup: the backup test checks it
    let all: std::collections::BTreeSet<&str> = kilnd::webhooks::EVENT_TYPES
        .into_iter()
        .filter(|t| *t != "source.failover")
        .collect();
    ensure!(types == all, "types seen: {types:?}");
    // nothing came after the expected events (a repeat would have the same id; another event would not)
    for (subject, want) in [
        ("f", 4),
        ("p", 5),
        ("bad", 2),
        (jobs[0].as_str(), 1),
        (jobs[1].as_str(), 1),
    ] {
        let n = rx.events_of(subject).len();
        ensure!(n == want, "{subject}: {n} events, want {want}");
    }
    ensure!(metric(&d, r#"kiln_webhook_deliveries_total{result="error"}"#).await? >= 1.0);
    let ok = metric(&d, r#"kiln_webhook_deliveries_total{result="ok"}"#).await?;
    ensure!(
        ok == got.len() as f64,
        "{ok} deliveries counted, {} received",
        got.len()
    );
    d.shutdown().await
}

/// Events written before a `kill -9` (the receiver was down) are sent by the next start of the daemon, with their
/// numbers; none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_events_outlive_a_kill_9_of_the_daemon() -> Result<()> {
    const KILND: &str = env!("CARGO_BIN_EXE_kiln-it-kilnd");
    let rx = receiver().await?;
    rx.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data").display().to_string();
    let argv = [
        "--data-dir",
        &data,
        "--webhook-url",
        &rx.url,
        "--webhook-secret-env",
        "KILN_IT_WEBHOOK_SECRET",
    ];
    let env = [("KILN_IT_WEBHOOK_SECRET", WEBHOOK_SECRET)];
    let mut p = kiln_integration::spawn_kilnd_env("kilnd", KILND, &argv, &env).await?;
    let http = reqwest::Client::new();
    let r = http
        .put(format!("{}/v1/streams/k", p.url))
        .json(&serde_json::from_str::<serde_json::Value>(
            small_stream_spec(),
        )?)
        .send()
        .await?;
    ensure!(r.status() == 201, "PUT k: {}", r.status());
    kiln_integration::poll_json(
        &http,
        &format!("{}/v1/streams/k", p.url),
        "k running",
        Duration::from_secs(30),
        |v| v["state"] == "running",
    )
    .await?;
    // both events are on disk before the kill
    let outbox = dir.path().join("data/webhooks/outbox");
    let files = |outbox: &std::path::Path| -> Result<usize> {
        Ok(std::fs::read_dir(outbox)?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .count())
    };
    poll_until(
        "two events in the outbox",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            let n = files(&outbox)?;
            Ok(if n >= 2 {
                Polled::Done(())
            } else {
                Polled::NotYet(format!("{n} files"))
            })
        },
    )
    .await?;
    p.kill().await?;
    rx.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let _p = kiln_integration::spawn_kilnd_env("kilnd", KILND, &argv, &env).await?;
    rx.expect("k", &["stream.created", "stream.started"])
        .await?;
    ensure!(
        rx.got.lock().iter().all(|(_, ok)| *ok),
        "a delivery was not signed right"
    );
    poll_until(
        "the outbox empties",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || async {
            let n = files(&outbox)?;
            Ok(if n == 0 {
                Polled::Done(())
            } else {
                Polled::NotYet(format!("{n} files"))
            })
        },
    )
    .await
}

/// An H.264 file for a passthrough publisher: 320x180 at 30 fps, a fixed GOP of `gop` frames (no scene cuts), with
/// B-frames when `bframes` (their decode order differs from their presentation order), `seconds` long.
fn h264_file(
    dir: &std::path::Path,
    gop: u32,
    bframes: bool,
    seconds: u32,
) -> Result<std::path::PathBuf> {
    let path = dir.join(format!("gop{gop}.ts"));
    let gop = gop.to_string();
    let mut cmd = std::process::Command::new("ffmpeg");
    cmd.args(["-hide_banner", "-nostdin", "-loglevel", "error", "-y"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=320x180:rate=30"])
        .args([
            "-t",
            &seconds.to_string(),
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
        ])
        .args([
            "-g",
            &gop,
            "-keyint_min",
            &gop,
            "-sc_threshold",
            "0",
            "-pix_fmt",
            "yuv420p",
        ])
        .args(["-bf", if bframes { "2" } else { "0" }])
        .arg(&path);
    let out = cmd.output()?;
    ensure!(
        out.status.success(),
        "ffmpeg: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(path)
}

/// MD5 of each coded picture's slices (SEI, SPS, PPS and AUD removed: a remuxer may move those), in decode order.
async fn slice_hashes(path: &std::path::Path) -> Result<Vec<String>> {
    let out = tokio::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(["-map", "0:v", "-c", "copy", "-bsf:v"])
        .arg("h264_mp4toannexb,filter_units=remove_types=6|7|8|9")
        .args(["-f", "framemd5", "-"])
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "framemd5: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .filter(|l| !l.starts_with('#'))
        // stream, dts, pts, duration, size, hash[, side data…]
        .filter_map(|l| l.split(',').nth(5).map(|h| h.trim().to_string()))
        .collect())
}

/// (MSN, PROGRAM-DATE-TIME, EXTINF) of each complete segment listed in a media playlist.
fn segment_times(text: &str) -> Vec<(u64, String, f64)> {
    let mut msn = text
        .lines()
        .find_map(|l| l.strip_prefix("#EXT-X-MEDIA-SEQUENCE:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let (mut pdt, mut inf) = (String::new(), None);
    let mut out = Vec::new();
    for l in text.lines() {
        if let Some(v) = l.strip_prefix("#EXT-X-PROGRAM-DATE-TIME:") {
            pdt = v.to_string();
        } else if let Some(v) = l.strip_prefix("#EXTINF:") {
            inf = v.trim_end_matches(',').parse::<f64>().ok();
        } else if l.starts_with("seg-") {
            if let Some(d) = inf.take() {
                out.push((msn, pdt.clone(), d));
            }
            msn += 1;
        }
    }
    out
}

/// (MSN, EXT-X-MAP URI, discontinuity before it, URI) of each complete segment listed in a media playlist.
fn segments_with_maps(text: &str) -> Vec<(u64, String, bool, String)> {
    let mut msn = text
        .lines()
        .find_map(|l| l.strip_prefix("#EXT-X-MEDIA-SEQUENCE:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let (mut map, mut disc) = (String::new(), false);
    let mut out = Vec::new();
    for l in text.lines() {
        if let Some(v) = l.strip_prefix("#EXT-X-MAP:URI=") {
            map = v.trim_matches('"').to_string();
        } else if l == "#EXT-X-DISCONTINUITY" {
            disc = true;
        } else if l.starts_with("seg-") {
            out.push((msn, map.clone(), std::mem::take(&mut disc), l.to_string()));
            msn += 1;
        }
    }
    out
}

/// A passthrough stream through a loss and a reconnect (the slate on air): the top encoded rendition fills in for
/// the publisher's bitstream, each switch opens a discontinuity in every rendition at the same MSN, and the
/// publisher's pictures are back bit for bit after it reconnects.
async fn passthrough_through_a_loss(d: &Daemon, dir: &std::path::Path) -> Result<()> {
    // B-frames: the source's IDR decodes before the fill's last frame is shown
    let file = h264_file(dir, 60, true, 6)?;
    let body = r#"{"source": "publish:", "audio": {"enabled": false},
        "renditions": [{"name": "source", "passthrough": true, "width": 320, "height": 180},
                       {"name": "lo", "width": 160, "height": 90, "fps": 30, "bitrate_kbps": 120}]}"#;
    let (code, v) = d.put_stream("pts", body).await?;
    ensure!(code == 201, "PUT pts: {code} {v}");
    let url = v["ingest"]["srt_url"]
        .as_str()
        .context("srt_url")?
        .to_string();
    let publish = || {
        tokio::process::Command::new("ffmpeg")
            .args([
                "-hide_banner",
                "-nostdin",
                "-loglevel",
                "error",
                "-re",
                "-i",
            ])
            .arg(&file)
            .args(["-c", "copy", "-f", "mpegts", &url])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
    };
    let _first = publish()?;
    wait_state(d, "pts", "running", Duration::from_secs(30)).await?;
    eprintln!("pts: running");
    // the 6 s file ends: the slate
    wait_input(d, "pts", "slate", Duration::from_secs(20)).await?;
    eprintln!("pts: on the slate");
    let _second = publish()?;
    wait_input(d, "pts", "source", Duration::from_secs(20)).await?;
    eprintln!("pts: back on the source");
    // two switches, and two complete segments of the publisher after the second
    let text = poll_until(
        "pts: back on the publisher's bitstream",
        Duration::from_secs(20),
        Duration::from_millis(250),
        || async {
            let (_, text) = d.get_text("/live/pts/source/index.m3u8").await?;
            let segs = segments_with_maps(&text);
            let after = segs
                .iter()
                .skip_while(|s| !s.2)
                .skip(1)
                .skip_while(|s| !s.2)
                .count();
            Ok(if after >= 2 {
                Polled::Done(text)
            } else {
                Polled::NotYet(text)
            })
        },
    )
    .await?;
    let (_, lo_text) = d.get_text("/live/pts/lo/index.m3u8").await?;
    let disc = |t: &str| -> Vec<u64> {
        segments_with_maps(t)
            .iter()
            .filter(|s| s.2)
            .map(|s| s.0)
            .collect()
    };
    let (src_disc, lo_disc) = (disc(&text), disc(&lo_text));
    let dseq = |t: &str| {
        t.lines()
            .find_map(|l| l.strip_prefix("#EXT-X-DISCONTINUITY-SEQUENCE:"))
            .map(str::to_string)
    };
    ensure!(
        dseq(&text) == dseq(&lo_text),
        "discontinuity sequences differ"
    );
    ensure!(
        src_disc.len() >= 2 && lo_disc.ends_with(&src_disc),
        "discontinuities at {src_disc:?} in source, {lo_disc:?} in lo:\n{text}\n{lo_text}"
    );
    // the last segment is the publisher's, bit for bit, under a new init; the one before the second switch is lo's
    // picture (160x90)
    let segs = segments_with_maps(&text);
    let last = segs.last().context("a segment")?;
    let fill = segs
        .iter()
        .rev()
        .find(|s| s.0 < src_disc[src_disc.len() - 1])
        .context("the fill")?;
    let fetch = |s: &(u64, String, bool, String)| {
        let (map, seg) = (s.1.clone(), s.3.clone());
        async move {
            let mut bytes = d
                .get_bytes(&format!("/live/pts/source/{map}"))
                .await?
                .to_vec();
            bytes.extend_from_slice(&d.get_bytes(&format!("/live/pts/source/{seg}")).await?);
            let mut f = tempfile::NamedTempFile::new()?;
            std::io::Write::write_all(&mut f, &bytes)?;
            anyhow::Ok(f)
        }
    };
    // the first segment back on the publisher (it starts on its IDR) and the last are its pictures, bit for bit
    let back = segs
        .iter()
        .find(|s| s.0 == src_disc[src_disc.len() - 1])
        .context("the segment after the second switch")?;
    let sent = slice_hashes(&file).await?;
    for seg in [back, last] {
        let got = slice_hashes(fetch(seg).await?.path()).await?;
        let first = sent.iter().position(|h| *h == got[0]).with_context(|| {
            format!(
                "segment {} does not start with one of the file's pictures",
                seg.0
            )
        })?;
        ensure!(
            sent[first..].starts_with(&got) && got.len() >= 30,
            "segment {}: {} pictures, not the file's",
            seg.0,
            got.len()
        );
    }
    let fill_file = fetch(fill).await?;
    let probe = tokio::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v",
            "-show_entries",
            "stream=width,height",
            "-of",
            "csv=p=0",
        ])
        .arg(fill_file.path())
        .output()
        .await?;
    let size = String::from_utf8_lossy(&probe.stdout).trim().to_string();
    ensure!(size == "160,90", "the fill segment {} is {size}", fill.0);
    ensure!(
        last.1 != fill.1,
        "the publisher's bitstream needs its own init: {text}"
    );
    eprintln!("pts: discontinuities at {src_disc:?} in every rendition, the fill at 160x90, the publisher back bit for bit");
    let res = d.http.delete(d.url("/v1/streams/pts")).send().await?;
    ensure!(res.status() == 204, "DELETE pts: {}", res.status());
    Ok(())
}

/// A passthrough rendition forwards the publisher's own H.264 (its slices are bit-identical), segments start at
/// the source's IDRs in every video rendition (same MSNs, same PROGRAM-DATE-TIMEs), and a 4 s GOP gives 4 s
/// segments under TARGETDURATION 4 with a warning in the status, B-frames and all; then through a loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passthrough_rendition_forwards_the_publishers_h264_on_its_gop() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = daemon(None).await?;
    // pt4: a GOP four times the 1 s target (longer than the encoders' own GOP limit would be), B-frames, and an
    // encoded rendition at half the source's rate
    // both publish at once (each needs three of its GOPs in real time), then each is checked; a stream ends with
    // its file (`on_source_loss: end`), and pt4 is checked after pt2, so the files last 40 s
    let mut publishing = Vec::new();
    for (id, gop, bframes, segment_ms, lo_fps) in [
        ("pt2", 60u32, false, 2000, 30),
        ("pt4", 120, true, 1000, 15),
    ] {
        let file = h264_file(dir.path(), gop, bframes, 40)?;
        let body = format!(
            r#"{{"source": "publish:", "on_source_loss": {{"mode": "end"}}, "audio": {{"enabled": false}},
            "segment_ms": {segment_ms},
            "renditions": [{{"name": "source", "passthrough": true, "bitrate_kbps": 900}},
                           {{"name": "lo", "width": 160, "height": 90, "fps": {lo_fps}, "bitrate_kbps": 120}}]}}"#
        );
        let (code, v) = d.put_stream(id, &body).await?;
        ensure!(code == 201, "PUT {id}: {code} {v}");
        let url = v["ingest"]["srt_url"]
            .as_str()
            .context("srt_url")?
            .to_string();
        let publisher = tokio::process::Command::new("ffmpeg")
            .args([
                "-hide_banner",
                "-nostdin",
                "-loglevel",
                "error",
                "-re",
                "-i",
            ])
            .arg(&file)
            .args(["-c", "copy", "-f", "mpegts", &url])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        publishing.push((id, gop, segment_ms, file, publisher));
    }
    for (id, gop, segment_ms, file, _publisher) in publishing {
        wait_state(&d, id, "running", Duration::from_secs(30)).await?;
        let secs = gop / 30;
        // three complete segments of the source rendition
        let text = poll_until(
            &format!("{id}: three segments"),
            Duration::from_secs(20),
            Duration::from_millis(250),
            || async {
                let (code, text) = d.get_text(&format!("/live/{id}/source/index.m3u8")).await?;
                Ok(if code == 200 && segment_times(&text).len() >= 3 {
                    Polled::Done(text)
                } else {
                    Polled::NotYet(format!("{code}: {text}"))
                })
            },
        )
        .await?;
        ensure!(
            text.contains(&format!("#EXT-X-TARGETDURATION:{}\n", secs.max(2))),
            "{id}: TARGETDURATION:\n{text}"
        );
        let source = segment_times(&text);
        for (msn, _, dur) in &source[1..] {
            ensure!(
                (dur - f64::from(secs)).abs() < 0.05,
                "{id}: segment {msn} is {dur} s, not the {secs} s GOP:\n{text}"
            );
        }
        // the encoded rendition keys on the same frames: same MSNs at the same times
        let (_, lo_text) = d.get_text(&format!("/live/{id}/lo/index.m3u8")).await?;
        ensure!(
            lo_text.contains(&format!("#EXT-X-TARGETDURATION:{}\n", secs.max(2))),
            "{id}: lo's TARGETDURATION:\n{lo_text}"
        );
        let lo = segment_times(&lo_text);
        let common: Vec<_> = source
            .iter()
            .filter_map(|(m, pdt, dur)| lo.iter().find(|(n, ..)| n == m).map(|l| (m, pdt, dur, l)))
            .collect();
        ensure!(
            common.len() >= 2,
            "{id}: no common segments:\n{text}\n{lo_text}"
        );
        for (msn, pdt, dur, (_, lo_pdt, lo_dur)) in &common {
            ensure!(
                *pdt == lo_pdt && (*dur - lo_dur).abs() < 0.002,
                "{id}: segment {msn} starts at {pdt} ({dur} s) in source, {lo_pdt} ({lo_dur} s) in lo"
            );
        }
        // the bytes are the publisher's: every coded picture of the window is one of the file's
        let window = window_file(&d, id, "source").await?;
        let got = slice_hashes(window.path()).await?;
        let sent = slice_hashes(&file).await?;
        ensure!(
            got.len() >= 2 * gop as usize,
            "{id}: {} pictures in the window",
            got.len()
        );
        let first = sent.iter().position(|h| *h == got[0]).with_context(|| {
            format!(
                "the window's first picture is not in the file: {:?} vs {:?}",
                &got[..3],
                &sent[..3]
            )
        })?;
        ensure!(
            sent[first..].starts_with(&got),
            "{id}: the window's {} pictures are not the file's from picture {first} on",
            got.len()
        );
        // every part that starts with an IDR says INDEPENDENT, and only those (the first part of each segment)
        let (_, text) = d.get_text(&format!("/live/{id}/source/index.m3u8")).await?;
        let (mut seen_part, mut first_in_segment, mut checked) = (false, None, 0);
        for l in text.lines() {
            if l.starts_with("#EXT-X-PART:") {
                if let Some(first) = first_in_segment {
                    ensure!(
                        l.contains("INDEPENDENT=YES") == first,
                        "{id}: {l} (first of its segment: {first})\n{text}"
                    );
                    checked += 1;
                    first_in_segment = Some(false);
                }
                seen_part = true;
            } else if l.starts_with("seg-") && seen_part {
                first_in_segment = Some(true);
            }
        }
        ensure!(checked >= 3, "{id}: {checked} parts checked\n{text}");
        let (_, master) = d.get_text(&format!("/live/{id}/master.m3u8")).await?;
        ensure!(master.contains("RESOLUTION=320x180"), "{id}: {master}");
        let s = status(&d, id).await?;
        let warned = s["warnings"].to_string().contains("GOP is longer");
        ensure!(
            warned == (gop * 1000 / 30 > segment_ms),
            "{id}: warnings {}",
            s["warnings"]
        );
        ensure!(
            s["renditions"][2]["passthrough"] == true || s["renditions"][1]["passthrough"] == true,
            "{s}"
        );
        eprintln!(
            "{id}: {} segments of {secs} s aligned across renditions, {} pictures bit-identical",
            common.len(),
            got.len()
        );
        let res = d
            .http
            .delete(d.url(&format!("/v1/streams/{id}")))
            .send()
            .await?;
        ensure!(res.status() == 204, "DELETE {id}: {}", res.status());
    }
    passthrough_through_a_loss(&d, dir.path()).await?;
    // what a passthrough rendition cannot be given
    for (body, what) in [
        (
            r#"{"source": "test:", "renditions": [{"name": "s", "passthrough": true}, {"name": "lo", "width": 160, "height": 90, "bitrate_kbps": 100}]}"#,
            "encoded source",
        ),
        (
            r#"{"source": "publish:", "on_source_loss": {"mode": "end"}, "renditions": [{"name": "s", "passthrough": true, "fps": 60}]}"#,
            "drop fps",
        ),
        (
            r#"{"source": "publish:", "on_source_loss": {"mode": "end"}, "renditions": [{"name": "s", "passthrough": true}]}"#,
            "at least one encoded video rendition",
        ),
    ] {
        let (code, v) = d.put_stream("bad", body).await?;
        ensure!(
            (400..500).contains(&code) && v.to_string().contains(what),
            "{body}: {code} {v}"
        );
    }
    d.shutdown().await
}

/// Two PUTs of one `publish:` stream at once (both start a pipeline before either is in the map): with the same
/// body one is created and the other answered with it (200); with different ingest keys the second gets 409,
/// not 200 with the first one's key, which its caller would then publish with and be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_of_one_stream_agree_only_when_they_ask_the_same() -> Result<()> {
    let d = daemon(None).await?;
    let body =
        |key: &str| format!(r#"{{"source": "publish:", "ingest": {{"key": "{key}"}}, {LADDER}}}"#);
    for (id, keys, want) in [
        (
            "same",
            ["aaaaaaaaaaaaaaaaaaaaaaaa", "aaaaaaaaaaaaaaaaaaaaaaaa"],
            [200, 201],
        ),
        (
            "other",
            ["aaaaaaaaaaaaaaaaaaaaaaaa", "cccccccccccccccccccccccc"],
            [201, 409],
        ),
    ] {
        let (first, second) = (body(keys[0]), body(keys[1]));
        let (a, b) = tokio::join!(d.put_stream(id, &first), d.put_stream(id, &second));
        let (a, b) = (a?, b?);
        let mut codes = [a.0, b.0];
        codes.sort();
        ensure!(codes == want, "{id}: {a:?} {b:?}");
        let res = d
            .http
            .delete(d.url(&format!("/v1/streams/{id}")))
            .send()
            .await?;
        ensure!(res.status().is_success(), "DELETE {id}: {}", res.status());
        // the keys are free again once the stream is gone
        poll_until(
            &format!("{id} removed"),
            Duration::from_secs(30),
            Duration::from_millis(100),
            || async {
                let (st, _) = d.get_text(&format!("/v1/streams/{id}")).await?;
                Ok(if st == 404 {
                    Polled::Done(())
                } else {
                    Polled::NotYet(st.to_string())
                })
            },
        )
        .await?;
    }
    d.shutdown().await
}

/// An RTSP server the daemon may reach (127.0.0.1 here) that redirects the DESCRIBE (302) to one it may not
/// (127.0.0.2): rtspsrc follows it by itself, past the address policy, and would ingest what that server sends.
/// No request reaches the other server (not a byte: GStreamer 1.22's rtspsrc connects before any hook runs, so
/// the TCP connection itself is made), and the stream fails with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rtsp_redirect_cannot_take_the_source_past_the_address_policy() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let forbidden = tokio::net::TcpListener::bind("127.0.0.2:0").await?;
    let forbidden_port = forbidden.local_addr()?.port();
    let reached = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = reached.clone();
    let trap = tokio::spawn(async move {
        while let Ok((mut c, _)) = forbidden.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = c.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    counted.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
    });
    // answers OPTIONS, and redirects every other request
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = server.local_addr()?.port();
    let redirector = tokio::spawn(async move {
        while let Ok((mut c, _)) = server.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while let Ok(n) = c.read(&mut chunk).await {
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let req = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end + 4);
                        let cseq = req
                            .lines()
                            .find_map(|l| l.strip_prefix("CSeq:").map(str::trim))
                            .unwrap_or("1")
                            .to_string();
                        let answer = if req.starts_with("OPTIONS") {
                            format!("RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\nPublic: OPTIONS, DESCRIBE, SETUP, PLAY\r\n\r\n")
                        } else {
                            format!(
                                "RTSP/1.0 302 Found\r\nCSeq: {cseq}\r\nLocation: rtsp://127.0.0.2:{forbidden_port}/internal-camera\r\n\r\n"
                            )
                        };
                        if c.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let d = daemon_pulling(None).await?;
    let body = format!(r#"{{"source": "rtsp://127.0.0.1:{port}/cam", {LADDER}}}"#);
    let (code, v) = d.put_stream("redirected", &body).await?;
    ensure!(code == 201, "{code} {v}");
    let seen = poll_until(
        "the stream says why its source went nowhere",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || async {
            let (_, text) = d.get_text("/v1/streams/redirected").await?;
            Ok(if text.contains("sent the source elsewhere") {
                Polled::Done(text)
            } else {
                Polled::NotYet(text)
            })
        },
    )
    .await?;
    ensure!(seen.contains("127.0.0.2"), "{seen}");
    ensure!(
        reached.load(std::sync::atomic::Ordering::SeqCst) == 0,
        "the daemon sent a request to the address the policy forbids"
    );
    redirector.abort();
    trap.abort();
    d.shutdown().await
}
