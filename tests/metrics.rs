//! Metrics compliance: during a live stream, `/metrics` carries every series `docs/metrics.md` documents, and
//! the stream's counters move.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kiln_integration::{small_stream_spec, Daemon};

/// Every series name in docs/metrics.md (`gpu_too`: include the per-GPU section, which a GPU-less host does not
/// export).
fn documented_with(gpu_too: bool) -> Result<Vec<String>> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))?;
    Ok(doc
        .lines()
        .take_while(|l| gpu_too || !l.starts_with("## Per-GPU"))
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect())
}

fn documented() -> Result<Vec<String>> {
    documented_with(true)
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_series_is_exported() -> Result<()> {
    let d = Daemon::start_default().await?;
    let (st, _) = d.put_stream("m", small_stream_spec()).await?;
    ensure!(st == 201);
    let (st, _) = d.put_stream("bad", "{nope").await?;
    ensure!(st == 400);
    d.wait_for_segments("m", "hi", 2).await?;
    // the recent real-time ratio is judged once 4 s of parts have been sampled; a healthy stream reads about 1
    // and is not behind (the first, shortest windows swing by a part: looked at until one is in range)
    let text = kiln_integration::poll_until(
        "the recent real-time ratio is exported, in 0.9-1.2, and the stream is not behind",
        Duration::from_secs(20),
        Duration::from_millis(250),
        || async {
            let (st, text) = d.get_text("/metrics").await?;
            ensure!(st == 200);
            let recent = value(&text, r#"kiln_stream_recent_realtime_ratio{stream="m"}"#);
            let behind = value(&text, r#"kiln_stream_behind_real_time{stream="m"}"#);
            Ok(
                if recent.is_some_and(|r| (0.9..=1.2).contains(&r)) && behind == Some(0.0) {
                    kiln_integration::Polled::Done(text)
                } else {
                    kiln_integration::Polled::NotYet(format!("ratio {recent:?}, behind {behind:?}"))
                },
            )
        },
    )
    .await?;
    let (_, status) = d.get_text("/v1/streams/m").await?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    ensure!(
        status["recent_realtime_ratio"].as_f64().is_some(),
        "{status}"
    );
    ensure!(status["behind_real_time"].is_boolean(), "{status}");
    let names = documented_with(false)?;
    ensure!(
        names.len() >= 15,
        "parsed {} names from docs/metrics.md",
        names.len()
    );
    for n in &names {
        ensure!(
            text.contains(&format!("# TYPE {n} ")),
            "{n} is documented but not exported"
        );
    }
    let parts = value(
        &text,
        r#"kiln_parts_published_total{rendition="hi",stream="m"}"#,
    )
    .context("parts")?;
    ensure!(parts >= 12.0, "parts {parts}");
    // frame counters: about 30 fps in and out over the ≥ 4 s the stream has run, nothing dropped at equal rates
    let input = value(&text, r#"kiln_input_frames_total{stream="m"}"#).context("input frames")?;
    let encoded = value(
        &text,
        r#"kiln_encoded_frames_total{rendition="hi",stream="m"}"#,
    )
    .context("encoded frames")?;
    ensure!(
        input >= 100.0 && encoded >= 100.0,
        "input {input}, encoded {encoded}"
    );
    ensure!(
        (encoded - input).abs() <= 10.0,
        "30 fps in, 30 fps out: {input} vs {encoded}"
    );
    let dropped = value(
        &text,
        r#"kiln_dropped_frames_total{rendition="hi",stream="m"}"#,
    )
    .context("dropped frames")?;
    ensure!(dropped <= 2.0, "dropped {dropped}");
    let ratio = value(&text, r#"kiln_stream_realtime_ratio{stream="m"}"#).context("ratio")?;
    ensure!((0.9..=1.2).contains(&ratio), "real-time ratio {ratio}");
    ensure!(value(&text, r#"kiln_stream_refusals_total{reason="invalid"}"#) == Some(1.0));
    ensure!(value(&text, r#"kiln_streams{state="running"}"#) == Some(1.0));
    ensure!(
        value(
            &text,
            r#"kiln_stream_backend{backend="cpu",gpu="",policy="prefer-gpu",stream="m"}"#
        ) == Some(1.0),
        "backend series"
    );
    ensure!(text.contains(r#"kiln_http_requests_total{kind="playlist_blocking",status="200"}"#));
    d.shutdown().await
}

/// `kiln_*` names used in a text, with histogram suffixes folded to the family name.
fn kiln_names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("kiln_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = tail[..end]
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        out.push(name.to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn dashboard_and_alerts_use_only_documented_series() -> Result<()> {
    let docs = documented()?;
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
    let dashboard = std::fs::read_to_string(format!("{root}/grafana/kiln-dashboard.json"))?;
    let parsed: serde_json::Value = serde_json::from_str(&dashboard)?;
    ensure!(
        parsed["panels"].as_array().is_some_and(|p| p.len() >= 10),
        "dashboard panels"
    );
    let alerts = std::fs::read_to_string(format!("{root}/prometheus/kiln-alerts.yml"))?;
    for alert in [
        "KilnNodeNearCapacity",
        "KilnStreamBehindRealTime",
        "KilnFallbackStorm",
        "KilnOrigin5xx",
        "KilnSchedulerStoreDown",
    ] {
        ensure!(
            alerts.contains(&format!("alert: {alert}")),
            "{alert} missing"
        );
    }
    for (file, text) in [("dashboard", &dashboard), ("alerts", &alerts)] {
        for n in kiln_names(text) {
            ensure!(
                docs.contains(&n),
                "{file} uses {n}, which docs/metrics.md does not document"
            );
        }
    }
    Ok(())
}
