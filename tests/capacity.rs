//! Admission on this host, against a cost profile calibrated on this host: `kilnd calibrate` ramps the small
//! ladder (`live-360p-abr`) until it falls behind and writes a profile; a daemon using that profile advertises — and
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
        PRESET,
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
        cap["headroom"][PRESET] == n as u64,
        "advertised {} vs calibrated {n}",
        cap["headroom"][PRESET]
    );
    let spec = format!(r#"{{"source": "test:pattern=ball", "preset": "{PRESET}"}}"#);
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

    // every admitted stream keeps real time over a window (`WINDOW`)
    for id in &admitted {
        d.wait_for_segments(id, "180p", 1).await?;
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
