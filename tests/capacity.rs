//! Admission on this host, against a cost profile calibrated on this host: `kilnd calibrate` ramps the default
//! ladder (`live-720p-abr`) until it falls behind and writes a profile; a daemon using that profile advertises — and
//! admits — exactly the sustainable number of streams; the refusal names the short dimension; the node never books
//! more than it has; every admitted stream keeps real time for 20 s (measured from /metrics); releasing one stream
//! makes room again.
//!
//! The shipped `hw-profiles/cpu-x86_64.toml` was measured on one development host; a CI host with slower cores
//! over-commits with it (seen: 9 small streams admitted at 0.82 × real time). Admission is only as true as its
//! profile, which is why the test calibrates first — the same thing an operator does on new hardware.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kiln_integration::Daemon;

const PRESET: &str = "live-360p-abr";

/// The preset the calibrated admission test ramps and fills the host with: kilnd's default 720p ladder, of which
/// a 2-core host sustains a few (2 here), so the ramp takes a few 7 s steps (the 360p ladder took eleven: 77 s).
const ADMISSION_PRESET: &str = "live-720p-abr";

/// How long every admitted stream must keep real time: over 20 s an over-committed stream (seen: 0.82 × real time)
/// loses 3.6 s, and the 0.97 bar allows 0.6 s.
const WINDOW: Duration = Duration::from_secs(20);

fn media_seconds(metrics: &str) -> BTreeMap<String, f64> {
    // slowest rendition per stream
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for l in metrics
        .lines()
        .filter(|l| l.starts_with("kiln_media_seconds_total{"))
    {
        let stream = l
            .split("stream=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or("")
            .to_string();
        let v: f64 = l
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let e = out.entry(stream).or_insert(f64::MAX);
        *e = e.min(v);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calibrated_admission_refuses_when_full_and_admitted_streams_keep_real_time() -> Result<()>
{
    let cal = kilnd::calibrate::run(
        kilnd::Config::default(),
        ADMISSION_PRESET,
        kilnd::calibrate::DEFAULT_SOURCE,
        Duration::from_secs(3),
        Duration::from_secs(4),
    )
    .await?;
    let text = cal.to_toml();
    eprintln!("{text}");
    let n = cal.sustainable;
    let d = Daemon::start(kilnd::Config {
        cpu_model: kiln_config::parse_cpu_profile(&text)?,
        ..Default::default()
    })
    .await?;
    let (_, cap) = d.get_text("/v1/capacity").await?;
    let cap: serde_json::Value = serde_json::from_str(&cap)?;
    ensure!(
        cap["headroom"][ADMISSION_PRESET] == n as u64,
        "advertised {} vs calibrated {n}",
        cap["headroom"][ADMISSION_PRESET]
    );
    let spec = format!(r#"{{"source": "test:pattern=ball", "preset": "{ADMISSION_PRESET}"}}"#);
    let mut admitted = Vec::new();
    let mut refusal = None;
    for i in 0..64 {
        let id = format!("s{i}");
        let (st, body) = d.put_stream(&id, &spec).await?;
        match st {
            201 => admitted.push(id),
            429 => {
                refusal = Some(body);
                break;
            }
            other => anyhow::bail!("PUT {id}: {other} {body}"),
        }
    }
    let refusal = refusal.context("64 streams admitted, never refused")?;
    ensure!(
        admitted.len() == n,
        "admitted {} of {n} calibrated",
        admitted.len()
    );
    let e = &refusal["error"];
    ensure!(
        e["code"] == "insufficient_capacity" && e["dimension"] == "cpu_millicores",
        "{refusal}"
    );
    ensure!(e["requested"].as_u64() > e["free"].as_u64(), "{refusal}");

    // the report adds up and never exceeds capacity
    let (_, cap) = d.get_text("/v1/capacity").await?;
    let cap: serde_json::Value = serde_json::from_str(&cap)?;
    let host = &cap["host"];
    let c = host["capacity"]["cpu_millicores"]
        .as_u64()
        .context("capacity")?;
    let a = host["allocated"]["cpu_millicores"]
        .as_u64()
        .context("allocated")?;
    // free is what is neither booked nor kept for serving: a full host's few API requests/s can measure over the
    // serving floor, since their polls' wall time includes the encoders preempting them (seen in CI: 137 mc at
    // 11 requests/s, 37 reserved)
    let reserved = host["serving"]["reserved_millicores"]
        .as_u64()
        .context("serving")?;
    ensure!(
        a <= c && host["free"]["cpu_millicores"].as_u64() == Some(c.saturating_sub(a + reserved)),
        "{host}"
    );
    let sum: u64 = cap["streams"]
        .as_array()
        .context("streams")?
        .iter()
        .map(|s| s["demand"]["cpu_millicores"].as_u64().unwrap_or(0))
        .sum();
    ensure!(sum == a, "allocated {a} != sum of demands {sum}");
    ensure!(
        cap["headroom"]["live-1080p-abr"] == 0,
        "{}",
        cap["headroom"]
    );
    eprintln!(
        "admitted {} streams: {a}/{c} millicores booked; refusal: {refusal}",
        admitted.len()
    );

    // every admitted stream keeps real time over a window (`WINDOW`)
    for id in &admitted {
        d.wait_for_segments(id, "360p", 1).await?;
    }
    // Two chances: a window disturbed by something else on the host (this VM has shown single 60 s windows at
    // 0.57 and 0.80 while the calibration a minute earlier had 1.00) gets a second one; an over-committed node
    // fails both.
    let mut last_err = None;
    for window in 1..=2 {
        let (_, before) = d.get_text("/metrics").await?;
        let t0 = std::time::Instant::now();
        tokio::time::sleep(WINDOW).await; // the measurement window itself
        let (_, after) = d.get_text("/metrics").await?;
        let wall = t0.elapsed().as_secs_f64();
        let (b, a2) = (media_seconds(&before), media_seconds(&after));
        let mut behind = Vec::new();
        for id in &admitted {
            let produced = a2.get(id).copied().unwrap_or(0.0) - b.get(id).copied().unwrap_or(0.0);
            // one part (334 ms) may be in flight when the window closes
            let ratio = (produced + 0.334) / wall;
            eprintln!(
                "window {window}: {id}: {produced:.2} s of media in {wall:.2} s (ratio {ratio:.3})"
            );
            if ratio < 0.97 {
                behind.push(format!("{id} at {ratio:.3}"));
            }
        }
        if behind.is_empty() {
            last_err = None;
            break;
        }
        last_err = Some(format!(
            "window {window}: behind real time: {}",
            behind.join(", ")
        ));
        eprintln!("{}", last_err.as_deref().unwrap_or(""));
    }
    if let Some(e) = last_err {
        anyhow::bail!("{e}");
    }
    let (_, m) = d.get_text("/v1/capacity").await?;
    let m: serde_json::Value = serde_json::from_str(&m)?;
    eprintln!(
        "measured {} vs booked {}",
        m["host"]["measured"], m["host"]["allocated"]
    );

    // freeing one stream makes room for the refused one
    let res = d
        .http
        .delete(d.url(&format!("/v1/streams/{}", admitted[0])))
        .send()
        .await?;
    ensure!(res.status() == 204);
    let (st, body) = d.put_stream("late", &spec).await?;
    ensure!(st == 201, "after a release: {st} {body}");
    d.shutdown().await
}

/// `/v1/capacity` for a daemon at `base`.
async fn capacity(http: &reqwest::Client, base: &str) -> Result<serde_json::Value> {
    Ok(http
        .get(format!("{base}/v1/capacity"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// A kilnd process (its own runtime: what it measures is its own serving) with the shipped CPU profile, except
/// a per-stream base cost of `base_mc`.
async fn daemon_with_stream_base(
    dir: &std::path::Path,
    base_mc: u64,
) -> Result<kiln_integration::Proc> {
    let shipped = include_str!("../hw-profiles/cpu-x86_64.toml");
    let profile = shipped
        .lines()
        .map(|l| {
            if l.starts_with("stream_base_millicores") {
                format!("stream_base_millicores = {base_mc}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = dir.join(format!("cpu-{base_mc}.toml"));
    std::fs::write(&path, profile)?;
    kiln_integration::spawn_kilnd(
        "kilnd",
        env!("CARGO_BIN_EXE_kiln-it-kilnd"),
        &["--cpu-profile", path.to_str().context("utf-8 path")?],
    )
    .await
}

/// Serving viewers costs CPU that admission never booked: a daemon measures it (its runtime threads' CPU, the
/// requests and bytes it answers), reports it in `/v1/capacity` and keeps it free. The daemon's profile makes one
/// audio-only stream cost 40 millicores less than the whole host: it fits while nobody is served, and is refused
/// (`cpu_millicores`) while clients hammer the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_load_is_measured_reported_and_kept_free_by_admission() -> Result<()> {
    const AUDIO: &str = "live-audio-only";
    let dir = tempfile::tempdir()?;
    let http = reqwest::Client::new();
    // what the profile's base cost adds up to for one audio-only stream, and the host's capacity
    let probe = daemon_with_stream_base(dir.path(), 1000).await?;
    let cap = capacity(&http, &probe.url).await?;
    let host_cpu = cap["host"]["capacity"]["cpu_millicores"]
        .as_u64()
        .context("capacity")?;
    let demand = cap["demands"][AUDIO]["cpu"]["cpu_millicores"]
        .as_u64()
        .context("audio-only demand")?;
    drop(probe);
    let base = (host_cpu - 40)
        .checked_sub(demand - 1000)
        .context("host too small")?;
    let d = daemon_with_stream_base(dir.path(), base).await?;

    // idle: nothing reserved, one audio-only stream fits
    let idle = capacity(&http, &d.url).await?;
    ensure!(
        idle["demands"][AUDIO]["cpu"]["cpu_millicores"] == host_cpu - 40,
        "{idle}"
    );
    ensure!(
        idle["host"]["serving"]["reserved_millicores"] == 0,
        "{idle}"
    );
    ensure!(idle["headroom"][AUDIO] == 1, "{idle}");

    // 32 clients ask for the origin's clock as fast as it answers
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..32)
        .map(|_| {
            let (http, url, stop) = (http.clone(), format!("{}/time", d.url), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = http.get(&url).send().await?.error_for_status()?;
                    r.bytes().await?;
                    n += 1;
                }
                anyhow::Ok(n)
            })
        })
        .collect();
    let loaded = kiln_integration::poll_until(
        "the serving reservation leaves less than one audio-only stream free",
        Duration::from_secs(20),
        Duration::from_millis(250),
        || async {
            let c = capacity(&http, &d.url).await?;
            Ok(
                if c["host"]["serving"]["reserved_millicores"].as_u64() > Some(40) {
                    kiln_integration::Polled::Done(c)
                } else {
                    kiln_integration::Polled::NotYet(c["host"]["serving"].to_string())
                },
            )
        },
    )
    .await?;
    let refused = http
        .put(format!("{}/v1/streams/a", d.url))
        .header("content-type", "application/json")
        .body(format!(r#"{{"source": "test:", "preset": "{AUDIO}"}}"#))
        .send()
        .await?;
    let (status, body) = (refused.status().as_u16(), refused.text().await?);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered = 0;
    for c in clients {
        answered += c.await??;
    }
    let s = &loaded["host"]["serving"];
    eprintln!("under load: {s}; clients got {answered} answers");
    let num = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    ensure!(num(&s["requests_per_s"]) >= 200, "{s}");
    ensure!(
        num(&s["bytes_per_s"]) >= 200 * 20,
        "{s} (a /time answer is ~24 B)"
    );
    ensure!(
        num(&s["millicores"]) > 0 && num(&s["peak_millicores"]) >= num(&s["millicores"]),
        "{s}"
    );
    ensure!(
        num(&s["reserved_millicores"]) == num(&s["peak_millicores"]) - 100,
        "{s}: the floor is 100"
    );
    ensure!(s["millicores_per_1k_rps"].as_u64().is_some(), "{s}");
    let host = &loaded["host"];
    ensure!(
        num(&host["free"]["cpu_millicores"])
            == host_cpu
                .saturating_sub(num(&host["allocated"]["cpu_millicores"]))
                .saturating_sub(num(&s["reserved_millicores"])),
        "free leaves the reservation out: {host}"
    );
    ensure!(loaded["headroom"][AUDIO] == 0, "{loaded}");
    ensure!(status == 429, "{status} {body}");
    ensure!(body.contains("cpu_millicores"), "{body}");
    // the peak stays reserved for 30 s after the load: still refused, and the metrics say why
    let metrics = http
        .get(format!("{}/metrics", d.url))
        .send()
        .await?
        .text()
        .await?;
    let reserved = metrics
        .lines()
        .find(|l| l.starts_with(r#"kiln_serving_millicores{kind="reserved"}"#))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .context("kiln_serving_millicores{kind=reserved}")?;
    ensure!(reserved > 40, "{reserved}");
    ensure!(
        metrics.contains(r#"kiln_http_response_bytes_total{kind="other"}"#),
        "bytes by kind"
    );
    ensure!(
        metrics.contains(r#"kiln_stream_refusals_total{reason="cpu_millicores"} 1"#),
        "refusal counted"
    );
    Ok(())
}

/// `kilnd calibrate`'s serving measurement: kilnd's own server answering a live stream's playlists and parts, then
/// its segments, from a client on another thread. The costs it finds are positive and survive the profile file; a
/// daemon run with that profile reports what they make of its serving load and how many more requests/s its free
/// CPU could answer (`host.serving`, and the headroom gauge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_calibration_measures_both_mixes_and_a_node_reports_its_headroom() -> Result<()> {
    let s = kilnd::calibrate::serving(kilnd::Config::default(), Duration::from_secs(2)).await?;
    eprintln!("{s:?}");
    let each = |r: &kiln_model::load::MixReading| r.bytes_per_s / r.rps;
    ensure!(
        s.small.rps > 200.0 && s.large.rps > 20.0,
        "too few answers to measure: {s:?}"
    );
    ensure!(
        each(&s.large) > 2.0 * each(&s.small),
        "segments no larger than parts: {s:?}"
    );
    ensure!(
        s.small.millicores > 0.0 && s.large.millicores > 0.0,
        "{s:?}"
    );
    let c = s.cost;
    ensure!(
        c.millicores_per_1k_rps > 0.0 && c.millicores_per_mbps >= 0.0,
        "{c:?}"
    );
    // the small mix's cost is what the fit gives back for it (within the 3 decimals the file keeps)
    ensure!(
        (c.millicores(s.small.rps, s.small.bytes_per_s) - s.small.millicores).abs()
            <= 0.05 * s.small.millicores + 1.0,
        "{c:?} does not explain {:?}",
        s.small
    );

    // written into a profile and read back
    let mut model = kiln_config::builtin_cpu_profile();
    model.serving = Some(c);
    let cal = kilnd::calibrate::Calibration {
        preset: PRESET.into(),
        cores: 2,
        steps: Vec::new(),
        sustainable: 1,
        model,
        serving: Some(s.clone()),
    };
    let text = cal.to_toml();
    let read = kiln_config::parse_cpu_profile(&text)?;
    let back = read.serving.context("no [serving] table read back")?;
    ensure!(
        (back.millicores_per_1k_rps - c.millicores_per_1k_rps).abs() < 0.001
            && back.small_answer_bytes == c.small_answer_bytes,
        "{back:?} vs {c:?}\n{text}"
    );

    let d = Daemon::start(kilnd::Config {
        cpu_model: read,
        ..Default::default()
    })
    .await?;
    let (_, cap) = d.get_text("/v1/capacity").await?;
    let cap: serde_json::Value = serde_json::from_str(&cap)?;
    let serving = &cap["host"]["serving"];
    let free = cap["host"]["free"]["cpu_millicores"]
        .as_u64()
        .context("free")?;
    let want = back.headroom_rps(free, back.small_answer_bytes as f64);
    ensure!(
        want > 0 && serving["headroom_rps"].as_u64() == Some(want),
        "idle node: headroom {} vs {want} from {free} mc free: {serving}",
        serving["headroom_rps"]
    );
    ensure!(serving["calibrated_millicores"].is_u64(), "{serving}");
    let (_, metrics) = d.get_text("/metrics").await?;
    let gauge = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kiln_serving_headroom_requests_per_second "))
        .context("no headroom gauge")?;
    ensure!(gauge.trim().parse::<u64>()? > 0, "headroom gauge {gauge}");
    d.shutdown().await
}

/// A stream whose encoder cannot keep up (test-only fault: each frame it outputs is held 60 ms, so about 16 of
/// its 30 frames per second get through) is flagged behind real time within the sampler's window: in its status,
/// in the capacity report (what a scheduler with `--relieve-behind` moves streams by) and in
/// `kiln_stream_behind_real_time`. A healthy stream on the same node is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_falls_behind_real_time_is_flagged_and_its_neighbour_is_not() -> Result<()> {
    const SPEC: &str = r#"{"source": "test:pattern=ball",
        "renditions": [{"name": "v", "width": 160, "height": 90, "fps": 30, "bitrate_kbps": 200}],
        "audio": {"enabled": false}}"#;
    let d = Daemon::start_default().await?;
    for id in ["slow", "fine"] {
        let (st, body) = d.put_stream(id, SPEC).await?;
        ensure!(st == 201, "PUT {id}: {st} {body}");
        d.wait_for_segments(id, "v", 1).await?;
    }
    ensure!(
        d.state
            .supervisor
            .inject_encoder_slowness("slow", Duration::from_millis(60)),
        "no encoder to slow"
    );
    let status = |id: &'static str| {
        let d = &d;
        async move {
            let (_, text) = d.get_text(&format!("/v1/streams/{id}")).await?;
            anyhow::Ok(serde_json::from_str::<serde_json::Value>(&text)?)
        }
    };
    let slow = kiln_integration::poll_until(
        "the slowed stream is flagged behind real time",
        Duration::from_secs(40),
        Duration::from_millis(250),
        || async {
            let s = status("slow").await?;
            Ok(if s["behind_real_time"] == true {
                kiln_integration::Polled::Done(s)
            } else {
                kiln_integration::Polled::NotYet(format!("{}", s["recent_realtime_ratio"]))
            })
        },
    )
    .await?;
    let ratio = slow["recent_realtime_ratio"].as_f64().context("ratio")?;
    ensure!(ratio < 0.9, "flagged at {ratio}");
    // (its window judges once it is 4 s long)
    let fine = kiln_integration::poll_until(
        "the healthy stream's ratio",
        Duration::from_secs(20),
        Duration::from_millis(250),
        || async {
            let s = status("fine").await?;
            Ok(if s["recent_realtime_ratio"].is_f64() {
                kiln_integration::Polled::Done(s)
            } else {
                kiln_integration::Polled::NotYet(String::new())
            })
        },
    )
    .await?;
    ensure!(
        fine["behind_real_time"] == false
            && fine["recent_realtime_ratio"]
                .as_f64()
                .is_some_and(|r| r >= 0.9),
        "the healthy stream: {fine}"
    );
    let (_, cap) = d.get_text("/v1/capacity").await?;
    let cap: serde_json::Value = serde_json::from_str(&cap)?;
    let flagged: Vec<&str> = cap["streams"]
        .as_array()
        .context("streams")?
        .iter()
        .filter(|s| s["behind_real_time"] == true)
        .filter_map(|s| s["id"].as_str())
        .collect();
    ensure!(
        flagged == ["slow"],
        "capacity report flags {flagged:?}: {cap}"
    );
    let (_, metrics) = d.get_text("/metrics").await?;
    for (id, want) in [("slow", "1"), ("fine", "0")] {
        let line = format!("kiln_stream_behind_real_time{{stream=\"{id}\"}} {want}");
        ensure!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in /metrics"
        );
    }
    d.shutdown().await
}
