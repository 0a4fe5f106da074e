//! Admission: what the host and its GPUs have booked, and where a stream runs (NVENC on a GPU with room, else
//! x264 on the CPU, NVDEC for encoded sources where a GPU has a decoder). Bookings are checked and added under
//! one lock, so admission never over-commits.

use std::path::PathBuf;

use kiln_media::select::SelectError;
use kiln_media::{BuildOptions, LivePipeline};
use kiln_model::capacity::{Dimension, Resources};
use kiln_model::load::ServingLoad;
use kiln_model::{Backend, Policy, Source, StreamPlan, VideoCodec};

use super::{tear_down, Placement, StreamHandle, Supervisor, SupervisorError};

impl Supervisor {
    /// Resources booked now.
    pub fn allocated(&self) -> Resources {
        *self.allocated.lock()
    }

    /// The node's schedulable capacity.
    pub fn capacity(&self) -> Resources {
        self.config.capacity
    }

    /// What serving viewers costs now, and what admission keeps free for it; with a profile calibrated for
    /// serving, also what the calibrated costs make of it and the requests/s the free CPU could still answer.
    pub fn serving(&self) -> ServingLoad {
        let load = self.serving.lock().load();
        match &self.config.cpu_model.serving {
            Some(cost) => {
                let free = self.free_with(&load).cpu_millicores;
                load.with_cost(cost, free)
            }
            None => load,
        }
    }

    /// One reading of the serving counters (see [`crate::load`]), and of every stream's media published.
    pub fn sample_load(&self, at_s: f64, busy_s: f64, requests: u64, bytes: u64) {
        self.serving.lock().sample(at_s, busy_s, requests, bytes);
        for h in self.list() {
            h.sample_realtime(at_s);
        }
    }

    /// The CPU kept free for serving: the serving peak above [`crate::load::SERVING_FLOOR_MILLICORES`].
    pub fn serving_reserve(&self) -> Resources {
        reserve_of(&self.serving())
    }

    /// What admission may still book: capacity less bookings less the serving reservation of `serving`.
    pub fn free_with(&self, serving: &ServingLoad) -> Resources {
        self.config
            .capacity
            .minus(&self.allocated())
            .minus(&reserve_of(serving))
    }

    /// [`Self::free_with`] the current serving load.
    pub fn free(&self) -> Resources {
        self.free_with(&self.serving())
    }

    /// Books `demand` on the host if it fits; never over-commits (check and add under one lock). The CPU that
    /// serving viewers takes now is not bookable ([`Self::serving_reserve`]).
    pub(super) fn reserve(&self, demand: &Resources) -> Result<(), SupervisorError> {
        self.reserve_keeping(demand, self.serving_reserve())
    }

    /// Books `demand` if it fits beside what is booked and `kept` (kept free).
    fn reserve_keeping(
        &self,
        demand: &Resources,
        serving: Resources,
    ) -> Result<(), SupervisorError> {
        let mut alloc = self.allocated.lock();
        let free = self.config.capacity.minus(&alloc).minus(&serving);
        if let Some(dimension) = free.short_dimension(demand) {
            return Err(SupervisorError::Capacity {
                dimension,
                requested: demand.get(dimension),
                free: free.get(dimension),
            });
        }
        *alloc = alloc.plus(demand);
        Ok(())
    }

    /// Books host resources for work that is not a stream (a VOD job); `false` when they do not fit.
    pub fn try_book(&self, demand: &Resources) -> bool {
        self.reserve(demand).is_ok()
    }

    /// Gives back what [`Self::try_book`] booked.
    pub fn unbook(&self, demand: &Resources) {
        self.release(demand);
    }

    pub(super) fn release(&self, demand: &Resources) {
        let mut alloc = self.allocated.lock();
        *alloc = alloc.minus(demand);
    }

    /// Releases what a stream has booked, once: its placement keeps the backend but books nothing afterwards.
    pub(super) fn release_all(&self, h: &StreamHandle) {
        self.release_placement(&Self::take_bookings(h));
    }

    /// Takes what `h` has booked out of its placement (host and GPU; the placement still says where it ran).
    pub(super) fn take_bookings(h: &StreamHandle) -> Placement {
        let mut p = h.placement.lock();
        let booked = *p;
        p.host = Resources::default();
        p.gpu = None;
        booked
    }

    /// Tears `h`'s pipeline `p` down ([`tear_down`]). When that is stuck, what `h` booked is taken out of its
    /// placement and kept booked until the teardown returns (see [`Self::reap_teardowns`]), so a later
    /// [`Self::release_all`] frees nothing a stuck pipeline may still use.
    pub(super) async fn tear_down_booked(&self, h: &StreamHandle, p: LivePipeline) {
        if let Some(stuck) = tear_down(p).await {
            self.hold_until_torn_down(stuck, Self::take_bookings(h));
        }
    }

    /// Keeps `booked` until the stuck teardown `stuck` returns.
    pub(super) fn hold_until_torn_down(
        &self,
        stuck: tokio::task::JoinHandle<()>,
        booked: Placement,
    ) {
        self.stuck.lock().push((stuck, booked));
    }

    /// Releases the bookings of stuck teardowns that have returned since (the load sampler calls this every
    /// second). Returns how many are still stuck.
    pub fn reap_teardowns(&self) -> usize {
        let done: Vec<Placement> = {
            let mut stuck = self.stuck.lock();
            let (done, left): (Vec<_>, Vec<_>) =
                stuck.drain(..).partition(|(j, _)| j.is_finished());
            *stuck = left;
            done.into_iter().map(|(_, p)| p).collect()
        };
        for p in &done {
            tracing::warn!("a stuck pipeline stopped after all: its bookings are released");
            self.release_placement(p);
        }
        self.stuck.lock().len()
    }

    /// Releases everything a placement booked.
    pub(super) fn release_placement(&self, p: &Placement) {
        self.release(&p.host);
        if let Some((g, d)) = &p.gpu {
            self.gpus.release(*g, d);
        }
    }

    /// Chooses where `plan` runs under its policy and books it: NVENC on the first GPU with an encoder and room
    /// (`prefer-gpu`, `gpu-only`), else x264 on the CPU (`prefer-gpu`, `cpu-only`); an encoded source decodes on
    /// NVDEC where a GPU has a decoder and room. `force_cpu` is the fallback after an encoder failure.
    // Long by design: the policy decision (NVENC with room, spill to x264, refuse naming the short dimension, NVDEC for encoded sources) reads as one table.
    pub(super) fn place(
        &self,
        plan: &StreamPlan,
        force_cpu: bool,
    ) -> Result<Placement, SupervisorError> {
        // an audio-only stream has nothing for NVENC: the CPU encodes its AAC whatever the policy
        let policy = if force_cpu || plan.video.is_empty() {
            Policy::CpuOnly
        } else {
            plan.encoder.policy
        };
        let gm = &self.config.gpu_model;
        let encoded = plan.source.is_encoded();
        let with_nvenc: Vec<u32> = self
            .gpus
            .slots
            .iter()
            .filter(|s| s.nvenc)
            .map(|s| s.index)
            .collect();
        // a backup input is decoded on the CPU next to the source, whatever the backend
        let backup = self.config.cpu_model.backup_demand(plan);
        let gpu_demand = |g: u32| {
            let nvdec = encoded && self.gpus.slots.iter().any(|s| s.index == g && s.nvdec);
            let d = gm.demand(plan, nvdec);
            (d.gpu_part(), d.host_part().plus(&backup), nvdec)
        };
        let with_room: Vec<u32> = with_nvenc
            .iter()
            .copied()
            .filter(|g| {
                self.gpus
                    .free(*g)
                    .short_dimension(&gpu_demand(*g).0)
                    .is_none()
            })
            .collect();
        let backend = match self
            .registry
            .backend_for(policy, VideoCodec::H264, &with_room)
        {
            Ok(b) => b,
            Err(SelectError::GpuOnlyImpossible(_)) if !with_nvenc.is_empty() => {
                // GPUs with NVENC exist but are full: name the short dimension on the emptiest one
                let g = with_nvenc[0];
                let d = gpu_demand(g).0;
                let free = self.gpus.free(g);
                let dim = free.short_dimension(&d).unwrap_or(Dimension::NvencFps);
                return Err(SupervisorError::Capacity {
                    dimension: dim,
                    requested: d.get(dim),
                    free: free.get(dim),
                });
            }
            Err(e) => return Err(SupervisorError::Policy(e.to_string())),
        };
        let placement = match backend {
            Backend::Nvenc { gpu } => {
                let (g, host, nvdec) = gpu_demand(gpu);
                Placement {
                    backend,
                    decode_gpu: nvdec.then_some(gpu),
                    host,
                    gpu: Some((gpu, g)),
                }
            }
            Backend::Cpu => {
                let host = self.config.cpu_model.demand(plan).plus(&backup);
                // decode on NVDEC where a GPU has a decoder and room for it
                let decode = encoded
                    .then(|| {
                        self.gpus.slots.iter().filter(|s| s.nvdec).find_map(|s| {
                            let d = gm.demand(plan, true);
                            let dec = Resources {
                                nvdec_fps: d.nvdec_fps,
                                vram_mib: gm.vram_per_decoder_mib,
                                ..Default::default()
                            };
                            self.gpus
                                .free(s.index)
                                .short_dimension(&dec)
                                .is_none()
                                .then_some((s.index, dec))
                        })
                    })
                    .flatten();
                Placement {
                    backend,
                    decode_gpu: decode.map(|(g, _)| g),
                    host,
                    gpu: decode,
                }
            }
        };
        // the fallback of a running stream books again what it just gave back: the serving reservation keeps
        // new streams out, it does not end running ones
        if force_cpu {
            self.reserve_keeping(&placement.host, Resources::default())?;
        } else {
            self.reserve(&placement.host)?;
        }
        if let Some((g, d)) = &placement.gpu {
            if let Err((dimension, requested, free)) = self.gpus.reserve(*g, d) {
                self.release(&placement.host);
                return Err(SupervisorError::Capacity {
                    dimension,
                    requested,
                    free,
                });
            }
        }
        Ok(placement)
    }

    fn byte_feed(
        &self,
        plan: &StreamPlan,
    ) -> Result<Option<kiln_media::ByteFeed>, SupervisorError> {
        let Source::Http(http) = &plan.source else {
            return Ok(None);
        };
        let fetcher = self
            .live_fetcher
            .clone()
            .map_err(SupervisorError::SourceAddress)?;
        let rt = tokio::runtime::Handle::current();
        let url = http.url();
        Ok(Some(kiln_media::ByteFeed(std::sync::Arc::new(move || {
            fetcher.open_live(&rt, url.clone())
        }))))
    }

    /// The media file of a `file://` source, inside the media directory (symlinks resolved).
    pub(super) fn resolve_file(
        &self,
        plan: &StreamPlan,
    ) -> Result<Option<PathBuf>, SupervisorError> {
        let Source::File { path } = &plan.source else {
            return Ok(None);
        };
        let dir = self.config.media_dir.as_ref().ok_or_else(|| {
            SupervisorError::SourceFile(
                "file sources are disabled: start kilnd with --media-dir".into(),
            )
        })?;
        let root = dir
            .canonicalize()
            .map_err(|e| SupervisorError::SourceFile(format!("media directory: {e}")))?;
        let full = root.join(path).canonicalize().map_err(|_| {
            SupervisorError::SourceFile(format!("`{path}` does not exist in the media directory"))
        })?;
        if !full.starts_with(&root) || !full.is_file() {
            return Err(SupervisorError::SourceFile(format!(
                "`{path}` is not a file inside the media directory"
            )));
        }
        Ok(Some(full))
    }

    /// The media crate's options for `plan` on `placement`: the elements, the checked source address and, for an
    /// `http(s)://` source, a feed that fetches it through the daemon's checked client (on the current runtime).
    pub(super) fn build_options(
        &self,
        placement: &Placement,
        plan: &StreamPlan,
        input: &super::SourceInput,
        feed: Option<kiln_media::ByteFeed>,
    ) -> Result<BuildOptions, SupervisorError> {
        let selection = self
            .registry
            .select(VideoCodec::H264, placement.backend, placement.decode_gpu)
            .map_err(|e| SupervisorError::Policy(e.to_string()))?;
        Ok(BuildOptions {
            registry: self.registry.clone(),
            selection,
            decode_gpu: placement.decode_gpu,
            file: input.file.clone(),
            source_addr: input.addr,
            byte_feed: match feed {
                Some(f) => Some(f),
                None => self.byte_feed(plan)?,
            },
            backup_addr: input.backup_addr,
            backup_feed: match &plan.backup {
                Some(b) => self.byte_feed(&StreamPlan {
                    source: b.source.clone(),
                    ..plan.clone()
                })?,
                None => None,
            },
            size_limit: plan.source.is_publish().then(|| {
                let (w, h) = plan.source_size();
                kiln_media::SizeLimit::for_booking(
                    w,
                    h,
                    self.config.ingest.max_width,
                    self.config.ingest.max_height,
                )
            }),
            #[cfg(feature = "fault-injection")]
            fail_encoder_after_frames: None,
        })
    }
}

/// The CPU a serving load keeps from admission.
fn reserve_of(serving: &ServingLoad) -> Resources {
    Resources {
        cpu_millicores: serving.reserved_millicores,
        ..Default::default()
    }
}
