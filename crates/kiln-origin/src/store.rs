//! The in-memory store: streams → renditions → packager + published snapshot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use bytes::Bytes;
use kiln_llhls::multivariant::{self, AudioMedia, VideoVariant};
use kiln_llhls::packager::{self as pk, PartPos, RenditionReport, Resource};
use kiln_llhls::{PackError, Packager, PackagerConfig, PartIn, Snapshot};

use crate::published::{Prepared, Published};
use tokio::sync::watch;

/// Video or audio.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RenditionKind {
    Video { width: u32, height: u32, fps: f64 },
    Audio { channels: u32 },
}

/// What the multivariant playlist needs to know about a rendition besides its codec.
#[derive(Debug, Clone, PartialEq)]
pub struct RenditionInfo {
    pub name: String,
    pub kind: RenditionKind,
    /// Configured bitrate in bits per second.
    pub bitrate: u64,
}

/// One rendition: its packager and the last published snapshot.
#[derive(Debug)]
pub struct Rendition {
    pub info: RenditionInfo,
    packager: Mutex<Packager>,
    codec: Mutex<Option<String>>,
    /// The picture size its init segment declares (a passthrough rendition's is the source's).
    size: Mutex<Option<(u32, u32)>>,
    /// (track timescale, `tfdt` at running time 0), learnt from the first part: the DASH timeline mapping.
    dash_base: Mutex<Option<(u32, u64)>>,
    snapshot: watch::Sender<Arc<Published>>,
    /// Test hook, see [`Rendition::served_from`].
    served: Mutex<(Option<Arc<Published>>, u64)>,
    /// When each of the last parts was published (ns on [`clock_ns`]'s clock): a parked request measures its
    /// fan-out from the publish of the part it waited for, not from a later one.
    published: Mutex<std::collections::VecDeque<(PartPos, u64)>>,
    /// `"<stream instance, hex>-`: the start of its media's `ETag`s (see [`Rendition::tag`]).
    etag_prefix: Arc<str>,
    /// The `ETag` header lines of its newest parts and segments ([`TAGS`]), each made once, when it was
    /// published: a media answer shares one instead of making its own.
    tags: Mutex<std::collections::VecDeque<(Resource, Bytes)>>,
    /// Playlist requests parked on sockets lent to it, which its publishes answer ([`crate::routes::lent`]).
    pub(crate) lent: Mutex<crate::routes::lent::Waiters>,
}

/// `ETag` lines kept per rendition: the parts and segments of the last ~20 s at three parts a second, more than
/// players and caches ask for (an older resource's line is made when asked).
const TAGS: usize = 64;

impl Rendition {
    /// The current published snapshot.
    pub fn snapshot(&self) -> Arc<Published> {
        self.snapshot.borrow().clone()
    }

    /// A receiver that is notified on every publish.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.snapshot.subscribe()
    }

    /// Requests currently parked on this rendition (blocking playlist reloads and held part requests; each holds
    /// a receiver, whether it waits on it or on a lent socket).
    pub fn parked(&self) -> usize {
        self.snapshot.receiver_count()
    }

    /// Whether `snap` is the state published last.
    pub(crate) fn is_current(&self, snap: &Arc<Published>) -> bool {
        Arc::ptr_eq(&self.snapshot.borrow(), snap)
    }

    /// Test hook (LL-HLS conformance item 38: identical blocked requests share one publish): the snapshot the
    /// newest playlist answer was served from, and how many answers in a row were served from that very `Arc`
    /// (pointer-equal; holding it means its address cannot be reused by a later snapshot). One uncontended lock
    /// per playlist answer.
    pub fn served_from(&self) -> (Option<Arc<Published>>, u64) {
        self.served.lock().clone()
    }

    /// Records that a playlist answer was served from `snap` (see [`Rendition::served_from`]).
    pub(crate) fn note_served(&self, snap: &Arc<Published>) {
        self.note_served_n(snap, 1);
    }

    /// [`Rendition::note_served`] for `n` answers.
    pub(crate) fn note_served_n(&self, snap: &Arc<Published>, n: u64) {
        let mut s = self.served.lock();
        if s.0.as_ref().is_some_and(|p| Arc::ptr_eq(p, snap)) {
            s.1 += n;
        } else {
            *s = (Some(snap.clone()), n);
        }
    }

    pub fn codec(&self) -> Option<String> {
        self.codec.lock().clone()
    }

    pub(crate) fn packager(&self) -> parking_lot::MutexGuard<'_, Packager> {
        self.packager.lock()
    }

    pub fn init(&self) -> Option<Bytes> {
        self.packager().init()
    }

    /// Init segment of generation `gen`.
    pub fn init_gen(&self, gen: u32) -> Option<Bytes> {
        self.packager().init_gen(gen)
    }

    pub fn part(&self, pos: PartPos) -> Option<Bytes> {
        self.packager().part(pos)
    }

    /// Whether part `pos` is a GAP: published without bytes.
    pub fn is_gap(&self, pos: PartPos) -> bool {
        self.packager().is_gap(pos)
    }

    pub fn segment(&self, msn: u64) -> Option<Bytes> {
        self.packager().segment(msn)
    }

    /// The picture size its init segment declares, once known.
    pub fn size(&self) -> Option<(u32, u32)> {
        *self.size.lock()
    }

    pub fn dash_base(&self) -> Option<(u32, u64)> {
        *self.dash_base.lock()
    }

    /// On the first part: reads its `tfdt` and the track timescale to map the track's decode timeline to running
    /// time 0 (DASH `presentationTimeOffset`).
    fn learn_dash_base(&self, part: &PartIn) {
        let mut base = self.dash_base.lock();
        if base.is_some() {
            return;
        }
        let Some(init) = self.init() else { return };
        let Ok(init) = kiln_llhls::cmaf::parse_init(&init) else {
            return;
        };
        if let Ok(f) = kiln_llhls::cmaf::parse_fragment(&part.bytes, &init) {
            let offset = u128::from(part.start_ns) * u128::from(f.timescale) / 1_000_000_000;
            *base = Some((
                f.timescale,
                f.base_decode_time.saturating_sub(offset as u64),
            ));
        }
    }

    /// Publishes the packager's current state. Called with no lock held by callers.
    pub(crate) fn publish(&self, snap: Snapshot) {
        self.keep_tags(&snap);
        if let Some(last) = snap.last {
            let mut p = self.published.lock();
            if p.back().is_none_or(|(pos, _)| *pos < last) {
                if p.len() == PUBLISH_STAMPS {
                    p.pop_front();
                }
                p.push_back((last, clock_ns()));
            }
        }
        // never an older state over a newer one (see `Snapshot::version`)
        let published = Arc::new(Published::from(snap));
        self.snapshot.send_if_modified(|cur| {
            let newer = published.version > cur.version;
            if newer {
                *cur = published;
            }
            newer
        });
    }

    /// The `ETag` header line (`etag: "…"\r\n`) of media resource `res`: the stream instance (its wall-clock
    /// start) and the resource's name, whose bytes never change once published. Shared from those kept since
    /// its publish, or made now.
    pub fn tag(&self, res: Resource) -> Bytes {
        let kept = self
            .tags
            .lock()
            .iter()
            .rev()
            .find(|(r, _)| *r == res)
            .map(|(_, t)| t.clone());
        kept.unwrap_or_else(|| self.make_tag(res))
    }

    fn make_tag(&self, res: Resource) -> Bytes {
        let name = match res {
            Resource::Init(gen) => pk::init_uri(gen),
            Resource::Segment(msn) => pk::segment_uri(msn),
            Resource::Part(p) => pk::part_uri(p.msn, p.part),
        };
        let line = Bytes::from(format!("etag: {}{name}\"\r\n", self.etag_prefix));
        // shared now (a `Bytes` from a `Vec` becomes shareable at its first clone, with an allocation)
        drop(line.clone());
        line
    }

    /// Keeps the `ETag` lines of what `snap` published first (its newest part, its newest complete segment).
    fn keep_tags(&self, snap: &Snapshot) {
        let new = [
            snap.last.map(Resource::Part),
            snap.closed.last().map(|(msn, _)| Resource::Segment(*msn)),
        ];
        for res in new.into_iter().flatten() {
            if self.tags.lock().iter().rev().any(|(r, _)| *r == res) {
                continue;
            }
            let line = self.make_tag(res);
            let mut tags = self.tags.lock();
            if tags.len() == TAGS {
                tags.pop_front();
            }
            tags.push_back((res, line));
        }
    }

    /// Seconds since part `pos` was published (`None`: not among the last [`PUBLISH_STAMPS`] published).
    pub fn since_part_published(&self, pos: PartPos) -> Option<f64> {
        let at = self.part_published_ns(pos)?;
        Some(clock_ns().saturating_sub(at) as f64 / 1e9)
    }

    /// When part `pos` was published, on [`clock_ns`]'s clock.
    pub(crate) fn part_published_ns(&self, pos: PartPos) -> Option<u64> {
        let p = self.published.lock();
        Some(p.iter().rev().find(|(q, _)| *q == pos)?.1)
    }

    /// `body`, as the answer of a request the publish of part `pos` woke: the fan-out (`fanout`, publish → the
    /// answer written) is observed when the last of these bytes is dropped, i.e. once the server has written
    /// them (kiln's HTTP/1.1: handed to the socket; hyper: to its connection), or given them up. `body` as it is
    /// when `pos` is not among the last parts published.
    pub(crate) fn stamped(
        &self,
        body: Bytes,
        pos: PartPos,
        fanout: &prometheus::Histogram,
    ) -> Bytes {
        match self.part_published_ns(pos) {
            Some(published_ns) => Bytes::from_owner(Stamped {
                body,
                fanout: fanout.clone(),
                published_ns,
            }),
            None => body,
        }
    }
}

/// An answer's body that observes the fan-out when it is dropped ([`Rendition::stamped`]).
struct Stamped {
    body: Bytes,
    fanout: prometheus::Histogram,
    published_ns: u64,
}

impl AsRef<[u8]> for Stamped {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

impl Drop for Stamped {
    fn drop(&mut self) {
        let ns = clock_ns().saturating_sub(self.published_ns);
        self.fanout.observe(ns as f64 / 1e9);
    }
}

/// One live stream in the origin.
#[derive(Debug)]
pub struct StreamOrigin {
    pub id: String,
    pub renditions: Vec<Arc<Rendition>>,
    /// Bumped on every publish of any rendition (the multivariant playlist waits on it).
    changed: watch::Sender<u64>,
    /// The configuration the stream started with (`target_duration_s` is the floor of [`Self::target_duration_s`]).
    pub config: PackagerConfig,
    /// EXT-X-TARGETDURATION of every media playlist (see [`Self::following_gop`]).
    target_s: AtomicU32,
    /// The rendition whose first complete segment sets TARGETDURATION (a passthrough rendition: segments follow
    /// the source's GOP), and whether it has; until then no media playlist is served.
    learn_from: Option<usize>,
    target_known: AtomicBool,
    /// The multivariant playlist prepared for the value of `changed` it was rendered at.
    master: Mutex<Option<(u64, Arc<Prepared>)>>,
    /// The MPD prepared for a version of `changed` ([`Self::mpd_prepared`]).
    mpd: Mutex<Option<(u64, Arc<Prepared>)>>,
}

impl StreamOrigin {
    /// A stream whose segments follow its source's GOP (a passthrough rendition, `learn_from`): TARGETDURATION is
    /// the configured one or, when longer, the first complete segment of `learn_from`, rounded; the same in every
    /// media playlist and never changed after (no playlist is served before it is known).
    pub fn following_gop(
        id: &str,
        renditions: Vec<RenditionInfo>,
        config: PackagerConfig,
        learn_from: usize,
    ) -> Arc<Self> {
        let mut s = Self::build(id, renditions, config);
        // audio keeps the grid: its hint stays the grid's
        for r in &s.renditions {
            if matches!(r.info.kind, RenditionKind::Video { .. }) {
                r.packager().follow_source_gop();
            }
        }
        s.learn_from = Some(learn_from);
        s.target_known = AtomicBool::new(false);
        Arc::new(s)
    }

    pub fn new(id: &str, renditions: Vec<RenditionInfo>, config: PackagerConfig) -> Arc<Self> {
        Arc::new(Self::build(id, renditions, config))
    }

    /// EXT-X-TARGETDURATION now (fixed once [`Self::target_known`]).
    pub fn target_duration_s(&self) -> u32 {
        self.target_s.load(Ordering::SeqCst)
    }

    /// Whether segments follow the source's GOP (a passthrough rendition) rather than the fixed grid.
    pub fn follows_source_gop(&self) -> bool {
        self.learn_from.is_some()
    }

    /// What a playlist answer needs of the stream besides its rendition's state.
    pub(crate) fn timing(&self) -> crate::routes::Timing {
        crate::routes::Timing {
            td: u64::from(self.target_duration_s()),
            known: self.target_known(),
        }
    }

    /// Whether TARGETDURATION is final (always, but for a stream still learning its source's GOP).
    pub fn target_known(&self) -> bool {
        self.target_known.load(Ordering::SeqCst)
    }

    /// The passthrough rendition's complete segments over TARGETDURATION (its source's GOP grew longer than the
    /// first one), since the start.
    pub fn segments_over_target(&self) -> u64 {
        self.learn_from
            .and_then(|i| self.renditions.get(i))
            .map_or(0, |r| r.packager().segments_over_target())
    }

    /// After a part of `index`: fixes TARGETDURATION from `learn_from`'s first complete segment, in every
    /// rendition, and republishes them.
    fn learn_target(&self, index: usize) {
        if self.learn_from != Some(index) || self.target_known() {
            return;
        }
        let Some(longest) = self
            .renditions
            .get(index)
            .and_then(|r| r.packager().longest_segment_ns())
        else {
            return;
        };
        let rounded = ((longest + 500_000_000) / 1_000_000_000) as u32;
        let td = rounded.max(self.config.target_duration_s);
        self.target_s.store(td, Ordering::SeqCst);
        // known before the waiters wake to the republished playlists
        self.target_known.store(true, Ordering::SeqCst);
        for (i, r) in self.renditions.iter().enumerate() {
            let reports = self.reports_for(i);
            let snap = {
                let mut p = r.packager();
                p.set_target_duration(td);
                p.snapshot_with(&reports)
            };
            r.publish(snap);
            crate::routes::lent::serve(self.timing(), r);
        }
        self.bump();
    }

    fn build(id: &str, renditions: Vec<RenditionInfo>, config: PackagerConfig) -> Self {
        let etag_prefix: Arc<str> = format!("\"{:x}-", config.wallclock_origin_unix_ms).into();
        let renditions = renditions
            .into_iter()
            .map(|info| {
                let packager = Packager::new(config.clone());
                let snap = packager.snapshot();
                Arc::new(Rendition {
                    info,
                    packager: Mutex::new(packager),
                    codec: Mutex::new(None),
                    size: Mutex::new(None),
                    dash_base: Mutex::new(None),
                    snapshot: watch::channel(Arc::new(Published::from(snap))).0,
                    served: Mutex::new((None, 0)),
                    published: Mutex::new(Default::default()),
                    etag_prefix: etag_prefix.clone(),
                    lent: Mutex::default(),
                    tags: Mutex::new(Default::default()),
                })
            })
            .collect();
        Self {
            id: id.to_string(),
            renditions,
            changed: watch::channel(0).0,
            target_s: AtomicU32::new(config.target_duration_s),
            config,
            learn_from: None,
            target_known: AtomicBool::new(true),
            master: Mutex::new(None),
            mpd: Mutex::new(None),
        }
    }

    pub fn rendition(&self, name: &str) -> Option<&Arc<Rendition>> {
        self.renditions.iter().find(|r| r.info.name == name)
    }

    /// EXT-X-RENDITION-REPORTs for every rendition but `index`, from their last published state (so a report is
    /// at most one part behind: every rendition publishes each part).
    fn reports_for(&self, index: usize) -> Vec<RenditionReport> {
        self.renditions
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != index)
            .filter_map(|(_, r)| {
                Some(RenditionReport {
                    uri: format!("../{}/index.m3u8", r.info.name),
                    last: r.snapshot.borrow().last?,
                })
            })
            .collect()
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// A receiver notified whenever any rendition publishes.
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Stores a rendition's init segment.
    pub fn on_init(&self, index: usize, bytes: Bytes, codec: Option<String>) {
        let Some(r) = self.renditions.get(index) else {
            return;
        };
        // the passthrough's variant is the source's: the fill's init (the top rendition's codec and size, while
        // the source is away) does not change what the multivariant playlist says of it
        let fill_in = self.learn_from == Some(index) && r.codec.lock().is_some();
        if !fill_in {
            *r.codec.lock() = codec;
        }
        let init = kiln_llhls::cmaf::parse_init(&bytes)
            .ok()
            .filter(|_| !fill_in);
        if let Some(init) = init {
            let size = init.tracks.first().and_then(|t| {
                Some((u32::from(t.width?), u32::from(t.height?))).filter(|(w, h)| *w > 0 && *h > 0)
            });
            if size.is_some() {
                *r.size.lock() = size;
            }
        }
        let reports = self.reports_for(index);
        let snap = {
            let mut p = r.packager();
            p.set_init(bytes);
            p.snapshot_with(&reports)
        };
        r.publish(snap);
        self.bump();
        crate::routes::lent::serve(self.timing(), r);
    }

    /// Adds a part and publishes the rendition's new playlist.
    pub fn on_part(&self, index: usize, part: PartIn) -> Result<PartPos, PackError> {
        let Some(r) = self.renditions.get(index) else {
            return Err(PackError::Empty);
        };
        let reports = self.reports_for(index);
        r.learn_dash_base(&part);
        let before = r.snapshot.borrow().last;
        let (pos, snap) = {
            let mut p = r.packager();
            let pos = p.push_part(part)?;
            (pos, p.snapshot_with(&reports))
        };
        r.publish(snap);
        self.refresh_stale_reports(index, before);
        self.bump();
        self.learn_target(index);
        crate::routes::lent::serve(self.timing(), r);
        Ok(pos)
    }

    /// Another rendition's playlist whose report on `index` predates `index`'s previous part (`before`) has not
    /// published for a whole part of `index` (its encoder is behind): it is published again with fresh reports,
    /// so a report is never more than one part behind (LLHLS.md item 16). While every rendition publishes each
    /// part, nothing is republished.
    fn refresh_stale_reports(&self, index: usize, before: Option<PartPos>) {
        let Some(before) = before else {
            return;
        };
        let uri = format!("../{}/index.m3u8", self.renditions[index].info.name);
        for (i, other) in self.renditions.iter().enumerate() {
            if i == index {
                continue;
            }
            let stale = {
                let s = other.snapshot.borrow();
                !s.ended
                    && s.reports
                        .iter()
                        .find(|rep| rep.uri == uri)
                        .is_none_or(|rep| rep.last < before)
            };
            if stale {
                let reports = self.reports_for(i);
                let snap = other.packager().snapshot_with(&reports);
                other.publish(snap);
                crate::routes::lent::serve(self.timing(), other);
            }
        }
    }

    /// Closes every rendition (ENDLIST) and publishes, waking every parked request.
    pub fn end(&self) {
        for (i, r) in self.renditions.iter().enumerate() {
            let reports = self.reports_for(i);
            let snap = {
                let mut p = r.packager();
                p.end();
                p.snapshot_with(&reports)
            };
            r.publish(snap);
            crate::routes::lent::serve(self.timing(), r);
        }
        self.bump();
    }

    /// The LL-DASH MPD, once every rendition's codec and timeline are known.
    pub fn mpd(&self, publish_unix_ms: i64, utc_timing_url: &str) -> Option<String> {
        use kiln_llhls::dash::{self, DashKind, DashManifest, DashRepresentation};
        // the MPD's segment template numbers segments on the fixed grid; segments that follow a source's GOP
        // would need a SegmentTimeline (not built yet)
        if self.learn_from.is_some() {
            return None;
        }
        let mut reps = Vec::new();
        for r in &self.renditions {
            let (timescale, pto) = r.dash_base()?;
            reps.push(DashRepresentation {
                id: r.info.name.clone(),
                codecs: r.codec()?,
                bandwidth: r.info.bitrate,
                kind: match r.info.kind {
                    RenditionKind::Video { width, height, fps } => {
                        DashKind::Video { width, height, fps }
                    }
                    RenditionKind::Audio { channels } => DashKind::Audio {
                        sample_rate: timescale,
                        channels,
                    },
                },
                timescale,
                presentation_time_offset: pto,
            });
        }
        let c = &self.config;
        let segment_ms = (c.segment_ns / 1_000_000) as u32;
        Some(dash::render(&DashManifest {
            availability_start_unix_ms: c.wallclock_origin_unix_ms,
            publish_unix_ms,
            segment_ms,
            part_ms: c.part_target_ms,
            start_number: c.first_msn,
            time_shift_buffer_s: (c.window_segments as u32) * segment_ms / 1000,
            target_latency_ms: 3 * c.part_target_ms + c.part_target_ms / 2,
            utc_timing_url: utc_timing_url.to_string(),
            representations: reps,
            ended: self.renditions.iter().all(|r| r.snapshot().ended),
        }))
    }

    /// [`Self::master`] as prepared bytes ([`Prepared`]: gzipped and signed forms made once each), rendered
    /// again only after something in the stream changed (every change publishes, and every publish bumps
    /// `changed`): viewers joining together share one.
    pub fn master_prepared(&self) -> Option<Arc<Prepared>> {
        // read before rendering: a change during the render makes the next request render again
        let version = *self.changed.borrow();
        if let Some((v, p)) = &*self.master.lock() {
            if *v == version {
                return Some(p.clone());
            }
        }
        let p = Arc::new(Prepared::new(Bytes::from(self.master()?)));
        *self.master.lock() = Some((version, p.clone()));
        Some(p)
    }

    /// [`Self::mpd`] as prepared bytes, rendered once per change of the stream like [`Self::master_prepared`]:
    /// its `publishTime` is when it was rendered (`now_unix_ms` of the first request after the change), which
    /// ISO/IEC 23009-1 makes the time the MPD was generated, so every request until the next publish gets the
    /// same bytes (gzipped, signed, once each).
    pub fn mpd_prepared(&self, now_unix_ms: i64, utc_timing_url: &str) -> Option<Arc<Prepared>> {
        let version = *self.changed.borrow();
        if let Some((v, p)) = &*self.mpd.lock() {
            if *v == version {
                return Some(p.clone());
            }
        }
        let p = Arc::new(Prepared::mpd(Bytes::from(
            self.mpd(now_unix_ms, utc_timing_url)?,
        )));
        // two first requests after a change render at once: the first stored wins, so no viewer is handed an
        // earlier publishTime after a later one
        let mut kept = self.mpd.lock();
        match &*kept {
            Some((v, first)) if *v == version => Some(first.clone()),
            _ => {
                *kept = Some((version, p.clone()));
                Some(p)
            }
        }
    }

    /// The multivariant playlist, once every rendition's codec is known.
    pub fn master(&self) -> Option<String> {
        // a stream on its source's GOP: once its first segment (and so the passthrough's bitrate) is known
        if !self.target_known() {
            return None;
        }
        let mut video = Vec::new();
        let mut audio = None;
        for (i, r) in self.renditions.iter().enumerate() {
            let codec = r.codec()?;
            // the passthrough's bitrate is the publisher's: the stated one, or the highest measured if higher
            let measured = (self.learn_from == Some(i))
                .then(|| r.packager().peak_bitrate())
                .flatten()
                .unwrap_or(0);
            let uri = format!("{}/index.m3u8", r.info.name);
            match r.info.kind {
                RenditionKind::Video { width, height, fps } => {
                    let (width, height) = r.size.lock().unwrap_or((width, height));
                    video.push(VideoVariant {
                        uri,
                        // Peak allowance over the configured average: x264 rate control overshoots per segment.
                        bandwidth: (r.info.bitrate * 6 / 5).max(measured),
                        average_bandwidth: Some(r.info.bitrate),
                        codec,
                        width,
                        height,
                        frame_rate: fps,
                    })
                }
                RenditionKind::Audio { channels } => {
                    audio = Some(AudioMedia {
                        uri,
                        name: r.info.name.clone(),
                        bandwidth: r.info.bitrate,
                        codec,
                        channels,
                    })
                }
            }
        }
        Some(multivariant::render(&video, audio.as_ref()))
    }
}

/// Publish times kept per rendition (parts; ~5 s at 3 parts/s, longer than any woken request takes to run).
const PUBLISH_STAMPS: usize = 16;

/// Monotonic nanoseconds since the first call in this process.
pub(crate) fn clock_ns() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

/// All streams the origin serves.
#[derive(Debug, Clone)]
pub struct Origin {
    streams: Arc<RwLock<HashMap<String, Arc<StreamOrigin>>>>,
    parked: Arc<AtomicUsize>,
    max_parked: usize,
    /// `kiln_origin_fanout_seconds`: publish → a woken parked request's answer written (the daemon registers it).
    pub fanout: prometheus::Histogram,
    /// `kiln_origin_park_refusals_total`: requests that would have waited past the parking limit (503).
    pub park_refusals: prometheus::IntCounter,
    /// When set, playback requests need a signed token.
    pub signer: Option<Arc<crate::signing::UrlSigner>>,
}

impl Default for Origin {
    fn default() -> Self {
        Self::with_parking_limit(Self::DEFAULT_MAX_PARKED)
    }
}

/// A parked request's place; dropping it frees the place.
#[derive(Debug)]
pub struct ParkGuard(Arc<AtomicUsize>, Option<Arc<AtomicUsize>>);

impl Drop for ParkGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
        if let Some(c) = &self.1 {
            c.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Requests one HTTP/2 connection may have waiting at once. It multiplexes up to 200 streams: without a share
/// of its own, a few hundred connections would take every place of [`DEFAULT_MAX_PARKED`] and every other
/// viewer's blocking reload would get 503. A player parks a playlist and a hinted part per rendition it follows;
/// a shield keeps one request per key, over HTTP/1.1 connections of its own.
pub const MAX_PARKED_PER_CONNECTION: usize = 64;

impl Origin {
    /// Requests that may wait for a publish at once, over all streams. Each costs a few KiB; past this a request
    /// that would wait gets 503 at once instead of growing memory without bound.
    pub const DEFAULT_MAX_PARKED: usize = 100_000;

    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_parking_limit(max_parked: usize) -> Self {
        let fanout = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "kiln_origin_fanout_seconds",
                "Time from a publish to the answer of each parked request it woke (blocking playlist reloads, \
                 held parts) being written: handed to the socket, or written out by hyper",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.15, 0.2,
                0.25, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5, 5.0,
            ]),
        )
        .expect("valid histogram options");
        let park_refusals = prometheus::IntCounter::new(
            "kiln_origin_park_refusals_total",
            "Requests answered 503 (with Retry-After) because the parking limit was reached",
        )
        .expect("valid counter options");
        Self {
            streams: Arc::default(),
            parked: Arc::default(),
            max_parked,
            signer: None,
            fanout,
            park_refusals,
        }
    }

    /// Takes a place for a request about to wait, if one is free (a refusal is counted).
    /// On an HTTP/2 connection, at most [`MAX_PARKED_PER_CONNECTION`] of them are its own.
    pub fn park(&self) -> Option<ParkGuard> {
        let conn = kiln_http::connection_waiting();
        let conn_prev = conn.as_ref().map(|c| c.fetch_add(1, Ordering::SeqCst));
        let prev = self.parked.fetch_add(1, Ordering::SeqCst);
        let guard = ParkGuard(self.parked.clone(), conn);
        let free =
            prev < self.max_parked && conn_prev.is_none_or(|n| n < MAX_PARKED_PER_CONNECTION);
        if !free {
            self.park_refusals.inc();
        }
        free.then_some(guard)
    }

    /// Requests waiting now.
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::SeqCst)
    }

    pub fn insert(&self, s: Arc<StreamOrigin>) {
        self.streams.write().insert(s.id.clone(), s);
    }

    pub fn get(&self, id: &str) -> Option<Arc<StreamOrigin>> {
        self.streams.read().get(id).cloned()
    }

    /// Removes a stream if it is still the given instance (a newer stream under the same id is kept).
    pub fn remove_if_same(&self, s: &Arc<StreamOrigin>) {
        let mut map = self.streams.write();
        if map.get(&s.id).is_some_and(|cur| Arc::ptr_eq(cur, s)) {
            map.remove(&s.id);
        }
    }

    pub fn ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self.streams.read().keys().cloned().collect();
        v.sort();
        v
    }
}
