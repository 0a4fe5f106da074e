//! kilnctl: the command line for kiln: a kilnd daemon (`--server`: streams, VOD jobs, capacity) and a fleet's
//! scheduler (`--scheduler`: streams placed on the fleet, nodes, headroom, leader, consolidation).
//!
//! ```text
//! kilnctl [--json] [--server URL | --scheduler URL] streams list | get ID | delete ID
//! kilnctl [--server URL | --scheduler URL] streams create ID --source test: [--preset P] [--policy P] | --spec F
//! kilnctl [--json] [--server URL] capacity
//! kilnctl [--json] --scheduler URL fleet headroom | leader | consolidate [--max-moves N]
//! kilnctl completions bash|zsh|fish|elvish|powershell
//! kilnctl [--server URL] jobs submit INPUT [--preset P] [--priority N] [--no-dash] [--no-thumbnails] [--watch]
//! kilnctl [--server URL] jobs list
//! kilnctl [--server URL] jobs watch ID        # progress bar until the job ends; exit 1 unless done
//! kilnctl [--server URL] jobs cancel ID
//! kilnctl [--server URL] jobs delete ID       # a finished job: its record and outputs
//! kilnctl [--json] --scheduler URL nodes list
//! kilnctl --scheduler URL nodes drain ID [--evacuate] [--wait [--timeout S]]
//! kilnctl --scheduler URL nodes undrain ID
//! ```
//! `--token` / `KILN_TOKEN`: the fleet's API token (`--api-token-env` of kilnd and the schedulers).
//! `--json` prints the API's documents instead of tables.
//! `INPUT` is a path (made absolute, sent as `file://…`; it must be under the daemon's `--vod-input-dir`) or an
//! http(s) URL. Errors print the daemon's message and exit non-zero.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use kiln_model::vod::{JobOutputs, JobRequest, JobState, JobStatus};

#[derive(Debug, Parser)]
#[command(name = "kilnctl", version, about = "Command line for kilnd")]
struct Args {
    /// The daemon's base URL.
    #[arg(long, env = "KILN_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// A scheduler's base URL: stream commands go there (placed on the fleet) instead of to --server; nodes and
    /// fleet commands need it.
    #[arg(long, env = "KILN_SCHEDULER")]
    scheduler: Option<String>,
    /// The API token (kilnd's and the schedulers' --api-token-env), sent as `Authorization: Bearer`.
    #[arg(long, env = "KILN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the API's JSON documents instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// VOD jobs (--server: a kilnd).
    Jobs {
        #[command(subcommand)]
        cmd: JobsCmd,
    },
    /// The fleet's nodes (--scheduler).
    Nodes {
        #[command(subcommand)]
        cmd: nodes::NodesCmd,
    },
    /// Live streams: on the daemon (--server), or placed on the fleet (--scheduler).
    Streams {
        #[command(subcommand)]
        cmd: fleet::StreamsCmd,
    },
    /// The fleet (--scheduler): headroom, leader, consolidation.
    Fleet {
        #[command(subcommand)]
        cmd: fleet::FleetCmd,
    },
    /// The daemon's capacity report: what it has, what is booked, what fits (--server).
    Capacity,
    /// Shell completions for kilnctl on stdout (e.g. `kilnctl completions bash > /etc/bash_completion.d/kilnctl`).
    Completions { shell: clap_complete::Shell },
}

mod fleet;
mod nodes;

#[derive(Debug, Subcommand)]
enum JobsCmd {
    /// Queue a transcode of INPUT (a file path or an http(s) URL).
    Submit {
        input: String,
        #[arg(long)]
        preset: Option<String>,
        #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
        priority: i32,
        #[arg(long)]
        no_dash: bool,
        #[arg(long)]
        no_thumbnails: bool,
        /// Seconds between thumbnails.
        #[arg(long)]
        thumbnail_interval: Option<u32>,
        /// Follow the job with a progress bar until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// Every job, newest first.
    List,
    /// Progress bar until the job ends (exit status 1 unless it is done).
    Watch { id: String },
    /// One job's document.
    Get { id: String },
    /// Cancel a queued or running job.
    Cancel { id: String },
    /// Delete a finished job and its outputs.
    Delete { id: String },
}

/// Runs the command line; the process's exit code.
pub fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kilnctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kilnctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn answer(r: reqwest::Response) -> Result<serde_json::Value> {
    let status = r.status();
    let body: serde_json::Value = r.json().await.unwrap_or(serde_json::Value::Null);
    if !status.is_success() {
        let msg = body["error"]["message"].as_str().unwrap_or("no message");
        bail!("{status}: {msg}");
    }
    Ok(body)
}

// Long by design: one match arm per subcommand.
async fn run(args: Args) -> Result<ExitCode> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = &args.token {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
            .context("the token is not a valid header value")?;
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .default_headers(headers)
        .build()?;
    let base = args.server.trim_end_matches('/').to_string();
    let scheduler = args.scheduler.as_deref().map(|s| s.trim_end_matches('/'));
    let target = fleet::Target {
        http: &http,
        daemon: &base,
        scheduler,
        json: args.json,
    };
    let cmd = match args.cmd {
        Cmd::Jobs { cmd } => cmd,
        Cmd::Nodes { cmd } => {
            let s = scheduler.context(
                "nodes commands talk to a scheduler: give --scheduler URL (or KILN_SCHEDULER)",
            )?;
            return nodes::run(&http, s, cmd, args.json).await;
        }
        Cmd::Streams { cmd } => return fleet::streams(&target, cmd).await,
        Cmd::Fleet { cmd } => return fleet::fleet(&target, cmd).await,
        Cmd::Capacity => return fleet::capacity(&target).await,
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Args::command(),
                "kilnctl",
                &mut std::io::stdout(),
            );
            return Ok(ExitCode::SUCCESS);
        }
    };
    match cmd {
        JobsCmd::Submit {
            input,
            preset,
            priority,
            no_dash,
            no_thumbnails,
            thumbnail_interval,
            watch,
        } => {
            // a URL goes as it is (the daemon judges it); a path is made absolute
            let input = if input.contains("://") {
                input
            } else {
                let p =
                    std::path::absolute(&input).with_context(|| format!("resolving {input}"))?;
                format!("file://{}", p.display())
            };
            let req = JobRequest {
                input,
                preset,
                renditions: None,
                priority,
                outputs: JobOutputs {
                    dash: !no_dash,
                    thumbnails: !no_thumbnails,
                },
                thumbnail_interval_s: thumbnail_interval,
                x264_speed: None,
            };
            let v = answer(
                http.post(format!("{base}/v1/jobs"))
                    .json(&req)
                    .send()
                    .await?,
            )
            .await?;
            let id = v["id"]
                .as_str()
                .context("the daemon answered without an id")?
                .to_string();
            println!("{id}");
            if watch {
                return follow(&http, &base, &id).await;
            }
        }
        JobsCmd::List => {
            let v = answer(http.get(format!("{base}/v1/jobs")).send().await?).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            let jobs: Vec<JobStatus> = serde_json::from_value(v)?;
            println!(
                "{:<22} {:<9} {:>6} {:>7} {:>4}  INPUT",
                "ID", "STATE", "DONE", "SPEED", "PRIO"
            );
            for j in jobs {
                println!(
                    "{:<22} {:<9} {:>5.1}% {:>7} {:>4}  {}{}",
                    j.id,
                    format!("{:?}", j.state).to_lowercase(),
                    j.progress * 100.0,
                    j.speed.map_or("-".into(), |s| format!("{s:.2}x")),
                    j.priority,
                    j.request.input,
                    j.error.map(|e| format!("  ({e})")).unwrap_or_default()
                );
            }
        }
        JobsCmd::Watch { id } => return follow(&http, &base, &id).await,
        JobsCmd::Get { id } => {
            let v = answer(http.get(format!("{base}/v1/jobs/{id}")).send().await?).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        JobsCmd::Cancel { id } => {
            let v = answer(http.delete(format!("{base}/v1/jobs/{id}")).send().await?).await?;
            println!("{id}: {}", v["state"].as_str().unwrap_or("?"));
        }
        JobsCmd::Delete { id } => {
            answer(
                http.delete(format!("{base}/v1/jobs/{id}?purge=true"))
                    .send()
                    .await?,
            )
            .await?;
            println!("{id}: deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A text progress bar on stderr until the job is final; prints the final state and links on stdout.
async fn follow(http: &reqwest::Client, base: &str, id: &str) -> Result<ExitCode> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_line = String::new();
    loop {
        let v = answer(http.get(format!("{base}/v1/jobs/{id}")).send().await?).await?;
        let j: JobStatus = serde_json::from_value(v)?;
        let width = 30;
        let filled = ((j.progress.clamp(0.0, 1.0)) * width as f64).round() as usize;
        // an http(s) input still arriving: the download, not the (not yet started) transcode
        let downloading =
            j.state == JobState::Running && j.duration_s.is_none() && j.input_bytes.is_some();
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        let line = if downloading {
            let got = j.input_bytes.unwrap_or(0);
            format!(
                "downloading {:.1} MiB{}",
                mib(got),
                j.input_total_bytes
                    .map_or(String::new(), |t| format!(" of {:.1} MiB", mib(t))),
            )
        } else {
            format!(
                "[{}{}] {:>5.1}% {:<9} {} {}",
                "#".repeat(filled),
                " ".repeat(width - filled),
                j.progress * 100.0,
                format!("{:?}", j.state).to_lowercase(),
                j.speed.map_or(String::new(), |s| format!("{s:.2}x")),
                j.eta_s.map_or(String::new(), |e| format!("eta {e:.0}s")),
            )
        };
        if line != last_line {
            if tty {
                eprint!("\r{line}\x1b[K");
            } else {
                eprintln!("{line}");
            }
            let _ = std::io::stderr().flush();
            last_line = line;
        }
        if j.state.is_final() {
            if tty {
                eprintln!();
            }
            println!("{id}: {}", format!("{:?}", j.state).to_lowercase());
            if let Some(e) = &j.error {
                println!("error: {e}");
            }
            for l in [
                &j.links.master,
                &j.links.mpd,
                &j.links.poster,
                &j.links.sprite,
                &j.links.thumbnails_vtt,
            ]
            .into_iter()
            .flatten()
            {
                println!("{base}{l}");
            }
            return Ok(if j.state == JobState::Done {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
