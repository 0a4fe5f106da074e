//! `kilnctl streams …`, `kilnctl fleet …`, `kilnctl capacity`: live streams on a daemon (`--server`) or through
//! the scheduler (`--scheduler`), the fleet's headroom, leader and consolidation, and a daemon's capacity report.
//! Tables for people; `--json` prints the API's own documents.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::{json, Value};

use crate::answer;

#[derive(Debug, Subcommand)]
pub(crate) enum StreamsCmd {
    /// Every stream: on the scheduler (placement) with --scheduler, else on the daemon (state).
    List,
    /// One stream's document.
    Get { id: String },
    /// Start (daemon: `PUT`) or place (scheduler: `POST`) a stream from SOURCE (`test:`, `file://…`, `srt://…`,
    /// `publish:`, …), or from a whole JSON spec with --spec.
    Create {
        id: String,
        /// The source URL (ignored with --spec).
        #[arg(long, required_unless_present = "spec")]
        source: Option<String>,
        #[arg(long)]
        preset: Option<String>,
        /// `auto`, `prefer-gpu`, `gpu-only` or `cpu-only`.
        #[arg(long)]
        policy: Option<String>,
        /// A JSON file with the whole stream spec (the API's body, without `id`).
        #[arg(long, conflicts_with_all = ["source", "preset", "policy"])]
        spec: Option<std::path::PathBuf>,
    },
    /// Stop a stream (daemon) or remove it from the fleet (scheduler).
    Delete { id: String },
}

#[derive(Debug, Subcommand)]
pub(crate) enum FleetCmd {
    /// How many more streams of each preset fit in the fleet now.
    Headroom,
    /// Who leads (id, URL, epoch).
    Leader,
    /// Move at most N streams off lightly loaded nodes onto nodes in use.
    Consolidate {
        #[arg(long, default_value_t = 10)]
        max_moves: usize,
    },
}

/// Where stream commands go: the scheduler when given, else the daemon.
pub(crate) struct Target<'a> {
    pub http: &'a reqwest::Client,
    pub daemon: &'a str,
    pub scheduler: Option<&'a str>,
    pub json: bool,
}

impl Target<'_> {
    fn scheduler(&self) -> Result<&str> {
        self.scheduler
            .context("this command talks to a scheduler: give --scheduler URL (or KILN_SCHEDULER)")
    }

    fn base(&self) -> &str {
        self.scheduler.unwrap_or(self.daemon)
    }

    async fn get(&self, url: String) -> Result<Value> {
        answer(self.http.get(url).send().await?).await
    }

    fn print_json(v: &Value) -> Result<ExitCode> {
        println!("{}", serde_json::to_string_pretty(v)?);
        Ok(ExitCode::SUCCESS)
    }
}

fn spec_body(
    source: Option<String>,
    preset: Option<String>,
    policy: Option<String>,
    spec: Option<std::path::PathBuf>,
) -> Result<Value> {
    if let Some(path) = spec {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        if !v.is_object() {
            bail!("{}: the spec must be a JSON object", path.display());
        }
        return Ok(v);
    }
    let mut v = json!({"source": source});
    if let Some(p) = preset {
        v["preset"] = json!(p);
    }
    if let Some(p) = policy {
        v["policy"] = json!(p);
    }
    Ok(v)
}

// Long by design: one match arm per subcommand, each a request and its table.
pub(crate) async fn streams(t: &Target<'_>, cmd: StreamsCmd) -> Result<ExitCode> {
    let base = t.base();
    match cmd {
        StreamsCmd::List => {
            let v = t.get(format!("{base}/v1/streams")).await?;
            if t.json {
                return Target::print_json(&v);
            }
            let on_scheduler = t.scheduler.is_some();
            println!(
                "{:<24} {:<9} {:<16} SOURCE",
                "ID",
                if on_scheduler { "PHASE" } else { "STATE" },
                if on_scheduler { "NODE" } else { "BACKEND" }
            );
            for s in v.as_array().map(Vec::as_slice).unwrap_or_default() {
                let (state, place) = if on_scheduler {
                    (
                        s["phase"].as_str().unwrap_or("?").to_string(),
                        s["node"].as_str().unwrap_or("-").to_string(),
                    )
                } else {
                    (
                        s["state"].as_str().unwrap_or("?").to_string(),
                        s["backend"]["kind"]
                            .as_str()
                            .or(s["backend"].as_str())
                            .unwrap_or("-")
                            .to_string(),
                    )
                };
                let source = s["request"]["source"]
                    .as_str()
                    .or(s["source"].as_str())
                    .unwrap_or("-");
                println!(
                    "{:<24} {:<9} {:<16} {}",
                    s["id"].as_str().unwrap_or("?"),
                    state,
                    place,
                    source
                );
            }
        }
        StreamsCmd::Get { id } => {
            let v = t.get(format!("{base}/v1/streams/{id}")).await?;
            return Target::print_json(&v);
        }
        StreamsCmd::Create {
            id,
            source,
            preset,
            policy,
            spec,
        } => {
            let body = spec_body(source, preset, policy, spec)?;
            let v = match t.scheduler {
                Some(s) => {
                    let mut b = body;
                    b["id"] = json!(id);
                    answer(
                        t.http
                            .post(format!("{s}/v1/streams"))
                            .json(&b)
                            .send()
                            .await?,
                    )
                    .await?
                }
                None => {
                    answer(
                        t.http
                            .put(format!("{base}/v1/streams/{id}"))
                            .json(&body)
                            .send()
                            .await?,
                    )
                    .await?
                }
            };
            if t.json {
                return Target::print_json(&v);
            }
            match t.scheduler {
                Some(s) => println!(
                    "{id}: {} on {} (play: {s}{})",
                    v["phase"].as_str().unwrap_or("?"),
                    v["node"].as_str().unwrap_or("-"),
                    v["playback"].as_str().unwrap_or("")
                ),
                None => println!(
                    "{id}: {} (play: {base}/live/{id}/master.m3u8)",
                    v["state"].as_str().unwrap_or("?")
                ),
            }
        }
        StreamsCmd::Delete { id } => {
            let r = t
                .http
                .delete(format!("{base}/v1/streams/{id}"))
                .send()
                .await?;
            let status = r.status();
            if !status.is_success() {
                answer(r).await?;
            }
            println!("{id}: deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn fleet(t: &Target<'_>, cmd: FleetCmd) -> Result<ExitCode> {
    let s = t.scheduler()?;
    match cmd {
        FleetCmd::Headroom => {
            let v = t.get(format!("{s}/v1/fleet/headroom")).await?;
            if t.json {
                return Target::print_json(&v);
            }
            println!("{:<24} {:>8}", "PRESET", "STREAMS");
            if let Some(p) = v["presets"].as_object() {
                for (name, h) in p {
                    println!(
                        "{:<24} {:>8}",
                        name,
                        h["streams"].as_u64().map_or("?".into(), |n| n.to_string())
                    );
                }
            }
        }
        FleetCmd::Leader => {
            let v = t.get(format!("{s}/v1/leader")).await?;
            if t.json {
                return Target::print_json(&v);
            }
            match v["leader"].as_object() {
                Some(l) => println!(
                    "{} leads at epoch {} ({})",
                    l["id"].as_str().unwrap_or("?"),
                    l["epoch"],
                    l["url"].as_str().unwrap_or("?")
                ),
                None => println!("no scheduler leads right now"),
            }
        }
        FleetCmd::Consolidate { max_moves } => {
            let url = format!("{s}/v1/fleet/consolidate?max_moves={max_moves}");
            let v = answer(t.http.post(url).send().await?).await?;
            return Target::print_json(&v);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `kilnctl capacity`: the daemon's capacity report (`GET /v1/capacity`).
pub(crate) async fn capacity(t: &Target<'_>) -> Result<ExitCode> {
    let v = t.get(format!("{}/v1/capacity", t.daemon)).await?;
    if t.json {
        return Target::print_json(&v);
    }
    let host = &v["host"];
    let line = |name: &str, dim: &str| {
        println!(
            "{name:<10} {:>8} of {:>8} booked, {:>8} free ({dim})",
            host["allocated"][dim], host["capacity"][dim], host["free"][dim]
        )
    };
    println!(
        "node {} ({} streams)",
        v["node_id"].as_str().unwrap_or("?"),
        v["streams"].as_array().map_or(0, Vec::len)
    );
    line("cpu", "cpu_millicores");
    line("memory", "memory_mib");
    let serving = &host["serving"];
    print!(
        "serving    {:>8} mc at {} requests/s, {} mc kept free",
        serving["millicores"], serving["requests_per_s"], serving["reserved_millicores"]
    );
    match serving["headroom_rps"].as_u64() {
        Some(n) => println!("; room for {n} requests/s more (calibrated)"),
        None => println!(),
    }
    for g in v["gpus"].as_array().map(Vec::as_slice).unwrap_or_default() {
        println!(
            "gpu {} {}: nvenc {} of {} fps, sessions {} of {}, vram {} of {} MiB",
            g["index"],
            g["model"].as_str().unwrap_or("?"),
            g["allocated"]["nvenc_fps"],
            g["capacity"]["nvenc_fps"],
            g["allocated"]["encoder_sessions"],
            g["capacity"]["encoder_sessions"],
            g["allocated"]["vram_mib"],
            g["capacity"]["vram_mib"],
        );
    }
    if let Some(h) = v["headroom"].as_object() {
        let fits: Vec<String> = h.iter().map(|(p, n)| format!("{p} {n}")).collect();
        println!("fits now: {}", fits.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}
