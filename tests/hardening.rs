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
