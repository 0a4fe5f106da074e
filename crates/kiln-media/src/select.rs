//! Element selection: which decoder, scaler and encoder a stream's pipeline uses, decided from the GStreamer
//! version and the factories the registry really has — never hard-coded to one host.
//!
//! The choice itself is a pure function of a [`Registry`] (a version and a set of factory names), so every
//! host shape is unit-tested here: a CPU-only host, a GPU without NVENC (A100/H100/H200: nvcodec registers
//! decoders only, DESIGN.md §9), a GPU with NVENC and CUDA filters (L4), several GPUs.
//!
//! nvcodec naming on GStreamer 1.22: the first GPU's elements are `nvh264dec`, `nvh264enc` (and the newer
//! `nvcudah264enc`); every further GPU gets `nvh264device{N}dec` / `nvcudah264device{N}enc`. `nvautogpuh264enc`
//! takes a writable `cuda-device-id`, so one factory serves every GPU. `cudaconvertscale` exists from
//! 1.22 (it needs NVRTC at run time; without it the CUDA filters do not register). AV1 on NVENC (`nvav1enc`) only
//! from 1.26.

use std::collections::BTreeSet;

use gst::prelude::*;

use kiln_model::{Backend, Policy, VideoCodec};

/// What the registry offers: the GStreamer version and the element factory names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Registry {
    pub version: (u32, u32),
    pub factories: BTreeSet<String>,
}

/// Codecs a source may carry (from the demuxer's caps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputCodec {
    H264,
    H265,
    Vp9,
    Av1,
    Mpeg2,
}

impl InputCodec {
    /// From the caps name of a parsed elementary stream (`video/x-h264`, …).
    pub fn from_caps_name(name: &str) -> Option<Self> {
        Some(match name {
            "video/x-h264" => Self::H264,
            "video/x-h265" => Self::H265,
            "video/x-vp9" => Self::Vp9,
            "video/x-av1" => Self::Av1,
            "video/mpeg" => Self::Mpeg2,
            _ => return None,
        })
    }

    /// The parser that puts the stream in the form its decoder asks for (`avc` → `byte-stream` for NVDEC's
    /// H.264/HEVC decoders, which refuse what `qtdemux` gives; a no-op where the decoder takes it as it is).
    pub fn parser(self) -> &'static str {
        match self {
            Self::H264 => "h264parse",
            Self::H265 => "h265parse",
            Self::Vp9 => "vp9parse",
            Self::Av1 => "av1parse",
            Self::Mpeg2 => "mpegvideoparse",
        }
    }

    fn nv_stem(self) -> &'static str {
        match self {
            Self::H264 => "h264",
            Self::H265 => "h265",
            Self::Vp9 => "vp9",
            Self::Av1 => "av1",
            Self::Mpeg2 => "mpeg2video",
        }
    }

    /// CPU decoders in preference order.
    fn cpu_decoders(self) -> &'static [&'static str] {
        match self {
            Self::H264 => &["avdec_h264", "openh264dec"],
            Self::H265 => &["avdec_h265", "libde265dec"],
            Self::Vp9 => &["vp9dec", "avdec_vp9"],
            Self::Av1 => &["dav1ddec", "av1dec", "avdec_av1"],
            Self::Mpeg2 => &["avdec_mpeg2video", "mpeg2dec"],
        }
    }
}

/// A chosen element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub factory: String,
    /// Set `cuda-device-id` to this GPU (the `nvautogpu*` elements).
    pub cuda_device_id: Option<u32>,
    /// Runs on a GPU (accepts or produces CUDA memory).
    pub gpu: bool,
}

impl Choice {
    fn cpu(f: &str) -> Self {
        Self {
            factory: f.to_string(),
            cuda_device_id: None,
            gpu: false,
        }
    }
}

/// How a stream's frames move: decoder (encoded sources), scaler per rendition, encoder per rendition, and
/// where frames cross between GPU and system memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub backend: Backend,
    /// Scaling on the GPU (`cudaconvertscale`): the tee carries CUDA memory.
    pub scaler: Choice,
    pub encoder: Choice,
    /// Upload raw system frames (test source, CPU decoder) before a CUDA scaler.
    pub upload: bool,
    /// Download after a CUDA scaler because the encoder is on the CPU.
    pub download: bool,
}

/// Why no pipeline can be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    #[error("no NVENC encoder for {codec} on GPU {gpu} in this GStreamer registry (nvcodec registers encoders only on GPUs with NVENC)")]
    NoNvenc { codec: &'static str, gpu: u32 },
    #[error("no CPU encoder for {0}: install {1}")]
    NoCpuEncoder(&'static str, &'static str),
    #[error("no decoder for {0:?}: install gstreamer1.0-libav")]
    NoDecoder(InputCodec),
    #[error("policy gpu-only cannot run here: {0}")]
    GpuOnlyImpossible(String),
}

fn at_least(v: (u32, u32), min: (u32, u32)) -> bool {
    v >= min
}

impl Registry {
    /// A registry from a version and names (tests, or a recorded host).
    pub fn from_names(version: (u32, u32), names: &[&str]) -> Self {
        Self {
            version,
            factories: names.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The running GStreamer's registry (element factories only).
    pub fn probe() -> Result<Self, crate::MediaError> {
        crate::init()?;
        let (maj, min, _, _) = gst::version();
        let factories =
            gst::ElementFactory::factories_with_type(gst::ElementFactoryType::ANY, gst::Rank::NONE)
                .into_iter()
                .map(|f| f.name().to_string())
                .collect();
        Ok(Self {
            version: (maj, min),
            factories,
        })
    }

    pub fn has(&self, f: &str) -> bool {
        self.factories.contains(f)
    }

    fn first<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
        names.into_iter().find(|n| self.has(n))
    }

    /// NVENC H.264 encoders for GPU `gpu`, in preference order (per-device factory names first; the
    /// `nvautogpu` element with a device id otherwise).
    fn nvenc_for(&self, codec: VideoCodec, gpu: u32) -> Option<Choice> {
        let stem = match codec {
            VideoCodec::H264 => "h264",
        };
        let per_device = if gpu == 0 {
            vec![format!("nvcuda{stem}enc"), format!("nv{stem}enc")]
        } else {
            vec![
                format!("nvcuda{stem}device{gpu}enc"),
                format!("nv{stem}device{gpu}enc"),
            ]
        };
        if let Some(f) = per_device.iter().find(|f| self.has(f)) {
            return Some(Choice {
                factory: f.clone(),
                cuda_device_id: None,
                gpu: true,
            });
        }
        // `nvautogpu*enc` serves any GPU through its writable `cuda-device-id`; the per-device factories are
        // preferred because their presence proves that GPU opened an NVENC session when the plugin loaded.
        let auto = format!("nvautogpu{stem}enc");
        if !self.has(&auto) {
            return None;
        }
        Some(Choice {
            factory: auto,
            cuda_device_id: Some(gpu),
            gpu: true,
        })
    }

    /// GPUs (NVML/CUDA indices) that have an NVENC encoder for `codec` in this registry.
    pub fn nvenc_gpus(&self, codec: VideoCodec, gpus: u32) -> Vec<u32> {
        (0..gpus)
            .filter(|g| {
                self.nvenc_for(codec, *g)
                    .is_some_and(|c| c.cuda_device_id.is_none())
            })
            .collect()
    }

    /// The scaler: CUDA when frames are (or can cheaply be) on the GPU and the CUDA filters registered.
    fn cuda_scaler(&self) -> Option<&'static str> {
        if at_least(self.version, (1, 22)) && self.has("cudaconvertscale") {
            Some("cudaconvertscale")
        } else {
            None
        }
    }

    fn cpu_scaler(&self) -> &'static str {
        if at_least(self.version, (1, 22)) && self.has("videoconvertscale") {
            "videoconvertscale"
        } else {
            "videoscale"
        }
    }

    /// The CPU encoder for `codec`.
    pub fn cpu_encoder(&self, codec: VideoCodec) -> Result<Choice, SelectError> {
        match codec {
            VideoCodec::H264 => {
                self.first(["x264enc"])
                    .map(Choice::cpu)
                    .ok_or(SelectError::NoCpuEncoder(
                        "H.264",
                        "gstreamer1.0-plugins-ugly",
                    ))
            }
        }
    }

    /// The encode path for `backend`. Frames from a test source start in system memory; from NVDEC they start on
    /// `decoded_on_gpu`.
    pub fn select(
        &self,
        codec: VideoCodec,
        backend: Backend,
        decoded_on_gpu: Option<u32>,
    ) -> Result<Selection, SelectError> {
        match backend {
            Backend::Nvenc { gpu } => {
                let encoder = self.nvenc_for(codec, gpu).ok_or(SelectError::NoNvenc {
                    codec: "H.264",
                    gpu,
                })?;
                let (scaler, upload) = match self.cuda_scaler() {
                    Some(s) => (
                        Choice {
                            factory: s.into(),
                            cuda_device_id: None,
                            gpu: true,
                        },
                        decoded_on_gpu.is_none() && self.has("cudaupload"),
                    ),
                    None => (Choice::cpu(self.cpu_scaler()), false),
                };
                // without cudaupload a CUDA scaler cannot take system frames: scale on the CPU instead
                let scaler = if scaler.gpu && decoded_on_gpu.is_none() && !upload {
                    Choice::cpu(self.cpu_scaler())
                } else {
                    scaler
                };
                Ok(Selection {
                    backend,
                    scaler,
                    encoder,
                    upload,
                    download: false,
                })
            }
            Backend::Cpu => {
                let encoder = self.cpu_encoder(codec)?;
                // Decoded on the GPU and CUDA filters present: scale there, download the small pictures.
                let gpu_scale = decoded_on_gpu.is_some()
                    && self.cuda_scaler().is_some()
                    && self.has("cudadownload");
                let scaler = if gpu_scale {
                    Choice {
                        factory: "cudaconvertscale".into(),
                        cuda_device_id: None,
                        gpu: true,
                    }
                } else {
                    Choice::cpu(self.cpu_scaler())
                };
                Ok(Selection {
                    backend,
                    scaler,
                    encoder,
                    upload: false,
                    download: gpu_scale,
                })
            }
        }
    }

    /// The decoder for an encoded source: NVDEC on `gpu` when allowed and registered, else the CPU.
    pub fn decoder(&self, codec: InputCodec, gpu: Option<u32>) -> Result<Choice, SelectError> {
        if let Some(g) = gpu {
            let stem = codec.nv_stem();
            let name = if g == 0 {
                format!("nv{stem}dec")
            } else {
                format!("nv{stem}device{g}dec")
            };
            if self.has(&name) {
                return Ok(Choice {
                    factory: name,
                    cuda_device_id: None,
                    gpu: true,
                });
            }
        }
        self.first(codec.cpu_decoders().iter().copied())
            .map(Choice::cpu)
            .ok_or(SelectError::NoDecoder(codec))
    }

    /// Where a new stream encodes under `policy`, given the GPUs with NVENC that have room (best first).
    pub fn backend_for(
        &self,
        policy: Policy,
        codec: VideoCodec,
        gpus_with_room: &[u32],
    ) -> Result<Backend, SelectError> {
        let nvenc = gpus_with_room
            .iter()
            .copied()
            .find(|g| self.nvenc_for(codec, *g).is_some());
        match (policy, nvenc) {
            (Policy::CpuOnly, _) => Ok(Backend::Cpu),
            (_, Some(gpu)) => Ok(Backend::Nvenc { gpu }),
            (Policy::PreferGpu, None) => Ok(Backend::Cpu),
            (Policy::GpuOnly, None) => Err(SelectError::GpuOnlyImpossible(
                "no GPU on this node has an NVENC encoder with room".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &[&str] = &[
        "videotestsrc",
        "videoconvertscale",
        "videoscale",
        "x264enc",
        "avdec_h264",
        "avdec_h265",
    ];

    fn reg(version: (u32, u32), extra: &[&str]) -> Registry {
        let mut names: Vec<&str> = BASE.to_vec();
        names.extend_from_slice(extra);
        Registry::from_names(version, &names)
    }

    /// The H200 as measured (DESIGN.md §9): NVDEC decoders, cudaupload/download, no encoder, no CUDA filters.
    fn h200() -> Registry {
        reg(
            (1, 22),
            &[
                "cudaupload",
                "cudadownload",
                "nvh264dec",
                "nvh265dec",
                "nvvp9dec",
                "nvh264sldec",
            ],
        )
    }

    /// An L4 host with CUDA filters (NVRTC found).
    fn l4() -> Registry {
        reg(
            (1, 22),
            &[
                "cudaupload",
                "cudadownload",
                "cudaconvertscale",
                "nvh264dec",
                "nvh264enc",
                "nvcudah264enc",
                "nvautogpuh264enc",
            ],
        )
    }

    #[test]
    fn cpu_only_host() {
        let r = reg((1, 22), &[]);
        assert_eq!(r.nvenc_gpus(VideoCodec::H264, 0), Vec::<u32>::new());
        let s = r.select(VideoCodec::H264, Backend::Cpu, None).unwrap();
        assert_eq!(
            (
                s.scaler.factory.as_str(),
                s.encoder.factory.as_str(),
                s.upload,
                s.download
            ),
            ("videoconvertscale", "x264enc", false, false)
        );
        assert_eq!(
            r.select(VideoCodec::H264, Backend::Nvenc { gpu: 0 }, None),
            Err(SelectError::NoNvenc {
                codec: "H.264",
                gpu: 0
            })
        );
        assert_eq!(
            r.decoder(InputCodec::H264, Some(0)).unwrap().factory,
            "avdec_h264"
        );
        assert_eq!(
            r.decoder(InputCodec::Vp9, None),
            Err(SelectError::NoDecoder(InputCodec::Vp9))
        );
        // 1.20 has no videoconvertscale
        let old = Registry::from_names((1, 20), &["videoscale", "x264enc"]);
        assert_eq!(
            old.select(VideoCodec::H264, Backend::Cpu, None)
                .unwrap()
                .scaler
                .factory,
            "videoscale"
        );
    }

    #[test]
    fn gpu_without_nvenc_decodes_on_nvdec_and_encodes_on_the_cpu() {
        let r = h200();
        assert!(r.nvenc_gpus(VideoCodec::H264, 1).is_empty());
        let dec = r.decoder(InputCodec::H264, Some(0)).unwrap();
        assert_eq!((dec.factory.as_str(), dec.gpu), ("nvh264dec", true));
        // no CUDA scaler registered: NVDEC hands system memory to the CPU scaler
        let s = r.select(VideoCodec::H264, Backend::Cpu, Some(0)).unwrap();
        assert_eq!(
            (
                s.scaler.factory.as_str(),
                s.encoder.factory.as_str(),
                s.download
            ),
            ("videoconvertscale", "x264enc", false)
        );
        // once NVRTC is found the scaling moves to the GPU and only small pictures come down
        let mut with_filters = r.clone();
        with_filters.factories.insert("cudaconvertscale".into());
        let s = with_filters
            .select(VideoCodec::H264, Backend::Cpu, Some(0))
            .unwrap();
        assert!(s.scaler.gpu && s.download && !s.upload);
        // the policy matrix on this GPU
        assert_eq!(
            r.backend_for(Policy::PreferGpu, VideoCodec::H264, &[0]),
            Ok(Backend::Cpu)
        );
        assert!(matches!(
            r.backend_for(Policy::GpuOnly, VideoCodec::H264, &[0]),
            Err(SelectError::GpuOnlyImpossible(_))
        ));
        assert_eq!(
            r.backend_for(Policy::CpuOnly, VideoCodec::H264, &[0]),
            Ok(Backend::Cpu)
        );
    }

    #[test]
    fn nvenc_gpu_keeps_frames_in_cuda_memory() {
        let r = l4();
        assert_eq!(r.nvenc_gpus(VideoCodec::H264, 1), vec![0]);
        let s = r
            .select(VideoCodec::H264, Backend::Nvenc { gpu: 0 }, Some(0))
            .unwrap();
        assert_eq!(s.encoder.factory, "nvcudah264enc");
        assert!(s.scaler.gpu && !s.upload && !s.download, "{s:?}");
        // a test source is uploaded once, before the tee
        let s = r
            .select(VideoCodec::H264, Backend::Nvenc { gpu: 0 }, None)
            .unwrap();
        assert!(s.upload && s.scaler.gpu);
        // without CUDA filters the encoder takes system memory
        let mut plain = r.clone();
        plain.factories.remove("cudaconvertscale");
        let s = plain
            .select(VideoCodec::H264, Backend::Nvenc { gpu: 0 }, None)
            .unwrap();
        assert!(!s.scaler.gpu && !s.upload && s.encoder.gpu);
        assert_eq!(
            r.backend_for(Policy::GpuOnly, VideoCodec::H264, &[0]),
            Ok(Backend::Nvenc { gpu: 0 })
        );
        assert_eq!(
            r.backend_for(Policy::CpuOnly, VideoCodec::H264, &[0]),
            Ok(Backend::Cpu)
        );
        // a full GPU (not in the list with room) spills prefer-gpu to the CPU
        assert_eq!(
            r.backend_for(Policy::PreferGpu, VideoCodec::H264, &[]),
            Ok(Backend::Cpu)
        );
    }

    #[test]
    fn several_gpus_use_per_device_elements_or_the_auto_element_with_a_device_id() {
        let r = reg(
            (1, 22),
            &[
                "nvh264enc",
                "nvh264device1enc",
                "nvh264dec",
                "nvh264device1dec",
            ],
        );
        assert_eq!(r.nvenc_gpus(VideoCodec::H264, 3), vec![0, 1]);
        let s = r
            .select(VideoCodec::H264, Backend::Nvenc { gpu: 1 }, None)
            .unwrap();
        assert_eq!(s.encoder.factory, "nvh264device1enc");
        assert_eq!(
            r.decoder(InputCodec::H264, Some(1)).unwrap().factory,
            "nvh264device1dec"
        );
        // GPU 2 has no NVENC element; the next GPU with room is chosen
        assert_eq!(
            r.backend_for(Policy::GpuOnly, VideoCodec::H264, &[2, 1]),
            Ok(Backend::Nvenc { gpu: 1 })
        );
        // only the auto element: it serves a GPU by id (but does not prove which GPUs have NVENC)
        let auto = reg((1, 24), &["nvautogpuh264enc"]);
        let s = auto
            .select(VideoCodec::H264, Backend::Nvenc { gpu: 2 }, None)
            .unwrap();
        assert_eq!(
            (s.encoder.factory.as_str(), s.encoder.cuda_device_id),
            ("nvautogpuh264enc", Some(2))
        );
        assert!(auto.nvenc_gpus(VideoCodec::H264, 3).is_empty());
    }

    #[test]
    fn caps_names_map_to_codecs() {
        assert_eq!(
            InputCodec::from_caps_name("video/x-h264"),
            Some(InputCodec::H264)
        );
        assert_eq!(InputCodec::from_caps_name("video/x-theora"), None);
    }
}
