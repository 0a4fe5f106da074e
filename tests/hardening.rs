//! Hardening of the daemon's HTTP surface (issue 11, first part): the scheduler's fence moves only for accepted
//! commands and never to an impossible epoch, CORS is for playback only, unknown routes answer with the JSON
//! envelope, `/metrics` can require the token, and a flood of idle and slowloris connections is closed by the
//! server within its header timeout while playlists keep answering fast.
//!
//! Each test runs a real kilnd (`kilnd::serve_state` on 127.0.0.1:0) and talks to it over real sockets.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kiln_integration::Daemon;
use kiln_model::node::EPOCH_HEADER;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The cheapest stream that has playlists: AAC only.
const AUDIO_ONLY: &str = r#"{"source": "test:", "preset": "live-audio-only"}"#;

async fn put(
    d: &Daemon,
    id: &str,
    epoch: Option<&str>,
    body: &str,
) -> Result<(u16, serde_json::Value)> {
    let mut req = d
        .http
        .put(d.url(&format!("/v1/streams/{id}")))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(e) = epoch {
        req = req.header(EPOCH_HEADER, e);
    }
    let res = req.send().await?;
    let status = res.status().as_u16();
    let text = res.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).with_context(|| format!("body: {text}"))?,
    ))
}

async fn delete(d: &Daemon, id: &str, epoch: &str) -> Result<u16> {
    let res = d
        .http
        .delete(d.url(&format!("/v1/streams/{id}")))
        .header(EPOCH_HEADER, epoch)
        .send()
        .await?;
    Ok(res.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_moves_only_for_accepted_commands_and_never_to_an_impossible_epoch() -> Result<()>
{
    let d = Daemon::start_default().await?;
    let fence = || d.state.supervisor.fence_epoch();
    // the poisoning of the adversarial run: the largest epoch with an invalid body
    let (st, body) = put(&d, "x", Some("18446744073709551615"), "{not json").await?;
    ensure!(st == 400, "{st} {body}");
    ensure!(
        fence() == 0,
        "an invalid command moved the fence to {}",
        fence()
    );
    // the same epoch with a valid body: refused as impossible, not followed
    let (st, body) = put(&d, "x", Some("18446744073709551615"), AUDIO_ONLY).await?;
    ensure!(
        st == 400
            && body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("beyond")),
        "{st} {body}"
    );
    ensure!(fence() == 0);
    // a plausible epoch on a command that fails validation or admission moves nothing either
    let (st, _) = put(
        &d,
        "x",
        Some("5"),
        r#"{"source": "test:", "preset": "no-such-preset"}"#,
    )
    .await?;
    ensure!(st == 400, "{st}");
    ensure!(fence() == 0);
    // an accepted command raises it
    let (st, body) = put(&d, "x", Some("5"), AUDIO_ONLY).await?;
    ensure!(st == 201, "{st} {body}");
    ensure!(fence() == 5);
    // an older epoch is fenced out, with the machine-readable code the scheduler branches on
    let (st, body) = put(&d, "y", Some("4"), AUDIO_ONLY).await?;
    ensure!(
        st == 409 && body["error"]["code"] == "stale_epoch",
        "{st} {body}"
    );
    // a DELETE of a stream that does not exist is not accepted: no raise
    ensure!(delete(&d, "nope", "6").await? == 404);
    ensure!(fence() == 5);
    ensure!(delete(&d, "x", "6").await? == 204);
    ensure!(fence() == 6);
    // a scheduler that started a moment ago (an in-memory store's epoch is its start time in unix ms) still gets in
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis()
        .to_string();
    let (st, body) = put(&d, "z", Some(&now_ms), AUDIO_ONLY).await?;
    ensure!(st == 201, "{st} {body}");
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_for_playback_only_unless_an_operator_lists_origins() -> Result<()> {
    let d = Daemon::start_default().await?;
    let (st, _) = put(&d, "c", None, AUDIO_ONLY).await?;
    ensure!(st == 201);
    d.wait_for_segments("c", "audio", 1).await?;
    let acao = |r: &reqwest::Response| {
        r.headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap_or("").to_string())
    };
    let evil = "https://evil.example";
    // control: no CORS header on the preflight nor on the request itself
    let pre = d
        .http
        .request(reqwest::Method::OPTIONS, d.url("/v1/streams/c2"))
        .header("origin", evil)
        .header("access-control-request-method", "PUT")
        .header(
            "access-control-request-headers",
            "content-type,x-kiln-epoch",
        )
        .send()
        .await?;
    ensure!(
        acao(&pre).is_none(),
        "control preflight answered CORS: {:?}",
        pre.headers()
    );
    let res = d
        .http
        .get(d.url("/v1/streams"))
        .header("origin", evil)
        .send()
        .await?;
    ensure!(
        res.status() == 200 && acao(&res).is_none(),
        "{:?}",
        res.headers()
    );
    let res = d
        .http
        .put(d.url("/v1/streams/c3"))
        .header("origin", evil)
        .header("content-type", "application/json")
        .body(AUDIO_ONLY)
        .send()
        .await?;
    ensure!(acao(&res).is_none(), "{:?}", res.headers());
    // playback: any origin may read
    for path in ["/live/c/master.m3u8", "/live/c/audio/index.m3u8", "/time"] {
        let res = d
            .http
            .get(d.url(path))
            .header("origin", evil)
            .send()
            .await?;
        ensure!(
            res.status() == 200 && acao(&res).as_deref() == Some("*"),
            "{path}: {:?}",
            res.headers()
        );
        let pre = d
            .http
            .request(reqwest::Method::OPTIONS, d.url(path))
            .header("origin", evil)
            .header("access-control-request-method", "GET")
            .send()
            .await?;
        ensure!(
            acao(&pre).as_deref() == Some("*"),
            "{path} preflight: {:?}",
            pre.headers()
        );
    }
    d.shutdown().await?;

    // an operator's console origin, listed: it gets CORS on the control API, others still do not
    let console = "https://console.example";
    let d = Daemon::start(kilnd::Config {
        control_cors_origins: vec![console.parse()?],
        ..Default::default()
    })
    .await?;
    for (origin, want) in [(console, Some(console)), (evil, None)] {
        let pre = d
            .http
            .request(reqwest::Method::OPTIONS, d.url("/v1/streams/c2"))
            .header("origin", origin)
            .header("access-control-request-method", "PUT")
            .header(
                "access-control-request-headers",
                "authorization,content-type,x-kiln-epoch",
            )
            .send()
            .await?;
        ensure!(
            acao(&pre).as_deref() == want,
            "{origin}: {:?}",
            pre.headers()
        );
    }
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_answer_with_the_json_envelope_and_metrics_can_require_the_token(
) -> Result<()> {
    let token = "fleet-token-0123456789";
    let d = Daemon::start(kilnd::Config {
        api_token: Some(token.into()),
        metrics_require_token: true,
        ..Default::default()
    })
    .await?;
    for path in ["/v1/streams/a/b", "/v1/nope", "/live", "/nothing/here"] {
        let res = d.http.get(d.url(path)).bearer_auth(token).send().await?;
        ensure!(res.status() == 404, "{path}: {}", res.status());
        let v: serde_json::Value = res
            .json()
            .await
            .with_context(|| format!("{path}: not JSON"))?;
        ensure!(v["error"]["code"] == "not_found", "{path}: {v}");
    }
    let res = d.http.get(d.url("/metrics")).send().await?;
    ensure!(res.status() == 401, "{}", res.status());
    let res = d
        .http
        .get(d.url("/metrics"))
        .bearer_auth(token)
        .send()
        .await?;
    ensure!(
        res.status() == 200 && res.text().await?.contains("kiln_"),
        "metrics with the token"
    );
    // health stays open for load balancers
    ensure!(d.http.get(d.url("/healthz")).send().await?.status() == 200);
    d.shutdown().await
}

/// How long the flood test waits beyond the header timeout before calling a connection "not closed".
const CLOSE_MARGIN: Duration = Duration::from_secs(5);

/// Reads until the server closes the connection (EOF or reset); `Err` if it stays open past `limit`.
async fn closed_within(mut s: TcpStream, limit: Duration) -> Result<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 512];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // a 408 or similar before the close
            }
        }
    })
    .await
    .context("the server left a flood connection open past its header timeout")?;
    Ok(start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slowloris_floods_are_closed_and_playlists_keep_answering() -> Result<()> {
    // both ends of 2,200 connections live in this process
    rlimit::increase_nofile_limit(u64::MAX)?;
    let limits = kiln_http::server::Limits::default(); // the shipped limits
    let d = Daemon::start(kilnd::Config::default()).await?;
    let (st, _) = put(&d, "f", None, AUDIO_ONLY).await?;
    ensure!(st == 201);
    d.wait_for_segments("f", "audio", 1).await?;
    let addr = d.base.trim_start_matches("http://").to_string();

    let started = Instant::now();
    let mut idle = Vec::with_capacity(2000);
    for _ in 0..2000 {
        idle.push(TcpStream::connect(&addr).await?);
    }
    // slowloris: one byte of a request head per second, never finishing it
    let mut slow = Vec::with_capacity(200);
    for _ in 0..200 {
        let mut s = TcpStream::connect(&addr).await?;
        s.write_all(b"G").await?;
        slow.push(s);
    }
    let dribble = tokio::spawn(async move {
        let head = b"ET /live/f/master.m3u8 HTTP/1.1\r\nHost: x\r\nX-Slow: ";
        let mut closed_by_server = 0usize;
        for i in 0.. {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let byte = [head.get(i).copied().unwrap_or(b'a')];
            let mut open = Vec::new();
            for mut s in slow.drain(..) {
                if s.write_all(&byte).await.is_ok() {
                    open.push(s);
                } else {
                    closed_by_server += 1;
                }
            }
            slow = open;
            if slow.is_empty() || i > 60 {
                break;
            }
        }
        (closed_by_server, slow)
    });

    // a viewer's playlist requests during the flood
    let mut times = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        let (st, text) = d.get_text("/live/f/audio/index.m3u8").await?;
        ensure!(st == 200 && text.starts_with("#EXTM3U"), "{st}");
        times.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    times.sort();
    let p99 = times[98];
    ensure!(
        p99 < Duration::from_millis(50),
        "playlist p99 {p99:?} during the flood"
    );

    // every idle connection is closed by the server within the header timeout (plus a margin for this machine)
    let limit = (limits.header_timeout + CLOSE_MARGIN).saturating_sub(started.elapsed());
    let waits =
        futures_util::future::join_all(idle.into_iter().map(|s| closed_within(s, limit))).await;
    let closed = waits.into_iter().collect::<Result<Vec<_>>>()?;
    ensure!(closed.len() == 2000);
    let (closed_by_server, still_open) = dribble.await?;
    ensure!(
        still_open.is_empty() && closed_by_server == 200,
        "{} slowloris connections still open after {:?}",
        still_open.len(),
        started.elapsed()
    );
    ensure!(
        started.elapsed() < limits.header_timeout + CLOSE_MARGIN + Duration::from_secs(2),
        "the slowloris connections took {:?} to close",
        started.elapsed()
    );
    // and the daemon still answers afterwards
    let (st, _) = d.get_text("/healthz").await?;
    ensure!(st == 200);
    d.shutdown().await
}

/// A web server on `addr` that answers every request from `answer(path)` (head, body) and counts connections.
async fn web(
    addr: &str,
    answer: fn(&str, u16) -> (String, Vec<u8>),
    other_port: u16,
) -> Result<(u16, std::sync::Arc<std::sync::atomic::AtomicUsize>)> {
    let server = tokio::net::TcpListener::bind(addr).await?;
    let port = server.local_addr()?.port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = server.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&req)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                let path = line.split(' ').nth(1).unwrap_or("/").to_string();
                let (head, body) = answer(&path, other_port);
                let head = format!(
                    "HTTP/1.1 {head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body).await;
            });
        }
    });
    Ok((port, hits))
}

/// A playlist naming a segment on the refused server.
fn playlist(refused: u16) -> Vec<u8> {
    format!(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\nhttp://127.0.0.2:{refused}/seg0.ts\n#EXTINF:2.0,\nhttp://127.0.0.2:{refused}/seg1.ts\n"
    )
    .into_bytes()
}

/// Issue 11 items 1 and 2. A source string is parsed once into a typed value (SRT parameters at most once each,
/// only known ones) and the elements get their properties from that value; an `http(s)` live source is fetched
/// by kilnd's own client, so a redirect to a refused address is refused at that hop, and an HLS playlist (labelled
/// as one, or disguised as MPEG-TS) is pulled by kilnd, which checks every segment URL it names: the ones on the
/// refused server are refused before any connection. A playlist in a media file reaches GStreamer's parser and is
/// refused there (no adaptive demuxer runs), and DASH is refused. The refused server on 127.0.0.2 (this daemon
/// allows 127.0.0.1 only) must never see a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_sources_are_parsed_once_and_every_http_hop_is_checked() -> Result<()> {
    let media = std::env::temp_dir().join(format!("kiln-hardening-media-{}", std::process::id()));
    std::fs::create_dir_all(&media)?;
    let (refused, refused_hits) =
        web("127.0.0.2:0", |_, _| ("200 OK".into(), vec![0x47; 188]), 0).await?;
    std::fs::write(media.join("list.m3u8"), playlist(refused))?;
    let d = Daemon::start(kilnd::Config {
        source_networks: kiln_model::net::UrlPolicy::parse("127.0.0.1/32")?,
        media_dir: Some(media.clone()),
        ..Default::default()
    })
    .await?;
    let (allowed, _) = web(
        "127.0.0.1:0",
        |path, refused| match path {
            "/redirect" => (
                format!("302 Found\r\nLocation: http://127.0.0.2:{refused}/a.ts"),
                Vec::new(),
            ),
            "/list.m3u8" => (
                "200 OK\r\nContent-Type: application/vnd.apple.mpegurl".into(),
                playlist(refused),
            ),
            "/manifest.mpd" => (
                "200 OK\r\nContent-Type: application/dash+xml".into(),
                b"<MPD/>".to_vec(),
            ),
            _ => (
                "200 OK\r\nContent-Type: video/mp2t".into(),
                playlist(refused),
            ),
        },
        refused,
    )
    .await?;
    let spec = |src: &str| {
        serde_json::json!({"source": src, "preset": "live-360p-abr", "audio": {"enabled": false}})
            .to_string()
    };

    // one parse: the adversarial `mode=listener&mode=caller` and its relatives are refused at the door
    for (src, want) in [
        (
            format!("srt://127.0.0.2:{refused}?mode=listener&mode=caller"),
            "given twice",
        ),
        (
            format!("srt://127.0.0.2:{refused}?MODE=listener"),
            "lower-case",
        ),
        (
            format!("srt://127.0.0.2:{refused}?localaddress=127.0.0.1"),
            "not understood",
        ),
        (
            format!("srt://127.0.0.2:{refused}?m%6fde=listener"),
            "lower-case",
        ),
        (
            format!("srt://127.0.0.2:{refused}?mode=server"),
            "caller or listener",
        ),
        (format!("http://2130706434:{refused}/"), "dotted decimal"),
    ] {
        let (st, body) = put(&d, "bad", None, &spec(&src)).await?;
        ensure!(st == 400, "{src}: {st} {body}");
        ensure!(body.to_string().contains(want), "{src}: {body}");
    }
    // a caller to the refused address is refused by address, whatever its parameters
    let (st, body) = put(
        &d,
        "bad",
        None,
        &spec(&format!("srt://127.0.0.2:{refused}?mode=caller")),
    )
    .await?;
    ensure!(
        st == 422 && body.to_string().contains("loopback"),
        "{st} {body}"
    );

    // admitted (127.0.0.1 is allowed, the file is in the media directory), then refused where the bytes would
    // come from
    let http = |path: &str| format!("http://127.0.0.1:{allowed}{path}");
    for (id, src, want) in [
        (
            "redirect",
            http("/redirect"),
            "127.0.0.2 is a loopback address",
        ),
        (
            "labelled",
            http("/list.m3u8"),
            "127.0.0.2 is a loopback address",
        ),
        (
            "disguised",
            http("/disguised.ts"),
            "127.0.0.2 is a loopback address",
        ),
        ("dash", http("/manifest.mpd"), "DASH manifest"),
        (
            "file",
            "file:///list.m3u8".to_string(),
            "is a playlist (application/x-hls)",
        ),
    ] {
        let (st, body) = put(&d, id, None, &spec(&src)).await?;
        ensure!(st == 201, "{src}: {st} {body}");
        let status = kiln_integration::poll_json(
            &d.http,
            &d.url(&format!("/v1/streams/{id}")),
            &format!("{src} fails"),
            Duration::from_secs(30),
            |v| v["state"] == "failed",
        )
        .await?;
        ensure!(status.to_string().contains(want), "{src}: {status}");
    }
    ensure!(
        refused_hits.load(std::sync::atomic::Ordering::SeqCst) == 0,
        "the refused server was reached"
    );
    d.shutdown().await?;
    let _ = std::fs::remove_dir_all(&media);
    Ok(())
}

/// An HLS stream (ffmpeg's own HLS output, MPEG-TS segments, served by a local web server) pulled as a live source
/// through kilnd's checked client: its segments become the stream, which ends with ENDLIST after the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hls_source_is_pulled_segment_by_segment_and_plays_to_its_end() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("kiln-hls-pull-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let out = tokio::process::Command::new("ffmpeg")
        .args(["-v", "error", "-nostdin", "-y"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=320x180:rate=30"])
        .args([
            "-t",
            "4",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-g",
            "30",
            "-pix_fmt",
            "yuv420p",
        ])
        .args([
            "-f",
            "hls",
            "-hls_time",
            "1",
            "-hls_list_size",
            "0",
            "-hls_playlist_type",
            "vod",
        ])
        .arg(dir.join("index.m3u8"))
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "ffmpeg: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", server.local_addr()?);
    let served = dir.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = server.accept().await {
            let dir = served.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&req)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                let name = line
                    .split(' ')
                    .nth(1)
                    .unwrap_or("/")
                    .trim_start_matches('/')
                    .to_string();
                let (head, body) = match std::fs::read(dir.join(&name)) {
                    Ok(b) if !name.contains("..") && !name.contains('/') => {
                        let ct = if name.ends_with(".m3u8") {
                            "application/vnd.apple.mpegurl"
                        } else {
                            "video/mp2t"
                        };
                        (format!("200 OK\r\nContent-Type: {ct}"), b)
                    }
                    _ => ("404 Not Found".to_string(), Vec::new()),
                };
                let head = format!(
                    "HTTP/1.1 {head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body).await;
            });
        }
    });
    let d = Daemon::start(kilnd::Config {
        source_networks: kiln_model::net::UrlPolicy::parse("127.0.0.1/32")?,
        ..Default::default()
    })
    .await?;
    let src = format!("{base}/index.m3u8");
    let spec =
        serde_json::json!({"source": src, "preset": "live-360p-abr", "audio": {"enabled": false}});
    let (st, body) = put(&d, "hls", None, &spec.to_string()).await?;
    ensure!(st == 201, "{st} {body}");
    let (_, ended) = d
        .follow_playlist(
            "/live/hls/360p/index.m3u8",
            "the 4 s HLS source ends (ENDLIST)",
            Duration::from_secs(40),
            |_, pl| pl.endlist,
        )
        .await?;
    let media_s: f64 = ended.segments.iter().filter_map(|s| s.duration).sum();
    ensure!(
        (3.5..=4.7).contains(&media_s),
        "{media_s} s of a 4 s source: {ended:?}"
    );
    let (_, status) = d.get_text("/v1/streams/hls").await?;
    ensure!(status.contains("\"state\":\"ended\""), "{status}");
    d.shutdown().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// An H.264/MPEG-TS SRT sender (`gst-launch-1.0`, killed when dropped): `mode` is its side of the connection.
/// The format is left to x264 (Debian's picks 10-bit 4:4:4 from videotestsrc): kilnd converts whatever it decodes
/// to 8-bit 4:2:0. SPS/PPS repeat at every keyframe and TS packets go 7 to an SRT message, as a real encoder sends.
fn srt_sender(mode: &str, port: u16) -> Result<tokio::process::Child> {
    let mut args: Vec<String> = "-q videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=180,framerate=30/1 ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=30 ! h264parse config-interval=-1 ! mpegtsmux alignment=7 ! srtsink"
        .split(' ')
        .map(String::from)
        .collect();
    args.push(format!("mode={mode}"));
    if mode == "listener" {
        args.extend(["localaddress=127.0.0.1".into(), format!("localport={port}")]);
    } else {
        args.push(format!("uri=srt://127.0.0.1:{port}"));
    }
    Ok(tokio::process::Command::new("gst-launch-1.0")
        .args(&args)
        .kill_on_drop(true)
        .spawn()?)
}

fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The SRT element is built from the typed source in both directions: kilnd calls a sender (connecting to the
/// address it checked) and kilnd listens for one, and each stream publishes segments. A third stream calls ffmpeg
/// (libsrt) listening with H.264 and AAC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srt_sources_built_from_the_typed_value_play_as_caller_and_listener() -> Result<()> {
    let d = Daemon::start(kilnd::Config {
        source_networks: kiln_model::net::UrlPolicy::parse("127.0.0.1/32")?,
        ..Default::default()
    })
    .await?;
    let spec = |src: &str| {
        serde_json::json!({"source": src, "preset": "live-360p-abr", "audio": {"enabled": false}})
            .to_string()
    };
    let port = free_udp_port()?;
    let _sender = srt_sender("listener", port)?;
    let (st, body) = put(
        &d,
        "caller",
        None,
        &spec(&format!("srt://127.0.0.1:{port}?latency=120")),
    )
    .await?;
    ensure!(st == 201, "{st} {body}");
    d.wait_for_segments("caller", "360p", 2).await?;

    let port = free_udp_port()?;
    let (st, body) = put(
        &d,
        "listener",
        None,
        &spec(&format!("srt://:{port}?mode=listener")),
    )
    .await?;
    ensure!(st == 201, "{st} {body}");
    ensure!(
        body["source"] == format!("srt://:{port}?mode=listener"),
        "the status shows the typed source: {body}"
    );
    let _sender = srt_sender("caller", port)?;
    d.wait_for_segments("listener", "360p", 2).await?;

    // ffmpeg (libsrt) as the listener, with H.264 and AAC in MPEG-TS: kilnd calls it
    let port = free_udp_port()?;
    let _ffmpeg = tokio::process::Command::new("ffmpeg")
        .args(["-v", "error", "-nostdin", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=320x180:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
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
        .args(["-pix_fmt", "yuv420p", "-c:a", "aac", "-f", "mpegts"])
        .arg(format!(
            "srt://127.0.0.1:{port}?mode=listener&pkt_size=1316"
        ))
        .kill_on_drop(true)
        .spawn()?;
    let with_audio =
        serde_json::json!({"source": format!("srt://127.0.0.1:{port}"), "preset": "live-360p-abr"});
    // ffmpeg listens once it has started: the first calls may find nobody, and srtsrc calls again
    let (st, body) = put(&d, "ffmpeg", None, &with_audio.to_string()).await?;
    ensure!(st == 201, "{st} {body}");
    d.wait_for_segments("ffmpeg", "360p", 2).await?;
    d.wait_for_segments("ffmpeg", "audio", 2).await?;
    d.shutdown().await
}

/// An encoder failure's CPU rebuild that a DELETE meets part way (the old pipeline being torn down, the new one
/// starting, or after) gives back what the stream booked exactly once and leaves no pipeline booked behind: the
/// node's booking comes back to the other stream's alone. (A release made twice would take the other stream's
/// share; a rebuild installed on a deleted stream would keep its own.) The DELETE follows the fault after 0–60 ms,
/// to meet the rebuild at different points; each order must end the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_during_an_encoder_rebuild_gives_its_bookings_back_once() -> Result<()> {
    use kiln_integration::{poll_json, small_stream_spec};
    let d = Daemon::start_default().await?;
    let capacity = d.url("/v1/capacity");
    let booked = |v: &serde_json::Value| v["host"]["allocated"]["cpu_millicores"].as_u64();
    let running = |id: &str| {
        let url = d.url(&format!("/v1/streams/{id}"));
        let http = d.http.clone();
        async move {
            poll_json(&http, &url, "running", Duration::from_secs(30), |v| {
                v["state"] == "running"
            })
            .await
        }
    };
    let (code, v) = d.put_stream("keep", small_stream_spec()).await?;
    ensure!(code == 201, "{code} {v}");
    running("keep").await?;
    let (_, text) = d.get_text("/v1/capacity").await?;
    let base = booked(&serde_json::from_str(&text)?).context("allocated")?;
    ensure!(base > 0, "the kept stream books CPU: {text}");
    for (i, after_ms) in [0u64, 5, 20, 60].into_iter().enumerate() {
        let id = format!("rebuilt{i}");
        let (code, v) = d.put_stream(&id, small_stream_spec()).await?;
        ensure!(code == 201, "{code} {v}");
        running(&id).await?;
        ensure!(d.state.supervisor.inject_encoder_error(&id), "no encoder");
        // a stagger to meet the rebuild at another point, not a wait for an event
        tokio::time::sleep(Duration::from_millis(after_ms)).await;
        let res = d
            .http
            .delete(d.url(&format!("/v1/streams/{id}")))
            .send()
            .await?;
        ensure!(res.status().is_success(), "DELETE {id}: {}", res.status());
        poll_json(
            &d.http,
            &d.url(&format!("/v1/streams/{id}")),
            "gone",
            Duration::from_secs(30),
            |v| v["error"]["code"] == "not_found",
        )
        .await?;
        // the rebuild's own launch is bounded by the pipeline's start: back to the kept stream's booking, and it
        // stays there (a rebuild that installed late would show up within these looks)
        let steady = std::cell::Cell::new(0);
        poll_json(
            &d.http,
            &capacity,
            &format!("{id}'s booking given back once ({base} mc left)"),
            Duration::from_secs(30),
            |v| {
                steady.set(if booked(v) == Some(base) {
                    steady.get() + 1
                } else {
                    0
                });
                steady.get() >= 10
            },
        )
        .await?;
    }
    d.shutdown().await
}
