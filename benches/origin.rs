//! Origin benchmarks against anchors measured in the same run.
//!
//! 1. Throughput: wrk (one load generator for both) fetches a media playlist and a 333 ms part, alternately, from
//!    a real kilnd (release build, one tiny live stream running) and from nginx serving the same bytes from disk.
//!    Prints requests/s for each and the ratio kiln / nginx.
//! 2. Fan-out: 10,000 concurrent blocking playlist requests (HTTP/1.1, one connection each) park on the next
//!    segment's first part; once all are parked (the daemon's `/v1/stats` says so) the daemon's RSS is read, and
//!    when the part is published the time from the first to the last response is measured. Then the same
//!    viewers' next blocking reload, on the connections that answered them (a player's steady state). The
//!    viewers are one thread of non-blocking sockets (`origin/viewers.rs`), the lightest client there is.
//! 3. Fan-out floors: the same viewers against two programs that do nothing but answer them (`origin/floor.rs`):
//!    a bare tokio program with a task per connection, and a loop that writes every answer with no runtime.
//!
//! Run with `benches/run` (installs nginx and wrk, builds kilnd --release, then `cargo bench -p kiln-benches`).
//! On equal terms: wrk (one thread) is pinned to the first CPU and the server under test (kilnd with every
//! thread, or nginx with one worker) to the second (`taskset`), so neither steals the other's core. The fan-out
//! also reads the daemon's own measure, `kiln_origin_fanout_seconds` (publish → each answer written).

use std::path::Path;
use std::process::{Child, Command, Stdio};

#[path = "origin/floor.rs"]
mod floor;
#[path = "origin/viewers.rs"]
mod viewers;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kiln_integration::{kilnd_release_bin, poll_until, spawn_kilnd_env, Polled};

const SPEC: &str = r#"{"source": "test:pattern=ball",
  "renditions": [{"name": "v", "width": 160, "height": 90, "fps": 30, "bitrate_kbps": 2400}],
  "audio": {"enabled": false}}"#;

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

fn last_part(playlist: &str) -> Result<(u64, u64)> {
    let uri = playlist
        .lines()
        .filter_map(|l| l.strip_prefix("#EXT-X-PART:"))
        .next_back()
        .and_then(|l| l.split("URI=\"part-").nth(1))
        .context("no part in playlist")?;
    let stem = uri.split(".m4s").next().context("uri")?;
    let (m, p) = stem.split_once('-').context("uri")?;
    Ok((m.parse()?, p.parse()?))
}

/// The part a playlist's preload hint names: `(msn, part)`.
fn hinted_part(playlist: &str) -> Result<(u64, u64)> {
    let line = playlist
        .lines()
        .find(|l| l.starts_with("#EXT-X-PRELOAD-HINT:TYPE=PART"))
        .context("no preload hint in playlist")?;
    let uri = line.split("URI=\"part-").nth(1).context("hint uri")?;
    let (m, p) = uri
        .split(".m4s")
        .next()
        .and_then(|s| s.split_once('-'))
        .context("hint uri")?;
    Ok((m.parse()?, p.parse()?))
}

/// Waits until kilnd's stream publishes in real time. After SIGCONT it first catches up on the time it was
/// stopped: parts come faster than real time and the ones it had leave the window, so a part read from the
/// playlist just then is gone (404) seconds into the next round. Caught up: a blocking reload for the hinted
/// part waits for it (parts are 333 ms apart in real time; while catching up each comes at once).
async fn caught_up(http: &reqwest::Client, base: &str, pl_path: &str) -> Result<()> {
    for _ in 0..300 {
        let text = http
            .get(format!("{base}{pl_path}"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        let (m, p) = hinted_part(&text)?;
        let asked = Instant::now();
        http.get(format!("{base}{pl_path}?_HLS_msn={m}&_HLS_part={p}"))
            .send()
            .await?
            .error_for_status()?;
        if asked.elapsed() >= Duration::from_millis(100) {
            return Ok(());
        }
    }
    bail!("kilnd's stream did not catch up after SIGCONT (300 parts published at once)")
}

/// The CPUs of this run: wrk on the first, the server under test on the second (one CPU: both share it); with
/// `KILN_BENCH_SHARED=1`, every CPU for both (the server with as many async workers as CPUs: how the fan-out
/// does when the server may use the whole host, the client competing with it).
/// Read once, before this process pins itself (its own affinity would then say one CPU).
fn cpus() -> (String, String) {
    let n = host_cpus();
    if shared() {
        let all = format!("0-{}", n - 1);
        return (all.clone(), all);
    }
    ("0".into(), if n > 1 { "1" } else { "0" }.into())
}

/// The host's CPUs, read once (see [`cpus`]).
fn host_cpus() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The floors' threads: one, or with `KILN_BENCH_SHARED=1` one per CPU (as kilnd has async workers).
fn floor_threads() -> usize {
    if shared() {
        host_cpus()
    } else {
        1
    }
}

fn shared() -> bool {
    std::env::var("KILN_BENCH_SHARED").is_ok_and(|v| v == "1")
}

/// Pins every thread of process `pid` to `cpu`.
fn pin(pid: u32, cpu: &str) -> Result<()> {
    let ok = Command::new("taskset")
        .args(["-a", "-p", "-c", cpu, &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .context("taskset (util-linux)")?
        .success();
    ensure!(ok, "taskset could not pin {pid} to CPU {cpu}");
    Ok(())
}

/// A latency in wrk's units (`512.00us`, `1.23ms`, `1.01s`) in ms.
fn wrk_ms(v: &str) -> Option<f64> {
    let (n, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    n.parse::<f64>().ok().map(|n| n * scale)
}

/// wrk (one thread, pinned to the first CPU) against `base` for `secs`, alternating between the two paths, with
/// `Accept-Encoding: gzip` when `gzip`; returns requests/s and the p99 latency in ms.
fn wrk(base: &str, paths: [&str; 2], gzip: bool, secs: u32, dir: &Path) -> Result<(f64, f64)> {
    let script = dir.join("mix.lua");
    std::fs::write(
        &script,
        format!(
            "local paths = {{\"{}\", \"{}\"}}\nlocal i = 0\nrequest = function()\n  i = i + 1\n  return wrk.format(\"GET\", paths[(i % 2) + 1])\nend\n",
            paths[0], paths[1]
        ),
    )?;
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &cpus().0, "wrk", "-t1", "-c64", "--latency"]);
    if gzip {
        cmd.args(["-H", "Accept-Encoding: gzip"]);
    }
    let out = cmd
        .arg(format!("-d{secs}s"))
        .arg("-s")
        .arg(&script)
        .arg(base)
        .output()
        .context("wrk not found (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .with_context(|| format!("wrk output: {text}"))?
        .trim()
        .parse()?;
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(|v| wrk_ms(v.trim()))
        .with_context(|| format!("wrk output has no 99% latency: {text}"))?;
    if text.contains("Non-2xx") {
        bail!("wrk saw errors: {text}");
    }
    Ok((rps, p99))
}

/// The cumulative buckets `(le, count)` of a Prometheus histogram in `/metrics` text.
fn histogram_buckets(metrics: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| {
            let (le, count) = l.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The upper bound of the bucket holding quantile `q` of cumulative `buckets` (`None` when empty).
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| *le)
}

/// nginx with one worker serving `root`, configured as Debian's default nginx.conf has it (sendfile, tcp_nopush)
/// or, `tuned`, with `open_file_cache` as well (each answer then skips the open, stat and close of its file).
/// An nginx master process, stopped with SIGTERM (so that it takes its workers down with it) when dropped: also
/// when a round fails and the bench returns early, which used to leave both nginx instances running.
struct Nginx(Child);

/// A floor server ([`floor`]), killed when dropped.
struct Floor(Child);

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let _ = self.0.wait();
    }
}

fn start_nginx(root: &Path, dir: &Path, tuned: bool) -> Result<(Nginx, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let name = if tuned { "nginx-tuned" } else { "nginx" };
    let conf = dir.join(format!("{name}.conf"));
    // the bench rewrites the files between rounds, and kilnd runs for two windows before nginx does: a cached
    // descriptor is checked again after a second
    let cache = if tuned {
        "open_file_cache max=1000 inactive=60s;\n  open_file_cache_valid 1s;\n  "
    } else {
        ""
    };
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {dir}/{name}.pid;\nerror_log {dir}/error.log;\n\
             events {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  \
             {cache}keepalive_requests 100000;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n  \
             fastcgi_temp_path {dir}/fcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n  \
             types {{ application/vnd.apple.mpegurl m3u8; video/mp4 m4s; }}\n  \
             server {{ listen 127.0.0.1:{port}; root {root};\n    location ~ \\.m3u8$ {{ gzip_static on; }}\n  }}\n}}\n",
            dir = dir.display(),
            root = root.display()
        ),
    )?;
    let nginx = if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    };
    let child = Command::new("taskset")
        .args(["-c", &cpus().1, nginx])
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("nginx not found (apt-get install nginx-light)")?;
    let child = Nginx(child);
    // wait until it accepts
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((child, format!("http://127.0.0.1:{port}")))
}

fn main() -> Result<()> {
    // this binary is also the fan-out's floor server (`floor_fanout` starts it)
    if let Some(len) = std::env::var("KILN_BENCH_FLOOR")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        let threads = std::env::var("KILN_BENCH_FLOOR_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        if std::env::var("KILN_BENCH_FLOOR_LOOP").is_ok_and(|v| v == "1") {
            floor::main_loop(len, threads);
        }
        floor::main(len, threads);
    }
    let rt = tokio::runtime::Runtime::new()?;
    let out = rt.block_on(run());
    // a failed round may leave the viewers' thread waiting out its limit: the process ends without it
    rt.shutdown_background();
    out
}

async fn run() -> Result<()> {
    // one async worker for the one core it is pinned to, as nginx has one worker process (two workers on one
    // core only add wake-ups between them)
    let workers: &[(&str, &str)] = if shared() {
        &[]
    } else {
        &[("TOKIO_WORKER_THREADS", "1")]
    };
    let k = spawn_kilnd_env("kilnd", kilnd_release_bin()?, &[], workers).await?;
    pin(k.pid(), &cpus().1)?;
    // this process is the fan-out's client: on the load generator's CPU, off the daemon's
    pin(std::process::id(), &cpus().0)?;
    // idle connections dropped after 2 s: kilnd closes one idle for its 10 s header timeout, and a round (wrk on
    // kilnd, then on nginx) leaves this client idle for longer than that
    let http = reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(60))
        .build()?;
    let res = http
        .put(format!("{}/v1/streams/bench", k.url))
        .body(SPEC)
        .send()
        .await?;
    ensure!(res.status().is_success(), "PUT: {}", res.status());
    let pl_path = "/live/bench/v/index.m3u8";
    // two complete segments first
    let mut text = http
        .get(format!("{}{pl_path}", k.url))
        .send()
        .await?
        .text()
        .await?;
    for _ in 0..10 {
        let (m, _) = last_part(&text)?;
        text = http
            .get(format!("{}{pl_path}?_HLS_msn={}", k.url, m + 1))
            .send()
            .await?
            .text()
            .await?;
    }

    // --- 1. throughput vs nginx, same bytes
    let dir = std::env::temp_dir().join(format!("kiln-bench-{}", std::process::id()));
    let root = dir.join("www");
    std::fs::create_dir_all(root.join("live/bench/v"))?;
    // each round takes the current playlist and a part of the previous segment (a part older than that leaves
    // the playlist during a round: a 404), and gives nginx the same bytes
    let current = || async {
        let text = http
            .get(format!("{}{pl_path}", k.url))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        let (m, _) = last_part(&text)?;
        let part_path = format!("/live/bench/v/part-{}-2.m4s", m - 1);
        let part = http
            .get(format!("{}{part_path}", k.url))
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        // the bytes kilnd sends to a client that asks for gzip, for nginx's gzip_static
        let gzipped = http
            .get(format!("{}{pl_path}", k.url))
            .header("accept-encoding", "gzip")
            .send()
            .await?
            .error_for_status()?;
        ensure!(
            gzipped.headers().get("content-encoding").is_some(),
            "kilnd did not gzip the playlist"
        );
        let gzipped = gzipped.bytes().await?;
        let pl_file = root.join(pl_path.trim_start_matches('/'));
        std::fs::write(&pl_file, &text)?;
        std::fs::write(pl_file.with_extension("m3u8.gz"), &gzipped)?;
        std::fs::write(root.join(part_path.trim_start_matches('/')), &part)?;
        anyhow::Ok((text, part_path, part))
    };
    let (mut text, _, mut part) = current().await?;
    let (nginx, nginx_base) = start_nginx(&root, &dir, false)?;
    let (tuned, tuned_base) = start_nginx(&root, &dir, true)?;
    let secs = std::env::var("KILN_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    // kilnd shares the server's CPU: stopped (SIGSTOP) while nginx is measured, so nginx has the core alone
    let signal = |sig: &str| {
        Command::new("kill")
            .args([sig, &k.pid().to_string()])
            .status()
    };
    // alternating rounds, the median ratio reported: this shared VM moves either server by ±20 % between runs
    let rounds: usize = std::env::var("KILN_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let mut results = Vec::with_capacity(rounds);
    let mut serving = Vec::with_capacity(rounds);
    // the same with `Accept-Encoding: gzip` (browsers, shields): kilnd's playlists gzipped once per publish,
    // nginx's from a .gz file beside the playlist (gzip_static)
    let mut gzipped = Vec::with_capacity(rounds);
    // the plain mix against nginx with open_file_cache (not in Debian's default configuration)
    let mut against_tuned = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let (t, part_path, p) = current().await?;
        (text, part) = (t, p);
        let paths = [pl_path, part_path.as_str()];
        let (kiln_rps, kiln_p99) = wrk(&k.url, paths, false, secs, &dir)?;
        // what kilnd measured of its own serving over the last 5 s of that run (host.serving)
        let cap: serde_json::Value = http
            .get(format!("{}/v1/capacity", k.url))
            .send()
            .await?
            .json()
            .await?;
        serving.push(cap["host"]["serving"].clone());
        let (kiln_gz_rps, kiln_gz_p99) = wrk(&k.url, paths, true, secs, &dir)?;
        signal("-STOP")?;
        let nginx_run = wrk(&nginx_base, paths, false, secs, &dir)
            .and_then(|plain| Ok((plain, wrk(&nginx_base, paths, true, secs, &dir)?)))
            .and_then(|both| Ok((both, wrk(&tuned_base, paths, false, secs, &dir)?)));
        signal("-CONT")?;
        caught_up(&http, &k.url, pl_path).await?;
        let (((nginx_rps, nginx_p99), (nginx_gz_rps, nginx_gz_p99)), (tuned_rps, tuned_p99)) =
            nginx_run?;
        results.push((kiln_rps, kiln_p99, nginx_rps, nginx_p99));
        against_tuned.push((kiln_rps, kiln_p99, tuned_rps, tuned_p99));
        gzipped.push((kiln_gz_rps, kiln_gz_p99, nginx_gz_rps, nginx_gz_p99));
    }
    drop((nginx, tuned));
    let (client_cpu, server_cpu) = cpus();
    println!(
        "throughput (wrk -t1 -c64 {secs}s on CPU {client_cpu}, server on CPU {server_cpu}; playlist {} B + part {} B \
         alternating; kilnd with {}, nginx with one worker process):",
        text.len(),
        part.len(),
        if shared() {
            "an async worker per CPU"
        } else {
            "one async worker"
        }
    );
    for (i, (kr, kp, nr, np)) in results.iter().enumerate() {
        println!(
            "  round {}: kiln {kr:>8.0} req/s p99 {kp:.2} ms | nginx {nr:>8.0} req/s p99 {np:.2} ms | ratio {:.2}, p99 {:+.2} ms",
            i + 1,
            kr / nr,
            kp - np
        );
    }
    for (i, sv) in serving.iter().enumerate() {
        println!(
            "  round {}: kilnd's own serving measure (host.serving): {} millicores at {} requests/s = {} millicores \
             per 1,000 requests/s, {} MB/s",
            i + 1,
            sv["millicores"],
            sv["requests_per_s"],
            sv["millicores_per_1k_rps"],
            sv["bytes_per_s"].as_f64().unwrap_or(0.0) / 1e6
        );
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "  median ratio kiln/nginx = {:.2}, median p99 kiln - nginx = {:+.2} ms (live stream encoding beside kilnd; \
         kilnd stopped while nginx runs)",
        median(results.iter().map(|r| r.0 / r.2).collect()),
        median(results.iter().map(|r| r.1 - r.3).collect())
    );
    println!(
        "the same with Accept-Encoding: gzip (nginx: gzip_static, the same gzip bytes as kilnd's):"
    );
    for (i, (kr, kp, nr, np)) in gzipped.iter().enumerate() {
        println!(
            "  round {}: kiln {kr:>8.0} req/s p99 {kp:.2} ms | nginx {nr:>8.0} req/s p99 {np:.2} ms | ratio {:.2}, p99 {:+.2} ms",
            i + 1,
            kr / nr,
            kp - np
        );
    }
    println!(
        "  median ratio kiln/nginx = {:.2}, median p99 kiln - nginx = {:+.2} ms",
        median(gzipped.iter().map(|r| r.0 / r.2).collect()),
        median(gzipped.iter().map(|r| r.1 - r.3).collect())
    );
    println!("the plain mix against nginx with open_file_cache (each answer skips its file's open, stat and close):");
    for (i, (kr, kp, nr, np)) in against_tuned.iter().enumerate() {
        println!(
            "  round {}: kiln {kr:>8.0} req/s p99 {kp:.2} ms | nginx {nr:>8.0} req/s p99 {np:.2} ms | ratio {:.2}, p99 {:+.2} ms",
            i + 1,
            kr / nr,
            kp - np
        );
    }
    println!(
        "  median ratio kiln/nginx = {:.2}, median p99 kiln - nginx = {:+.2} ms",
        median(against_tuned.iter().map(|r| r.0 / r.2).collect()),
        median(against_tuned.iter().map(|r| r.1 - r.3).collect())
    );

    // --- 2. 10,000 parked blocking requests
    let n: usize = std::env::var("KILN_BENCH_PARKED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    rlimit::increase_nofile_limit(4 * n as u64 + 1024)?;
    let rss_idle = rss_kib(k.pid())?;
    let mut viewers = Some(viewers::Viewers::new(
        k.url.trim_start_matches("http://").parse()?,
        n,
    )?);
    let before = fan_out_round(&k, &http, &mut viewers, pl_path, n, None).await?;
    println!("fan-out: {n} blocking playlist requests, one new HTTP/1.1 connection each:");
    before.print(rss_idle, n);
    // the same viewers' next blocking reload, on the connections their last answer came on (a player's steady
    // state: its connection has answered before, so its buffers are already in memory)
    let warm = fan_out_round(&k, &http, &mut viewers, pl_path, n, Some(&before.metrics)).await?;
    println!("the same {n} viewers' next reload, on the connections that answered them (a player's steady state):");
    let reused = warm.sockets.intersection(&before.sockets).count();
    println!(
        "  {reused} of kilnd's {} sockets in this round were the first round's",
        warm.sockets.len()
    );
    warm.print(rss_idle, n);
    let _ = std::fs::remove_dir_all(&dir);
    drop((k, viewers));
    floor_fanout(n, text.len(), false).await?;
    floor_fanout(n, text.len(), true).await
}

/// One fan-out: `n` blocking reloads parked on a part a whole segment away, then answered by its publish.
struct FanOutRound {
    /// `Ok(parked)` if all were parked before the publish, `Err(parked)` if not; and how long parking took.
    parked: (std::result::Result<usize, usize>, Duration),
    /// kilnd's RSS (KiB) right before the requests, and with all of them parked.
    rss_before: u64,
    rss_parked: u64,
    /// kilnd's sockets (inodes) with all parked.
    sockets: std::collections::HashSet<String>,
    answered: String,
    /// kilnd's `/metrics` after the round (its histogram counts every round so far).
    metrics: String,
    /// `kiln_origin_fanout_seconds` p50 and p99 (bucket bounds, ms) over this round's observations.
    inside: Option<(f64, f64)>,
}

impl FanOutRound {
    fn print(&self, rss_idle: u64, n: usize) {
        match self.parked {
            (Ok(p), t) => println!(
                "  all parked before the publish ({p} waiting, {:.1} s after the first request)",
                t.as_secs_f64()
            ),
            (Err(p), t) => println!(
                "  WARNING: the part was published {:.1} s after the first request, with {p} of {n} parked",
                t.as_secs_f64()
            ),
        }
        let mib = |kib: u64| kib as f64 / 1024.0;
        let per = |from: u64| self.rss_parked.saturating_sub(from) as f64 / n as f64;
        println!("  kilnd RSS {:.1} MiB idle -> {:.1} MiB with {n} parked ({:.1} KiB per parked request incl. its connection)",
            mib(rss_idle), mib(self.rss_parked), per(rss_idle));
        if self.rss_before > rss_idle + 1024 {
            println!("  of which {:.1} MiB before this round's requests (the open connections, and what the last round freed and the allocator keeps): {:.1} KiB per request parked on them",
                mib(self.rss_before - rss_idle), per(self.rss_before));
        }
        println!("  publish -> responses (client): {}", self.answered);
        match self.inside {
            Some((p50, p99)) => println!(
                "  in kilnd (kiln_origin_fanout_seconds): p50 <= {p50:.1} ms, p99 <= {p99:.1} ms"
            ),
            None => println!("  in kilnd: kiln_origin_fanout_seconds has no observation"),
        }
    }
}

/// Parks `n` blocking reloads through `viewers` (new connections, or the ones of its last round) on part 0
/// of the furthest segment a request may name, waits for all to park, reads kilnd's RSS, and collects the
/// answers. `earlier`: kilnd's `/metrics` after the last round, so this round's histogram is the difference.
async fn fan_out_round(
    k: &kiln_integration::Proc,
    http: &reqwest::Client,
    viewers: &mut Option<viewers::Viewers>,
    pl_path: &str,
    n: usize,
    earlier: Option<&str>,
) -> Result<FanOutRound> {
    let pid = k.pid();
    // kilnd was stopped during each nginx round: its live pipeline publishes what it owes in a burst once it
    // runs again, so "a segment away" is not yet 2 s. Follow segment starts until one takes a second or more.
    for _ in 0..20 {
        let text = http
            .get(format!("{}{pl_path}", k.url))
            .send()
            .await?
            .text()
            .await?;
        let (m, _) = last_part(&text)?;
        let t = Instant::now();
        http.get(format!("{}{pl_path}?_HLS_msn={}&_HLS_part=0", k.url, m + 1))
            .send()
            .await?
            .error_for_status()?;
        if t.elapsed() >= Duration::from_secs(1) {
            break;
        }
    }
    let text = http
        .get(format!("{}{pl_path}", k.url))
        .send()
        .await?
        .text()
        .await?;
    let (m, _) = last_part(&text)?;
    // wait for segment m+1 to start, then park on part 0 of m+3 (the furthest a request may ask for: the last
    // segment + 2): a whole 4 s away, time enough to open and park 10,000 connections from one core, and inside
    // the 3 × TD a request may be held
    http.get(format!("{}{pl_path}?_HLS_msn={}&_HLS_part=0", k.url, m + 1))
        .send()
        .await?
        .error_for_status()?;
    let url = format!("{}{pl_path}?_HLS_msn={}&_HLS_part=0", k.url, m + 3);
    let rss_before = rss_kib(pid)?;
    let started = Instant::now();
    let v = viewers.take().context("the viewers")?;
    let (early, parked_now) = (v.answered.clone(), v.parked.clone());
    let path = url.trim_start_matches(&k.url).to_string();
    let round = viewers::round_off_runtime(v, path, Duration::from_secs(90));
    let stats_url = format!("{}/v1/stats", k.url);
    let parked_at = poll_until(
        "every request parks (or one is answered)",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || async {
            let s: serde_json::Value =
                serde_json::from_str(&http.get(&stats_url).send().await?.text().await?)?;
            let parked = s["parked_requests"].as_u64().unwrap_or(0) as usize;
            parked_now.store(parked, std::sync::atomic::Ordering::SeqCst);
            Ok(if parked >= n {
                Polled::Done(Ok(parked))
            } else if early.load(std::sync::atomic::Ordering::SeqCst) > 0 {
                Polled::Done(Err(parked))
            } else {
                Polled::NotYet(format!("{parked} parked"))
            })
        },
    )
    .await?;
    // no count comes after this one: the viewers left to open (if the part came first) open at once
    parked_now.store(usize::MAX, std::sync::atomic::Ordering::SeqCst);
    let parked_in = started.elapsed();
    let rss_parked = rss_kib(pid)?;
    let sockets = std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| l.starts_with("socket:"))
        .collect();
    let (v, outcomes) = round.await??;
    *viewers = Some(v);
    let answered = answers(outcomes)?;
    let metrics = http
        .get(format!("{}/metrics", k.url))
        .send()
        .await?
        .text()
        .await?;
    let name = "kiln_origin_fanout_seconds";
    let mut buckets = histogram_buckets(&metrics, name);
    if let Some(e) = earlier {
        for ((_, c), (_, ce)) in buckets.iter_mut().zip(histogram_buckets(e, name)) {
            *c -= ce;
        }
    }
    let q = |q| quantile(&buckets, q).map(|s| s * 1000.0);
    Ok(FanOutRound {
        parked: (parked_at, parked_in),
        rss_before,
        rss_parked,
        sockets,
        answered,
        metrics,
        inside: q(0.5).zip(q(0.99)),
    })
}

/// How the answers of a round spread after the first (p50, p99, last), the answers per second that makes, and
/// the failures.
fn answers(outcomes: Vec<std::result::Result<(u16, Instant), String>>) -> Result<String> {
    let mut done = Vec::with_capacity(outcomes.len());
    let mut failed = 0;
    let mut why = None;
    for o in outcomes {
        match o {
            Ok((200, at)) => done.push(at),
            Ok((status, _)) => {
                failed += 1;
                why.get_or_insert(format!("status {status}"));
            }
            Err(e) => {
                failed += 1;
                why.get_or_insert(e);
            }
        }
    }
    done.sort();
    let first = *done.first().context("no response")?;
    let spread =
        |q: f64| (done[((done.len() - 1) as f64 * q) as usize] - first).as_secs_f64() * 1000.0;
    Ok(format!(
        "p50 {:.0} ms, p99 {:.0} ms, last {:.0} ms after the first ({:.0} answers/s); {failed} failed{}",
        spread(0.5),
        spread(0.99),
        spread(1.0),
        done.len() as f64 / (spread(1.0) / 1000.0).max(1e-3),
        why.map(|w| format!(" (first: {w})")).unwrap_or_default()
    ))
}

/// The same fan-out against a floor ([`floor`]) on the server's CPU: a bare tokio program, or (`write_loop`) no
/// runtime at all, a loop that writes every answer.
async fn floor_fanout(n: usize, body_len: usize, write_loop: bool) -> Result<()> {
    // killed when dropped: also when the fan-out fails and the bench returns early
    let mut child = Floor(
        Command::new(std::env::current_exe()?)
            .env("KILN_BENCH_FLOOR", body_len.to_string())
            .env("KILN_BENCH_FLOOR_LOOP", if write_loop { "1" } else { "0" })
            .env("KILN_BENCH_FLOOR_THREADS", floor_threads().to_string())
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.0.stdout.take().context("stdout")?),
        &mut line,
    )?;
    let base = line
        .trim()
        .rsplit(' ')
        .next()
        .context("the floor's address")?
        .to_string();
    pin(child.0.id(), &cpus().1)?;
    let http = reqwest::Client::new();
    let get = |path: &str| {
        let u = format!("{base}{path}");
        let http = http.clone();
        async move { anyhow::Ok(http.get(u).send().await?.text().await?) }
    };
    let v = viewers::Viewers::new(base.trim_start_matches("http://").parse()?, n)?;
    let parked_now = v.parked.clone();
    let round = viewers::round_off_runtime(v, "/wait".into(), Duration::from_secs(90));
    poll_until(
        "every request parks at the floor",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || async {
            let parked: usize = get("/parked").await?.parse()?;
            parked_now.store(parked, std::sync::atomic::Ordering::SeqCst);
            Ok(if parked >= n {
                Polled::Done(())
            } else {
                Polled::NotYet(format!("{parked} parked"))
            })
        },
    )
    .await?;
    parked_now.store(usize::MAX, std::sync::atomic::Ordering::SeqCst);
    get("/publish").await?;
    let (_, outcomes) = round.await??;
    let answered = answers(outcomes)?;
    let written = get("/written").await?;
    drop(child);
    let w: Vec<&str> = written.split(' ').collect();
    let what = if write_loop {
        "no async runtime: a loop that writes every parked connection its answer"
    } else {
        "a bare tokio program, a task per connection"
    };
    let threads = floor_threads();
    println!(
        "fan-out floor ({what}; no HTTP library; {} on {}):",
        if threads == 1 {
            "one thread".to_string()
        } else {
            format!("{threads} threads")
        },
        if shared() {
            "every CPU"
        } else {
            "the server's CPU"
        }
    );
    println!("  publish -> responses (client): {answered}");
    if let [count, p50, p99, last] = w[..] {
        println!("  in the floor: {count} written, publish -> written p50 {p50} ms, p99 {p99} ms, last {last} ms");
    }
    Ok(())
}
