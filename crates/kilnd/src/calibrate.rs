//! `kilnd calibrate`: measure how many streams of a preset this host really sustains, and write a CPU cost profile
//! that makes admission advertise exactly that.
//!
//! The ramp adds live streams of the preset (test source, real pipelines, no HTTP): one per step up to 8, then an
//! eighth more per step, up to 1,024 ([`kiln_model::capacity::ramp_next`]). After a warm-up,
//! it measures over a window the process CPU and the media each stream published. A step passes while every
//! stream stays at real time (≥ 0.98 media seconds per wall second, allowing the one part a window can cut in
//! flight) and the process uses at most 80 % of the host's
//! cores — the rest is the budget for jitter, the origin and the OS. The sustainable count N is the stream count of
//! the last passing step. The shipped cost model is then scaled so that an empty node's headroom for the preset is N.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use kiln_model::capacity::{ramp_next, CpuCostModel, Resources, RAMP_MAX_STREAMS};
use kiln_model::StreamRequest;

use crate::{AppState, Config};

/// One ramp step.
#[derive(Debug, Clone)]
pub struct Step {
    pub streams: usize,
    pub cpu_millicores: u64,
    pub min_realtime_ratio: f64,
    pub passed: bool,
}

/// What the ramp found.
#[derive(Debug, Clone)]
pub struct Calibration {
    pub preset: String,
    pub cores: u64,
    pub steps: Vec<Step>,
    pub sustainable: usize,
    pub model: CpuCostModel,
    /// What serving was measured to cost ([`serving`]; its cost also goes in `model.serving`).
    pub serving: Option<ServingCalibration>,
}

fn cpu_ticks() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit(')').next()?.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// Runs the ramp for `preset`, measuring each step over `window` after `warmup`.
/// The default calibration source: a moving picture, so x264 has motion to code (the static SMPTE bars of
/// `test:` encode several times cheaper than real content and would make the profile over-promise).
pub const DEFAULT_SOURCE: &str = "test:pattern=ball";

/// Runs the ramp for `preset` with streams from `source` (a test pattern, or a `file://` clip of the real
/// workload under the config's media directory), measuring each step over `window` after `warmup`.
// Long by design: the ramp is one loop (add a stream, measure a window, decide) that reads top to bottom.
pub async fn run(
    mut config: Config,
    preset: &str,
    source: &str,
    warmup: Duration,
    window: Duration,
) -> anyhow::Result<Calibration> {
    ensure!(
        config.presets.get(preset).is_some(),
        "unknown preset `{preset}`"
    );
    let base_model = config.cpu_model.clone();
    // the CPU's profile is measured on the CPU alone: with a GPU booked first, the ramp's first streams would be
    // NVENC's (and every decode NVDEC's), and the x264 model scaled from that count would promise the GPU's
    // share on an empty node
    config.gpus = Some(Vec::new());
    let node = config.capacity;
    // the ramp itself must not be stopped by admission
    config.capacity = Resources {
        cpu_millicores: u64::MAX / 4,
        memory_mib: u64::MAX / 4,
        ..Default::default()
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let state = AppState::new(config)?;
    let sup = state.supervisor.clone();
    let mut steps = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    let part_target_ms = config_part_target(&state, preset);
    let mut renditions: Vec<String> = Vec::new();
    let mut n = 0usize;
    while n < RAMP_MAX_STREAMS {
        let next = ramp_next(n);
        for i in n + 1..=next {
            let id = format!("calibrate-{i}");
            let req = StreamRequest {
                source: source.into(),
                preset: Some(preset.to_string()),
                policy: Some(kiln_model::Policy::CpuOnly),
                ..Default::default()
            };
            let (h, _) = sup
                .create(&id, req)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            ids.push(id);
            renditions = h
                .origin
                .renditions
                .iter()
                .map(|r| r.info.name.clone())
                .collect();
        }
        n = next;
        let renditions = &renditions;
        tokio::time::sleep(warmup).await;
        let media = |id: &str| -> f64 {
            renditions
                .iter()
                .map(|r| {
                    state
                        .metrics
                        .media_seconds
                        .with_label_values(&[id, r.as_str()])
                        .get()
                })
                .fold(f64::MAX, f64::min)
        };
        let before: Vec<f64> = ids.iter().map(|i| media(i)).collect();
        let (t0, c0) = (Instant::now(), cpu_ticks());
        tokio::time::sleep(window).await;
        let wall = t0.elapsed().as_secs_f64();
        let cpu = ((cpu_ticks() - c0) as f64 * 10.0 / wall) as u64;
        let ratio = ids
            .iter()
            .zip(&before)
            .map(|(i, b)| (media(i) - b) / wall)
            .fold(f64::MAX, f64::min);
        // Media advances a whole part at a time, so a window can miss up to one part that is on its way:
        // a stream keeps real time when one part of slack brings it to 0.98.
        let slack = f64::from(part_target_ms) / 1000.0 / wall;
        let passed = ratio + slack >= 0.98 && cpu as f64 <= 0.8 * cores as f64 * 1000.0;
        tracing::info!(
            streams = n,
            cpu_millicores = cpu,
            min_realtime_ratio = ratio,
            passed,
            "calibration step"
        );
        steps.push(Step {
            streams: n,
            cpu_millicores: cpu,
            min_realtime_ratio: ratio,
            passed,
        });
        if !passed {
            break;
        }
    }
    sup.shutdown().await;
    // the streams of the last step that passed (the steps grow: `ramp_next`)
    let sustainable = steps
        .iter()
        .take_while(|s| s.passed)
        .last()
        .map_or(0, |s| s.streams);
    if steps.last().is_some_and(|s| s.passed) {
        tracing::warn!(
            streams = sustainable,
            "the ramp reached its cap with every stream at real time: this host sustains at least that many"
        );
    }
    ensure!(
        sustainable > 0,
        "not even one `{preset}` stream keeps real time on this host"
    );
    // Scale the model so that an empty node's headroom for the preset is exactly `sustainable`.
    let plan = state
        .config
        .presets
        .resolve(
            "calibrate",
            &StreamRequest {
                source: "test:".into(),
                preset: Some(preset.to_string()),
                ..Default::default()
            },
        )
        .context("resolving the preset")?;
    let current = base_model.demand(&plan).cpu_millicores as f64;
    let target = node.cpu_millicores as f64 / (sustainable as f64 + 0.5);
    let k = target / current;
    let mut model = base_model;
    model.stream_base_millicores =
        (model.stream_base_millicores as f64 * k).round().max(1.0) as u64;
    model.source_millicores_per_mpx *= k;
    for c in &mut model.x264_millicores_per_mpx {
        *c *= k;
    }
    model.audio_millicores = (model.audio_millicores as f64 * k).round() as u64;
    Ok(Calibration {
        preset: preset.to_string(),
        cores,
        steps,
        sustainable,
        model,
        serving: None,
    })
}

/// PART-TARGET of the preset, in ms (the granularity at which media seconds advance).
fn config_part_target(state: &AppState, preset: &str) -> u32 {
    state
        .config
        .presets
        .get(preset)
        .map_or(334, |p| p.part_target_ms)
}

impl Calibration {
    /// The host profile file (`--cpu-profile`).
    pub fn to_toml(&self) -> String {
        let m = &self.model;
        let mut out = format!(
            "# Written by `kilnd calibrate --preset {}` on a {}-core host: {} sustainable stream(s).\n# step: streams, process millicores, slowest real-time ratio, passed\n",
            self.preset, self.cores, self.sustainable
        );
        for s in &self.steps {
            out.push_str(&format!(
                "#   {} streams: {} mc, ratio {:.3}, {}\n",
                s.streams,
                s.cpu_millicores,
                s.min_realtime_ratio,
                if s.passed {
                    "ok"
                } else {
                    "behind / over budget"
                }
            ));
        }
        out.push_str(&format!(
            "name = \"calibrated-{}\"\nstream_base_millicores = {}\nsource_millicores_per_mpx = {:.4}\nx264_millicores_per_mpx = [{}]\naudio_millicores = {}\nstream_base_memory_mib = {}\nmemory_mib_per_mpx = {:.4}\n",
            self.preset,
            m.stream_base_millicores,
            m.source_millicores_per_mpx,
            m.x264_millicores_per_mpx.iter().map(|c| format!("{c:.4}")).collect::<Vec<_>>().join(", "),
            m.audio_millicores,
            m.stream_base_memory_mib,
            m.memory_mib_per_mpx
        ));
        if let Some(c) = &m.serving {
            out.push_str(
                "# serving: kilnd's server answering its own origin on this host (busy millicores, requests/s, MB/s)\n",
            );
            if let Some(s) = &self.serving {
                for (name, r) in [("playlists + parts", s.small), ("segments", s.large)] {
                    out.push_str(&format!(
                        "#   {name}: {:.0} mc at {:.0} requests/s, {:.1} MB/s\n",
                        r.millicores,
                        r.rps,
                        r.bytes_per_s / 1e6
                    ));
                }
            }
            out.push_str(&format!(
                "[serving]\nmillicores_per_1k_rps = {:.4}\nmillicores_per_mbps = {:.6}\nsmall_answer_bytes = {}\n",
                c.millicores_per_1k_rps, c.millicores_per_mbps, c.small_answer_bytes
            ));
        }
        out
    }
}

/// The stream serving is measured on: one tiny rendition, so encoding takes little of the host beside the
/// server (its parts ~5 KB, as a low rung's are; its segments ~30 KB).
const SERVING_STREAM: &str = r#"{"source": "test:pattern=ball",
  "renditions": [{"name": "v", "width": 160, "height": 90, "fps": 30, "bitrate_kbps": 2400}],
  "audio": {"enabled": false}}"#;

/// Concurrent client connections while serving is measured.
const SERVING_CLIENTS: usize = 16;

/// What serving costs on this host ([`kiln_model::load::ServingCost`]): kilnd's real server on a loopback port
/// answers a live stream's playlists and parts (the small-answer mix), then its whole segments (the large one),
/// from a client on its own thread, while the server's busy time ([`kiln_http::server::serving_busy`]) and its
/// request and byte counters are read over each `window`. The server runs on this runtime, as in the daemon.
pub async fn serving(mut config: Config, window: Duration) -> anyhow::Result<ServingCalibration> {
    // the measuring stream must not be refused by admission
    config.capacity = Resources {
        cpu_millicores: u64::MAX / 4,
        memory_mib: u64::MAX / 4,
        ..Default::default()
    };
    let state = AppState::new(config)?;
    let req: StreamRequest = serde_json::from_str(SERVING_STREAM).expect("a valid stream spec");
    state
        .supervisor
        .create("calibrate-serving", req)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}/live/calibrate-serving/v", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::serve_state(state.clone(), listener, async {
        let _ = stopped.await;
    }));
    let measured = async {
        let small = measure_mix(&state, &base, Mix::Small, window).await?;
        let large = measure_mix(&state, &base, Mix::Large, window).await?;
        anyhow::Ok((small, large))
    }
    .await;
    let _ = stop.send(());
    server.await??;
    let (small, large) = measured?;
    let cost = kiln_model::load::ServingCost::fit(small, large).context(
        "the two mixes could not be told apart (segments not larger than parts?): no serving cost",
    )?;
    Ok(ServingCalibration { small, large, cost })
}

/// What [`serving`] measured.
#[derive(Debug, Clone)]
pub struct ServingCalibration {
    pub small: kiln_model::load::MixReading,
    pub large: kiln_model::load::MixReading,
    pub cost: kiln_model::load::ServingCost,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mix {
    /// A player's requests: the playlist, then its newest complete part, in turn.
    Small,
    /// The playlist, then its newest complete segment ten times.
    Large,
}

/// What the load client counts, shared with the thread that measures.
#[derive(Default)]
struct Tally {
    ok: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
    stop: std::sync::atomic::AtomicBool,
    /// Told at the first answer: the stream serves (its first segment can take seconds to appear).
    serving: tokio::sync::Notify,
}

/// Runs `mix` from [`SERVING_CLIENTS`] connections on a thread of its own; once the stream answers, waits a
/// second, then reads the server's counters over `window`.
async fn measure_mix(
    state: &AppState,
    base: &str,
    mix: Mix,
    window: Duration,
) -> anyhow::Result<kiln_model::load::MixReading> {
    use std::sync::atomic::Ordering::Relaxed;
    let tally = std::sync::Arc::new(Tally::default());
    let client = {
        let (base, tally) = (base.to_string(), tally.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(drive(&base, mix, &tally))
        })
    };
    let started = tokio::time::timeout(Duration::from_secs(60), tally.serving.notified()).await;
    let measured = async {
        ensure!(started.is_ok(), "the stream answered nothing for 60 s");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (b0, (r0, y0), t0) = (
            kiln_http::server::serving_busy(),
            state.metrics.http.totals(),
            Instant::now(),
        );
        tokio::time::sleep(window).await;
        let (b1, (r1, y1)) = (
            kiln_http::server::serving_busy(),
            state.metrics.http.totals(),
        );
        let wall = t0.elapsed().as_secs_f64();
        anyhow::Ok(kiln_model::load::MixReading {
            millicores: (b1 - b0).as_secs_f64() * 1000.0 / wall,
            rps: (r1 - r0) as f64 / wall,
            bytes_per_s: (y1 - y0) as f64 / wall,
        })
    }
    .await;
    tally.stop.store(true, Relaxed);
    // joined off the runtime: its last requests need this runtime's server to answer them
    tokio::task::spawn_blocking(move || client.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the load client panicked"))??;
    let reading = measured?;
    let (ok, failed) = (tally.ok.load(Relaxed), tally.failed.load(Relaxed));
    ensure!(
        failed * 100 <= ok + failed,
        "{failed} of the calibration's {} requests failed ({mix:?} mix)",
        ok + failed
    );
    tracing::info!(?mix, ?reading, "serving calibration mix");
    Ok(reading)
}

/// The load client: [`SERVING_CLIENTS`] loops of `mix` until told to stop, counting answers that were 200 and
/// those that were not or did not come (a transport error or the 10 s timeout).
async fn drive(base: &str, mix: Mix, tally: &Tally) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(SERVING_CLIENTS)
        .timeout(Duration::from_secs(10))
        .build()?;
    let get = |url: String| {
        let http = http.clone();
        async move {
            let answer = async {
                let res = http.get(url).send().await?.error_for_status()?;
                anyhow::Ok(res.bytes().await?)
            };
            match answer.await {
                Ok(body) => {
                    if tally.ok.fetch_add(1, Relaxed) == 0 {
                        tally.serving.notify_one();
                    }
                    Some(body)
                }
                Err(_) => {
                    tally.failed.fetch_add(1, Relaxed);
                    None
                }
            }
        }
    };
    let one = || async {
        while !tally.stop.load(Relaxed) {
            let Some(playlist) = get(format!("{base}/index.m3u8")).await else {
                continue;
            };
            let text = String::from_utf8_lossy(&playlist);
            let (uri, times) = match mix {
                Mix::Small => (newest(&text, "#EXT-X-PART:"), 1),
                Mix::Large => (newest(&text, ""), 10),
            };
            let Some(uri) = uri else { continue };
            for _ in 0..times {
                get(format!("{base}/{uri}")).await;
            }
        }
    };
    futures::future::join_all((0..SERVING_CLIENTS).map(|_| one())).await;
    Ok(())
}

/// The newest part (`tag` `#EXT-X-PART:`) or complete segment (`tag` empty: a URI line) a playlist lists.
fn newest(playlist: &str, tag: &str) -> Option<String> {
    let line = if tag.is_empty() {
        playlist
            .lines()
            .rfind(|l| !l.starts_with('#') && !l.is_empty())?
            .to_string()
    } else {
        let l = playlist.lines().rfind(|l| l.starts_with(tag))?;
        l.split("URI=\"").nth(1)?.split('"').next()?.to_string()
    };
    Some(line)
}
