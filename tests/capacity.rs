//! Admission on this host: admit live streams until kilnd refuses one; the refusal names the short dimension; the
//! node never books more than it has; every admitted stream keeps real time for 60 s (measured from /metrics).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kiln_integration::Daemon;

const MEDIUM: &str = r#"{"source": "test:pattern=ball",
  "renditions": [{"name": "hi", "width": 640, "height": 360, "fps": 30, "bitrate_kbps": 800},
                 {"name": "lo", "width": 320, "height": 180, "fps": 30, "bitrate_kbps": 300}],
  "audio": {"bitrate_kbps": 64}}"#;

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
async fn admits_until_full_refuses_with_the_dimension_and_keeps_real_time() -> Result<()> {
    let d = Daemon::start_default().await?;
    let mut admitted = Vec::new();
    let refusal = loop {
        let id = format!("s{}", admitted.len());
        let (st, body) = d.put_stream(&id, MEDIUM).await?;
        match st {
            201 => admitted.push(id),
            429 => break body,
            other => anyhow::bail!("PUT {id}: {other} {body}"),
        }
        ensure!(admitted.len() < 64, "never refused");
    };
    ensure!(!admitted.is_empty(), "nothing admitted");
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
    ensure!(
        a <= c && host["free"]["cpu_millicores"].as_u64() == Some(c - a),
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

    // every admitted stream keeps real time over 60 s
    for id in &admitted {
        d.wait_for_segments(id, "lo", 1).await?;
    }
    let (_, before) = d.get_text("/metrics").await?;
    let t0 = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(60)).await; // the measurement window itself
    let (_, after) = d.get_text("/metrics").await?;
    let wall = t0.elapsed().as_secs_f64();
    let (b, a2) = (media_seconds(&before), media_seconds(&after));
    for id in &admitted {
        let produced = a2.get(id).copied().unwrap_or(0.0) - b.get(id).copied().unwrap_or(0.0);
        let ratio = produced / wall;
        eprintln!("{id}: {produced:.2} s of media in {wall:.2} s (ratio {ratio:.3})");
        ensure!(
            ratio >= 0.97,
            "{id} fell behind real time: ratio {ratio:.3}"
        );
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
    let (st, body) = d.put_stream("late", MEDIUM).await?;
    ensure!(st == 201, "after a release: {st} {body}");
    d.shutdown().await
}

/// `kilnd calibrate` ramps the default ladder until it falls behind, writes a profile, and a daemon using that
/// profile advertises — and admits — exactly the sustainable number of streams, which then keep real time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calibration_matches_what_admission_then_allows() -> Result<()> {
    let preset = "live-720p-abr";
    let cal = kilnd::calibrate::run(
        kilnd::Config::default(),
        preset,
        Duration::from_secs(3),
        Duration::from_secs(4),
    )
    .await?;
    let text = cal.to_toml();
    eprintln!("{text}");
    let model = kiln_config::parse_cpu_profile(&text)?;
    let n = cal.sustainable;
    let d = Daemon::start(kilnd::Config {
        cpu_model: model,
        ..Default::default()
    })
    .await?;
    let (_, cap) = d.get_text("/v1/capacity").await?;
    let cap: serde_json::Value = serde_json::from_str(&cap)?;
    ensure!(
        cap["headroom"][preset] == n as u64,
        "advertised {} vs calibrated {n}",
        cap["headroom"][preset]
    );
    let body = format!(r#"{{"source": "test:", "preset": "{preset}"}}"#);
    let mut admitted = Vec::new();
    loop {
        let id = format!("c{}", admitted.len());
        let (st, b) = d.put_stream(&id, &body).await?;
        if st == 429 {
            break;
        }
        ensure!(st == 201, "{st} {b}");
        admitted.push(id);
    }
    ensure!(
        admitted.len() == n,
        "admitted {} of {n} calibrated",
        admitted.len()
    );
    for id in &admitted {
        d.wait_for_segments(id, "360p", 1).await?;
    }
    let (_, before) = d.get_text("/metrics").await?;
    let t0 = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(15)).await; // the measurement window
    let (_, after) = d.get_text("/metrics").await?;
    let wall = t0.elapsed().as_secs_f64();
    let (b, a) = (media_seconds(&before), media_seconds(&after));
    for id in &admitted {
        let ratio = (a[id] - b[id]) / wall;
        ensure!(ratio >= 0.97, "{id}: ratio {ratio:.3}");
    }
    d.shutdown().await
}
