//! Memory bench: does kilnd give memory back after load? (adversarial review, item 7)
//!
//! A release kilnd runs one live audio-only stream (the cheapest stream that has playlists) with a 3-segment
//! window, so its own state stops growing within seconds. The bench reads the daemon's RSS (`VmRSS`) at a
//! baseline, then:
//!
//! 1. opens 2,000 TCP connections that never send a byte, reads RSS once the daemon holds them all, closes them
//!    and reads RSS again once the daemon has closed its side; then the same with 2,000 keep-alive connections
//!    that each made one playlist request and stay open (what players leave behind);
//! 2. runs six waves of 3,000 blocking playlist requests (HTTP/1.1, one connection each, `Connection: close`)
//!    that park on part 0 of the segment after next (2–4 s ahead) and are answered when it is published, reading
//!    RSS while they are parked and again after each wave once every connection is closed.
//!
//! "Closed" is observed, not slept for: the daemon's open sockets (`/proc/PID/fd`) are back to the baseline count
//! and `/v1/stats` reports no parked request. Then RSS is read until it stops falling (no new low for
//! [`SETTLE_QUIET`], at most 60 s), since an allocator may hand pages back on a timer. The bench fails when RSS
//! after the last wave is over `KILN_BENCH_RSS_RATIO` (default 1.2) × the baseline.
//!
//! Anchor, same run: what the load costs while it lasts (KiB of RSS per idle connection and per parked request at
//! the peak), next to what is left of it afterwards.
//!
//! Run: `cargo build --release -p kilnd && cargo bench -p kiln-benches --bench memory` (about 5 minutes; the
//! settling dominates). Knobs: `KILN_BENCH_IDLE` (2000), `KILN_BENCH_WAVE` (3000), `KILN_BENCH_WAVES` (6),
//! `KILN_BENCH_RSS_RATIO` (1.2), `KILND` (binary to test), `KILN_BENCH_DAEMON_ENV="K=V K2=V2"` (extra environment
//! for the daemon, e.g. `_RJEM_MALLOC_CONF=dirty_decay_ms:1000` to try a jemalloc setting) and
//! `KILN_BENCH_HOLD_S` (a pause at the baseline and at the end, to inspect the daemon with `gdb -p PID`).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kiln_integration::{kilnd_release_bin, poll_until, spawn_kilnd_env, Polled};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SPEC: &str = r#"{"source": "test:", "preset": "live-audio-only"}"#;
const PLAYLIST: &str = "/live/mem/audio/index.m3u8";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

/// Sockets the daemon has open (listener, client connections, pipeline internals).
fn sockets(pid: u32) -> Result<usize> {
    let mut n = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        // an fd may close between the listing and the readlink
        if let Ok(target) = std::fs::read_link(fd?.path()) {
            n += usize::from(target.to_string_lossy().starts_with("socket:"));
        }
    }
    Ok(n)
}

/// The daemon's sockets when no request is in flight: the fewest seen over 1 s (a connection the bench has just
/// finished with may still be closing on the daemon's side).
async fn quiet_sockets(pid: u32) -> Result<usize> {
    let mut fewest = sockets(pid)?;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        fewest = fewest.min(sockets(pid)?);
    }
    Ok(fewest)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Waits until the daemon has `want` sockets or fewer (`at_most`) / at least (`!at_most`).
async fn wait_sockets(pid: u32, want: usize, at_most: bool, what: &str) -> Result<()> {
    poll_until(
        what,
        Duration::from_secs(60),
        Duration::from_millis(50),
        || async {
            let n = sockets(pid)?;
            Ok(if (at_most && n <= want) || (!at_most && n >= want) {
                Polled::Done(())
            } else {
                Polled::NotYet(format!("{n} sockets open"))
            })
        },
    )
    .await
}

/// Seconds without a new low after which RSS counts as settled: longer than the pauses of an allocator that hands
/// pages back on a timer (jemalloc's background thread purges in steps over its 10 s decay time).
const SETTLE_QUIET: Duration = Duration::from_secs(12);

/// RSS once it has stopped falling: read every 250 ms until [`SETTLE_QUIET`] passes without a new low (by more
/// than 1 %); at most 40 s, then the last reading. Returns the reading and how long it took to stop falling.
async fn settled_rss(pid: u32) -> Result<(u64, Duration)> {
    let start = Instant::now();
    let mut low = rss_kib(pid)?;
    let mut low_at = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = rss_kib(pid)?;
        if now + low / 100 < low {
            (low, low_at) = (now, Instant::now());
        }
        if low_at.elapsed() >= SETTLE_QUIET || start.elapsed() >= Duration::from_secs(60) {
            return Ok((now, low_at - start));
        }
    }
}

/// The newest part of a media playlist: (msn, part index).
fn last_part(playlist: &str) -> Result<(u64, u64)> {
    let uri = playlist
        .lines()
        .filter_map(|l| l.strip_prefix("#EXT-X-PART:"))
        .next_back()
        .and_then(|l| l.split("URI=\"").nth(1))
        .context("no part in playlist")?;
    let stem = uri
        .split(".m4s")
        .next()
        .and_then(|s| s.strip_prefix("part-"))
        .context("uri")?;
    let (m, p) = stem.split_once('-').context("uri")?;
    Ok((m.parse()?, p.parse()?))
}

fn first_msn(playlist: &str) -> Result<u64> {
    playlist
        .lines()
        .find_map(|l| l.strip_prefix("#EXT-X-MEDIA-SEQUENCE:"))
        .context("no media sequence")?
        .trim()
        .parse()
        .context("media sequence")
}

/// One request on a keep-alive connection: reads the answer's head and its `Content-Length` bytes of body, and
/// leaves the connection open.
async fn get_keep_alive(s: &mut TcpStream, addr: &str, path: &str) -> Result<()> {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await?;
        ensure!(n > 0, "connection closed before the answer was complete");
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = std::str::from_utf8(&buf[..end])?;
        ensure!(head.starts_with("HTTP/1.1 200"), "answer: {head}");
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .context("no content-length")?;
        if buf.len() >= end + 4 + len {
            return Ok(());
        }
    }
}

/// One blocking request on its own connection: the status code and when the whole answer had arrived.
async fn blocking_get(addr: String, path: String) -> Result<(u16, Instant)> {
    let mut s = TcpStream::connect(&addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::with_capacity(4096);
    s.read_to_end(&mut buf).await?;
    let status = std::str::from_utf8(buf.get(9..12).context("short answer")?)?.parse()?;
    Ok((status, Instant::now()))
}

/// With `KILN_BENCH_HOLD_S=N`: waits N s so that the daemon can be inspected (`gdb -p PID`, `/proc/PID/smaps`).
async fn hold(pid: u32, at: &str) {
    let secs: u64 = env_or("KILN_BENCH_HOLD_S", 0);
    if secs > 0 {
        println!("holding {secs} s at {at}: kilnd pid {pid}");
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
}

struct Row {
    what: String,
    rss: u64,
    /// How long RSS kept falling before it settled (`None`: read once, under load).
    settled_in: Option<Duration>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let idle_n: usize = env_or("KILN_BENCH_IDLE", 2000);
    let wave_n: usize = env_or("KILN_BENCH_WAVE", 3000);
    let waves: usize = env_or("KILN_BENCH_WAVES", 6);
    let max_ratio: f64 = env_or("KILN_BENCH_RSS_RATIO", 1.2);
    rlimit::increase_nofile_limit((idle_n.max(wave_n) + 1024) as u64)?;
    let daemon_env = std::env::var("KILN_BENCH_DAEMON_ENV").unwrap_or_default();
    let daemon_env: Vec<(&str, &str)> = daemon_env
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();

    let k = spawn_kilnd_env(
        "kilnd",
        kilnd_release_bin()?,
        &["--window-segments", "3"],
        &daemon_env,
    )
    .await?;
    let pid = k.pid();
    let addr = k
        .url
        .strip_prefix("http://")
        .context("plain http url")?
        .to_string();
    // no idle keep-alive connections of our own: the daemon's socket count is the load and nothing else
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(0)
        .build()?;
    let res = http
        .put(format!("{}/v1/streams/mem", k.url))
        .header("content-type", "application/json")
        .body(SPEC)
        .send()
        .await?;
    ensure!(res.status().is_success(), "PUT: {}", res.status());
    let playlist_url = format!("{}{PLAYLIST}", k.url);
    // steady state: the window is full and has slid at least once (segments are dropped as they are added)
    let first_seen = std::cell::Cell::new(None);
    let first_seen = &first_seen;
    poll_until(
        "the stream's window slides",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async {
            let r = http.get(&playlist_url).send().await?;
            if !r.status().is_success() {
                return Ok(Polled::NotYet(format!("{}", r.status())));
            }
            let first = first_msn(&r.text().await?)?;
            let start = first_seen.get().unwrap_or(first);
            first_seen.set(Some(start));
            Ok(if first > start + 1 {
                Polled::Done(())
            } else {
                Polled::NotYet(format!("media sequence {first}"))
            })
        },
    )
    .await?;
    let stats_url = format!("{}/v1/stats", k.url);
    let parked = || async {
        let s: serde_json::Value =
            serde_json::from_str(&http.get(&stats_url).send().await?.text().await?)?;
        anyhow::Ok(s["parked_requests"].as_u64().unwrap_or(0) as usize)
    };

    let base_sockets = quiet_sockets(pid).await?;
    let (baseline, baseline_in) = settled_rss(pid).await?;
    println!(
        "kilnd pid {pid}: baseline RSS {:.1} MiB, {base_sockets} sockets",
        mib(baseline)
    );
    let mut rows = vec![Row {
        what: "baseline (one live stream)".into(),
        rss: baseline,
        settled_in: Some(baseline_in),
    }];
    hold(pid, "baseline").await;

    // --- 1. idle connections: silent ones (never send a byte), then keep-alive ones that made one request
    let mut per_idle = Vec::new();
    for after_request in [false, true] {
        let (kind, one) = if after_request {
            (
                "keep-alive connections idle after one playlist request",
                "keep-alive connection idle after a request",
            )
        } else {
            (
                "idle connections (no byte sent)",
                "idle connection (no byte sent)",
            )
        };
        let started = Instant::now();
        let mut opening = Vec::with_capacity(idle_n);
        for _ in 0..idle_n {
            // one connect at a time: a burst of thousands overflows the listen backlog, and the SYN retries that
            // follow (1 s, 3 s, …) would outlast the daemon's header timeout for the first ones
            let mut s = TcpStream::connect(&addr).await?;
            let addr = addr.clone();
            opening.push(tokio::spawn(async move {
                if after_request {
                    get_keep_alive(&mut s, &addr, PLAYLIST).await?;
                }
                anyhow::Ok(s)
            }));
        }
        let mut idle = Vec::with_capacity(idle_n);
        for t in opening {
            idle.push(t.await??);
        }
        wait_sockets(
            pid,
            base_sockets + idle_n,
            false,
            "the daemon holds every idle connection",
        )
        .await?;
        let rss_open = rss_kib(pid)?;
        drop(idle);
        wait_sockets(
            pid,
            base_sockets,
            true,
            "the daemon closes the idle connections",
        )
        .await?;
        ensure!(
            started.elapsed() < Duration::from_secs(9),
            "the idle connections took {:?}: the daemon's 10 s header timeout may have closed them, not the bench",
            started.elapsed()
        );
        let (rss, settled_in) = settled_rss(pid).await?;
        println!(
            "{idle_n} {kind}: RSS {:.1} MiB open, {:.1} MiB after",
            mib(rss_open),
            mib(rss)
        );
        per_idle.push((
            one,
            rss_open.saturating_sub(baseline) as f64 / idle_n as f64,
        ));
        rows.push(Row {
            what: format!("{idle_n} {kind}, open"),
            rss: rss_open,
            settled_in: None,
        });
        rows.push(Row {
            what: format!("{idle_n} {kind}, closed"),
            rss,
            settled_in: Some(settled_in),
        });
    }

    // --- 2. waves of parked requests
    let mut peak_parked = 0;
    for wave in 1..=waves {
        let text = http.get(&playlist_url).send().await?.text().await?;
        let (m, _) = last_part(&text)?;
        // part 0 of the segment after next: 2–4 s away (time to open every connection first), within the 3 × TD
        // that a request may park
        let path = format!("{PLAYLIST}?_HLS_msn={}&_HLS_part=0", m + 2);
        let mut tasks = Vec::with_capacity(wave_n);
        for _ in 0..wave_n {
            tasks.push(tokio::spawn(blocking_get(addr.clone(), path.clone())));
        }
        let tasks_ref = &tasks;
        let all_parked = poll_until(
            "every request parks (or one is answered)",
            Duration::from_secs(30),
            Duration::from_millis(20),
            || async {
                let n = parked().await?;
                Ok(if n >= wave_n {
                    Polled::Done(true)
                } else if tasks_ref.iter().any(|t| t.is_finished()) {
                    Polled::Done(false)
                } else {
                    Polled::NotYet(format!("{n} parked"))
                })
            },
        )
        .await?;
        let rss_parked = rss_kib(pid)?;
        peak_parked = peak_parked.max(rss_parked);
        let mut done = Vec::with_capacity(wave_n);
        let mut failed = 0;
        for t in tasks {
            match t.await? {
                Ok((200, at)) => done.push(at),
                _ => failed += 1,
            }
        }
        ensure!(
            failed == 0,
            "wave {wave}: {failed} of {wave_n} requests failed"
        );
        done.sort();
        let spread = done[done.len() - 1] - done[0];
        wait_sockets(
            pid,
            base_sockets,
            true,
            "the daemon closes the wave's connections",
        )
        .await?;
        let left = parked().await?;
        ensure!(left == 0, "{left} requests still parked after the wave");
        let (rss, settled_in) = settled_rss(pid).await?;
        println!(
            "wave {wave}: {wave_n} {}; RSS {:.1} MiB parked, {:.1} MiB after; answers spread over {:.0} ms",
            if all_parked {
                "parked before the publish"
            } else {
                "sent (WARNING: the part was published before all parked)"
            },
            mib(rss_parked),
            mib(rss),
            spread.as_secs_f64() * 1000.0
        );
        rows.push(Row {
            what: format!("wave {wave}: {wave_n} parked requests, parked"),
            rss: rss_parked,
            settled_in: None,
        });
        rows.push(Row {
            what: format!("wave {wave}: answered and closed"),
            rss,
            settled_in: Some(settled_in),
        });
    }

    hold(pid, "after the last wave").await;
    let last = rows.last().context("rows")?.rss;
    println!();
    println!("| state | kilnd RSS MiB | / baseline | fell for |");
    println!("|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} | {:.2} | {} |",
            r.what,
            mib(r.rss),
            r.rss as f64 / baseline as f64,
            r.settled_in.map_or("(under load)".into(), |d| format!(
                "{:.1} s",
                d.as_secs_f64()
            ))
        );
    }
    println!();
    println!("anchor (what the load costs while it lasts):");
    for (kind, kib) in &per_idle {
        println!("  {kib:.1} KiB per {kind}");
    }
    println!(
        "  {:.1} KiB per parked request, connection included (peak of the waves)",
        peak_parked.saturating_sub(baseline) as f64 / wave_n as f64
    );
    println!(
        "left afterwards: {:.1} MiB over the baseline",
        mib(last.saturating_sub(baseline))
    );
    let ratio = last as f64 / baseline as f64;
    println!(
        "final / baseline = {ratio:.2} (limit {max_ratio:.2}){}",
        if daemon_env.is_empty() {
            String::new()
        } else {
            format!("; daemon environment: {daemon_env:?}")
        }
    );
    if ratio > max_ratio {
        bail!("kilnd kept {ratio:.2} × its baseline RSS after the load (limit {max_ratio:.2})");
    }
    Ok(())
}
