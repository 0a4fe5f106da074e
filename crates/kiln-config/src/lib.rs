//! kiln-config: typed, validated loading of kiln's named presets and resolution of stream requests into plans.
//!
//! Presets are the ladders in `pipelines/*.toml` (renditions, timing, encoder settings). They are compiled into
//! the binary so a daemon works with no files around it, and can be replaced by a directory at start-up. Every
//! preset is validated once, when loaded, by building a [`kiln_model::StreamPlan`] from it; all errors are
//! collected, not just the first.

use std::collections::BTreeMap;
use std::path::Path;

use kiln_model::{
    AudioRendition, EncoderSettings, Passthrough, PlanError, RenditionSpec, StreamPlan,
    StreamRequest, Timing, VideoRendition,
};
use serde::Deserialize;

/// The preset used when a request names none.
pub const DEFAULT_PRESET: &str = "live-720p-abr";

/// Presets shipped with kiln (`pipelines/`), embedded at compile time.
const BUILTIN: &[(&str, &str)] = &[
    (
        "live-720p-abr.toml",
        include_str!("../../../pipelines/live-720p-abr.toml"),
    ),
    (
        "live-1080p-abr.toml",
        include_str!("../../../pipelines/live-1080p-abr.toml"),
    ),
    (
        "live-360p-abr.toml",
        include_str!("../../../pipelines/live-360p-abr.toml"),
    ),
    (
        "live-audio-only.toml",
        include_str!("../../../pipelines/live-audio-only.toml"),
    ),
    (
        "vod-1080p-abr.toml",
        include_str!("../../../pipelines/vod-1080p-abr.toml"),
    ),
];

/// The CPU cost model shipped in `hw-profiles/cpu-x86_64.toml`.
const CPU_PROFILE: &str = include_str!("../../../hw-profiles/cpu-x86_64.toml");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CpuProfileFile {
    #[allow(dead_code)]
    name: String,
    #[serde(flatten)]
    model: kiln_model::capacity::CpuCostModel,
}

/// Parses and validates a CPU cost profile: every figure positive, x264 costs non-decreasing from ultrafast to
/// medium.
pub fn parse_cpu_profile(text: &str) -> Result<kiln_model::capacity::CpuCostModel, ConfigError> {
    let file: CpuProfileFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
        file: "cpu profile".into(),
        msg: e.to_string(),
    })?;
    let m = file.model;
    let bad = |msg: &str| {
        Err(ConfigError::Parse {
            file: "cpu profile".into(),
            msg: msg.into(),
        })
    };
    if m.stream_base_millicores == 0
        || m.source_millicores_per_mpx <= 0.0
        || m.memory_mib_per_mpx <= 0.0
    {
        return bad("every cost must be positive");
    }
    if m.x264_millicores_per_mpx
        .iter()
        .any(|c| !(*c > 0.0 && c.is_finite()))
        || m.x264_millicores_per_mpx.windows(2).any(|w| w[1] < w[0])
    {
        return bad("x264 costs must be positive and non-decreasing from ultrafast to medium");
    }
    Ok(m)
}

/// The built-in CPU cost model.
pub fn builtin_cpu_profile() -> kiln_model::capacity::CpuCostModel {
    parse_cpu_profile(CPU_PROFILE).expect("the shipped CPU profile is valid (tested)")
}

/// The GPU profiles kiln ships (`hw-profiles/<name>.toml`), embedded so a bare binary knows them.
const GPU_PROFILES: [(&str, &str); 11] = [
    ("t4", include_str!("../../../hw-profiles/t4.toml")),
    ("a10", include_str!("../../../hw-profiles/a10.toml")),
    ("a16", include_str!("../../../hw-profiles/a16.toml")),
    ("l4", include_str!("../../../hw-profiles/l4.toml")),
    ("l40s", include_str!("../../../hw-profiles/l40s.toml")),
    ("a100", include_str!("../../../hw-profiles/a100.toml")),
    ("h100", include_str!("../../../hw-profiles/h100.toml")),
    ("h200", include_str!("../../../hw-profiles/h200.toml")),
    ("b200", include_str!("../../../hw-profiles/b200.toml")),
    (
        "rtx-4090",
        include_str!("../../../hw-profiles/rtx-4090.toml"),
    ),
    (
        "rtx-4000-ada",
        include_str!("../../../hw-profiles/rtx-4000-ada.toml"),
    ),
];

/// Parses and validates a GPU profile (`file` names it in errors): known fields only, every figure sourced,
/// engine counts consistent with codecs and throughput.
pub fn parse_gpu_profile(
    file: &str,
    text: &str,
) -> Result<kiln_model::capacity::GpuProfile, ConfigError> {
    let p: kiln_model::capacity::GpuProfile =
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.into(),
            msg: e.to_string(),
        })?;
    let problems = p.problems();
    if !problems.is_empty() {
        return Err(ConfigError::Parse {
            file: file.into(),
            msg: problems.join("; "),
        });
    }
    Ok(p)
}

/// The shipped GPU profile named `name` (a `hw-profiles/` file stem).
pub fn builtin_gpu_profile(name: &str) -> Option<kiln_model::capacity::GpuProfile> {
    GPU_PROFILES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, t)| parse_gpu_profile(n, t).expect("shipped GPU profiles are valid (tested)"))
}

/// Names of the shipped GPU profiles.
pub fn builtin_gpu_profile_names() -> impl Iterator<Item = &'static str> {
    GPU_PROFILES.iter().map(|(n, _)| *n)
}

/// A named ladder.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "default_segment_ms")]
    pub segment_ms: u32,
    #[serde(default = "default_part_ms")]
    pub part_target_ms: u32,
    #[serde(default)]
    pub encoder: EncoderSettings,
    #[serde(default)]
    pub video: Vec<VideoRendition>,
    #[serde(default)]
    pub audio: Option<AudioRendition>,
}

fn default_segment_ms() -> u32 {
    Timing::default().segment_ms
}
fn default_part_ms() -> u32 {
    Timing::default().part_target_ms
}

impl Preset {
    pub fn timing(&self) -> Timing {
        Timing {
            segment_ms: self.segment_ms,
            part_target_ms: self.part_target_ms,
        }
    }
}

/// Why presets could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {msg}")]
    Parse { file: String, msg: String },
    #[error("{file}: preset `{name}` is invalid: {err}")]
    Invalid {
        file: String,
        name: String,
        err: PlanError,
    },
    #[error("preset `{0}` is defined twice")]
    Duplicate(String),
    #[error("reading {path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("the default preset `{0}` is not defined")]
    NoDefault(String),
    #[error("{} preset errors:\n  {}", .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n  "))]
    Many(Vec<ConfigError>),
}

/// The presets a daemon knows.
#[derive(Debug, Clone)]
pub struct Presets {
    map: BTreeMap<String, Preset>,
    default: String,
}

impl Presets {
    /// The presets compiled into kiln.
    pub fn builtin() -> Self {
        Self::from_sources(
            BUILTIN.iter().map(|(f, s)| (f.to_string(), s.to_string())),
            DEFAULT_PRESET,
        )
        .expect("built-in presets are valid (tested)")
    }

    /// Loads every `*.toml` in `dir`.
    pub fn load_dir(dir: &Path, default: &str) -> Result<Self, ConfigError> {
        let io = |err| ConfigError::Io {
            path: dir.display().to_string(),
            err,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).map_err(|err| ConfigError::Io {
                    path: path.display().to_string(),
                    err,
                })?;
                files.push((path.display().to_string(), text));
            }
        }
        files.sort();
        Self::from_sources(files, default)
    }

    /// Parses and validates presets from `(file name, TOML text)` pairs, collecting every error.
    pub fn from_sources(
        files: impl IntoIterator<Item = (String, String)>,
        default: &str,
    ) -> Result<Self, ConfigError> {
        let mut map = BTreeMap::new();
        let mut errors = Vec::new();
        for (file, text) in files {
            let preset: Preset = match toml::from_str(&text) {
                Ok(p) => p,
                Err(e) => {
                    errors.push(ConfigError::Parse {
                        file,
                        msg: e.to_string(),
                    });
                    continue;
                }
            };
            if let Err(err) = StreamPlan::new(
                "preset-check",
                "test:",
                preset.video.clone(),
                preset.audio.clone(),
                preset.timing(),
                preset.encoder,
            ) {
                errors.push(ConfigError::Invalid {
                    file,
                    name: preset.name.clone(),
                    err,
                });
                continue;
            }
            if map.contains_key(&preset.name) {
                errors.push(ConfigError::Duplicate(preset.name.clone()));
                continue;
            }
            map.insert(preset.name.clone(), preset);
        }
        if !map.contains_key(default) {
            errors.push(ConfigError::NoDefault(default.to_string()));
        }
        match errors.len() {
            0 => Ok(Self {
                map,
                default: default.to_string(),
            }),
            1 => Err(errors.remove(0)),
            _ => Err(ConfigError::Many(errors)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Preset> {
        self.map.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    pub fn default_name(&self) -> &str {
        &self.default
    }

    /// Resolves a request into a validated plan: the named (or default) preset, overridden by whatever the
    /// request sets explicitly.
    pub fn resolve(&self, id: &str, req: &StreamRequest) -> Result<StreamPlan, PlanError> {
        let name = req.preset.as_deref().unwrap_or(&self.default);
        let preset = self
            .get(name)
            .ok_or_else(|| PlanError::UnknownPreset(name.chars().take(64).collect()))?;
        let (video, passthrough) = match &req.renditions {
            None => (preset.video.clone(), None),
            Some(r) => split_renditions(r)?,
        };
        let audio = match &req.audio {
            None => preset.audio.clone(),
            Some(a) if !a.enabled => None,
            Some(a) => {
                let mut base = preset.audio.clone().unwrap_or_default();
                if let Some(b) = a.bitrate_kbps {
                    base.bitrate_kbps = b;
                }
                Some(base)
            }
        };
        let timing = Timing {
            segment_ms: req.segment_ms.unwrap_or(preset.segment_ms),
            part_target_ms: req.part_target_ms.unwrap_or(preset.part_target_ms),
        };
        let mut encoder = preset.encoder;
        if let Some(p) = req.policy {
            encoder.policy = p;
        }
        StreamPlan::new(id, &req.source, video, audio, timing, encoder)?
            .with_backup(req.backup.as_ref())?
            .with_passthrough(passthrough)
    }
}

/// The encoded renditions of a request, and its passthrough rendition (at most one).
fn split_renditions(
    specs: &[RenditionSpec],
) -> Result<(Vec<VideoRendition>, Option<Passthrough>), PlanError> {
    let mut video = Vec::new();
    let mut passthrough: Option<Passthrough> = None;
    for s in specs {
        match s {
            RenditionSpec::Video(v) => video.push(v.clone()),
            RenditionSpec::Passthrough(p) if passthrough.is_some() => {
                return Err(PlanError::BadRendition {
                    name: p.name.clone(),
                    what: "a stream has at most one passthrough rendition".into(),
                })
            }
            RenditionSpec::Passthrough(p) => passthrough = Some(p.clone()),
        }
    }
    Ok((video, passthrough))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_model::{AudioRequest, Fraction};

    #[test]
    fn builtin_presets_load_and_resolve() {
        let p = Presets::builtin();
        assert_eq!(
            p.names().collect::<Vec<_>>(),
            [
                "live-1080p-abr",
                "live-360p-abr",
                "live-720p-abr",
                "live-audio-only",
                "vod-1080p-abr"
            ]
        );
        let radio = p
            .resolve(
                "radio",
                &StreamRequest {
                    source: "test:".into(),
                    preset: Some("live-audio-only".into()),
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(radio.video.is_empty() && radio.audio.is_some());
        let vod = p.get("vod-1080p-abr").unwrap();
        assert_eq!(
            (vod.video.len(), vod.segment_ms, vod.encoder.nvenc_preset),
            (4, 4000, 6)
        );
        let plan = p
            .resolve(
                "demo",
                &StreamRequest {
                    source: "test:".into(),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(plan.video.len(), 2);
        assert_eq!(plan.video[0].width, 1280);
        assert!(plan.audio.is_some());
        assert_eq!(plan.timing, Timing::default());
    }

    #[test]
    fn request_overrides_preset() {
        let p = Presets::builtin();
        let req = StreamRequest {
            source: "test:pattern=ball".into(),
            preset: Some("live-360p-abr".into()),
            renditions: Some(vec![VideoRendition {
                name: "tiny".into(),
                width: 160,
                height: 90,
                fps: Fraction::new(25, 1),
                bitrate_kbps: 100,
                codec: Default::default(),
            }
            .into()]),
            audio: Some(AudioRequest {
                enabled: false,
                bitrate_kbps: None,
            }),
            segment_ms: Some(1000),
            part_target_ms: Some(200),
            policy: Some(kiln_model::Policy::CpuOnly),
            ingest: None,
            on_source_loss: None,
            backup: None,
        };
        let plan = p.resolve("x", &req).unwrap();
        assert_eq!(plan.encoder.policy, kiln_model::Policy::CpuOnly);
        assert_eq!(plan.video[0].name, "tiny");
        assert!(plan.audio.is_none());
        assert_eq!(plan.timing.segment_ms, 1000);
        assert!(matches!(
            p.resolve(
                "x",
                &StreamRequest {
                    preset: Some("nope".into()),
                    source: "test:".into(),
                    ..Default::default()
                }
            ),
            Err(PlanError::UnknownPreset(_))
        ));
    }

    #[test]
    fn cpu_profile_loads_and_is_checked() {
        let m = builtin_cpu_profile();
        assert_eq!(m.stream_base_millicores, 40);
        let broken = CPU_PROFILE.replace("[4.0, 6.0, 11.0", "[4.0, 16.0, 11.0");
        assert!(parse_cpu_profile(&broken).is_err());
        assert!(parse_cpu_profile("name = 1").is_err());
    }

    #[test]
    fn all_errors_are_collected() {
        let files = vec![
            ("a.toml".to_string(), "name = 1".to_string()),
            (
                "b.toml".to_string(),
                "name = \"b\"\n[[video]]\nname=\"v\"\nwidth=3\nheight=2\nbitrate_kbps=100\n"
                    .to_string(),
            ),
        ];
        let err = Presets::from_sources(files, "b").unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, ConfigError::Many(ref v) if v.len() == 3),
            "{text}"
        );
        assert!(text.contains("a.toml") && text.contains("b.toml"), "{text}");
    }

    #[test]
    fn shipped_pipeline_files_match_builtin() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines");
        let loaded = Presets::load_dir(&dir, DEFAULT_PRESET).unwrap();
        assert_eq!(
            loaded.names().collect::<Vec<_>>(),
            Presets::builtin().names().collect::<Vec<_>>()
        );
    }

    #[test]
    fn shipped_gpu_profiles_are_valid_and_complete() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../hw-profiles");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".toml") && !n.starts_with("cpu-"))
            .map(|n| n.trim_end_matches(".toml").to_string())
            .collect();
        on_disk.sort();
        let mut builtin: Vec<&str> = builtin_gpu_profile_names().collect();
        builtin.sort();
        assert_eq!(on_disk, builtin, "every hw-profiles/*.toml is embedded");
        for n in builtin_gpu_profile_names() {
            let p = builtin_gpu_profile(n).unwrap();
            assert_eq!(p.name, n);
            let text = std::fs::read_to_string(dir.join(format!("{n}.toml"))).unwrap();
            assert_eq!(parse_gpu_profile(n, &text).unwrap(), p);
        }
        // the chips without NVENC say so
        for n in ["a100", "h100", "h200", "b200"] {
            assert!(!builtin_gpu_profile(n).unwrap().has_nvenc(), "{n}");
        }
        assert_eq!(
            builtin_gpu_profile("rtx-4090").unwrap().max_sessions,
            Some(8)
        );
        // a broken profile names its problem
        let h200 = std::fs::read_to_string(dir.join("h200.toml")).unwrap();
        let err = parse_gpu_profile("x", &h200.replace("nvenc_engines = 0", "nvenc_engines = 2"))
            .unwrap_err();
        assert!(err.to_string().contains("encode_codecs"), "{err}");
        assert!(parse_gpu_profile("x", &format!("{h200}\nbogus = 1")).is_err());
    }
}
