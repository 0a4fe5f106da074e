//! `kilnd calibrate`: measure how many streams of a preset this host really sustains, and write a CPU cost profile
//! that makes admission advertise exactly that.
//!
//! The ramp adds one live stream of the preset at a time (test source, real pipelines, no HTTP). After a warm-up,
//! it measures over a window the process CPU and the media each stream published. A step passes while every
//! stream stays at real time (≥ 0.98 media seconds per wall second, allowing the one part a window can cut in
//! flight) and the process uses at most 80 % of the host's
//! cores — the rest is the budget for jitter, the origin and the OS. The sustainable count N is the last passing
//! step. The shipped cost model is then scaled so that an empty node's headroom for the preset is N.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use kiln_model::capacity::{CpuCostModel, Resources};
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
    for n in 1..=64usize {
        let id = format!("calibrate-{n}");
        let req = StreamRequest {
            source: source.into(),
            preset: Some(preset.to_string()),
            ..Default::default()
        };
        let (h, _) = sup
            .create(&id, req)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        ids.push(id);
        let renditions: Vec<String> = h
            .origin
            .renditions
            .iter()
            .map(|r| r.info.name.clone())
            .collect();
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
    let sustainable = steps.iter().take_while(|s| s.passed).count();
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
        out
    }
}
