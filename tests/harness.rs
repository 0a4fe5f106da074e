//! kiln-integration: the test sandbox.
//!
//! Starts real daemons (`kilnd::serve` on a 127.0.0.1:0 listener, real GStreamer pipelines) and gives tests an
//! HTTP client, stream helpers, external-tool runners (ffmpeg) and the LL-HLS playlist checks the suites share.
//! The benches use it too (`kiln-benches` dev-depends on this crate).
//!
//! - waiting: [`poll_until`] (every wait on a state has a limit and says what it last saw), [`poll_json`],
//!   [`wait_job`], [`Daemon::follow_playlist`] (blocking reloads until a condition holds);
//! - processes: [`Proc`] (a child killed on drop; its address read from its `… listening on URL` line),
//!   [`spawn_kilnd`], [`kilnd_release_bin`] (benches), [`redis_server`];
//! - media: [`make_clip`] (ffmpeg lavfi inputs), [`ffmpeg_frames`], [`gst_play`], [`parse_ll`], [`fragment`].

use std::ffi::OsStr;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_llhls::cmaf;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A daemon running in this process on a free port.
#[derive(Debug)]
pub struct Daemon {
    pub base: String,
    pub http: reqwest::Client,
    /// The daemon's state: supervisor and origin, for tests that reach behind the HTTP API.
    pub state: kilnd::AppState,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<()>>>,
}

impl Daemon {
    /// Starts kilnd with `config` on 127.0.0.1:0.
    pub async fn start(config: kilnd::Config) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let (tx, rx) = oneshot::channel::<()>();
        let state = kilnd::AppState::new(config)?;
        let task = tokio::spawn(kilnd::serve_state(state.clone(), listener, async {
            let _ = rx.await;
        }));
        Ok(Self {
            base,
            state,
            // idle pooled connections are dropped before the daemon closes them (its header timeout, 10 s, is also
            // its keep-alive idle time): a request must never go out on a connection the server is closing (seen
            // in CI: "connection reset by peer" on the first request after a 10 s wait)
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .pool_idle_timeout(Duration::from_secs(5))
                .build()?,
            stop: Some(tx),
            task: Some(task),
        })
    }

    /// A daemon with default settings.
    pub async fn start_default() -> Result<Self> {
        Self::start(kilnd::Config::default()).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Graceful shutdown; returns serve()'s result.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        // bounded: a shutdown that hangs fails the test with a reason rather than holding it until nextest's limit
        match self.task.take() {
            Some(t) => tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .map_err(|_| anyhow::anyhow!("the daemon did not shut down within 60 s"))??,
            None => Ok(()),
        }
    }

    /// `PUT /v1/streams/{id}` with a JSON body; returns (status, body).
    pub async fn put_stream(&self, id: &str, body: &str) -> Result<(u16, serde_json::Value)> {
        let res = self
            .http
            .put(self.url(&format!("/v1/streams/{id}")))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await?;
        let status = res.status().as_u16();
        let text = res.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).with_context(|| format!("body: {text}"))?,
        ))
    }

    pub async fn get_text(&self, path: &str) -> Result<(u16, String)> {
        let res = self.http.get(self.url(path)).send().await?;
        Ok((res.status().as_u16(), res.text().await?))
    }

    /// Waits, with blocking playlist requests (no sleeps), until `rendition` of stream `id` lists segment `msn`
    /// (MSNs relative to the first one the playlist showed) or later. Returns the playlist. Fails if that takes
    /// longer than `count` segments of 2 s with a generous margin (a stalled stream fails, it does not hang).
    pub async fn wait_for_segments(
        &self,
        id: &str,
        rendition: &str,
        count: u64,
    ) -> Result<LlPlaylist> {
        let path = format!("/live/{id}/{rendition}/index.m3u8");
        let mut first = None;
        let limit = Duration::from_secs(30 + 4 * count);
        let what = format!("{path} lists {count} segments after the first");
        let (_, pl) = self
            .follow_playlist(&path, &what, limit, |_, pl| {
                let (Some(f), Some(l)) = (pl.segments.first(), pl.segments.last()) else {
                    return false;
                };
                let first = *first.get_or_insert(f.msn);
                l.msn >= first + count
            })
            .await?;
        Ok(pl)
    }

    /// Follows the media playlist at `path` with blocking reloads (`_HLS_msn` = the newest listed MSN + 1, so
    /// each answer comes when a new segment starts) until `cond(text, playlist)` holds; returns that answer.
    /// Fails on a non-200 answer, an unparsable playlist, or after `limit`.
    pub async fn follow_playlist(
        &self,
        path: &str,
        what: &str,
        limit: Duration,
        cond: impl FnMut(&str, &LlPlaylist) -> bool + Send,
    ) -> Result<(String, LlPlaylist)> {
        let next = parking_lot::Mutex::new(None::<u64>);
        let cond = parking_lot::Mutex::new(cond);
        let (next, cond) = (&next, &cond);
        poll_until(what, limit, Duration::ZERO, move || async move {
            let at = *next.lock();
            let q = match at {
                None => path.to_string(),
                Some(msn) => format!("{path}?_HLS_msn={msn}"),
            };
            let (st, text) = self.get_text(&q).await?;
            if st != 200 {
                bail!("GET {q}: {st} {text}");
            }
            let pl = parse_ll(&text)?;
            if (cond.lock())(&text, &pl) {
                return Ok(Polled::Done((text, pl)));
            }
            let last = pl.segments.last().map_or(0, |s| s.msn);
            *next.lock() = Some(last + 1);
            Ok(Polled::NotYet(text))
        })
        .await
    }

    pub async fn get_bytes(&self, path: &str) -> Result<bytes::Bytes> {
        let res = self.http.get(self.url(path)).send().await?;
        if !res.status().is_success() {
            bail!("GET {path}: {}", res.status());
        }
        Ok(res.bytes().await?)
    }
}

/// A small stream spec (two tiny video renditions + audio) that any 2-core machine runs in real time.
pub fn small_stream_spec() -> &'static str {
    r#"{"source": "test:pattern=ball",
        "renditions": [
          {"name": "hi", "width": 320, "height": 180, "fps": 30, "bitrate_kbps": 300},
          {"name": "lo", "width": 160, "height": 90, "fps": 30, "bitrate_kbps": 120}],
        "audio": {"bitrate_kbps": 64}}"#
}

/// What one look at a polled state found.
#[derive(Debug)]
pub enum Polled<T> {
    /// The condition holds; `poll_until` returns the value.
    Done(T),
    /// Not yet; the text says what was seen (the timeout message quotes the last one).
    NotYet(String),
}

/// Looks at a state with `check` until it reports [`Polled::Done`], sleeping `every` between looks (`ZERO` when the
/// check waits by itself, e.g. a blocking playlist request). Bounded: after `limit` — also while a look is still
/// running — it fails with `what` and the last state seen. An `Err` from `check` fails at once.
pub async fn poll_until<T, F, Fut>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut check: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Polled<T>>>,
{
    let start = Instant::now();
    let mut last = String::from("(no look finished)");
    let mut looks = 0u32;
    // bounded: each look is cut at the deadline, and the loop ends at the first look after it
    loop {
        let left = limit.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, check()).await {
            Ok(look) => match look.with_context(|| format!("waiting until {what}"))? {
                Polled::Done(v) => return Ok(v),
                Polled::NotYet(seen) => last = seen,
            },
            Err(_) => last = format!("a look was still running at the limit; before it: {last}"),
        }
        looks += 1;
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            bail!("not within {limit:?} ({looks} looks): {what}; last seen: {last}");
        }
        tokio::time::sleep(every.min(left)).await;
    }
}

/// Polls `GET url` (JSON) every 100 ms until `cond` holds; returns that document. Connection errors and non-JSON
/// answers count as "not yet" (a daemon may be restarting); the timeout message quotes the last answer.
pub async fn poll_json(
    http: &reqwest::Client,
    url: &str,
    what: &str,
    limit: Duration,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let cond = &cond;
    poll_until(what, limit, Duration::from_millis(100), || async move {
        let res = match http.get(url).send().await {
            Ok(r) => r,
            Err(e) => return Ok(Polled::NotYet(format!("GET {url}: {e}"))),
        };
        let status = res.status();
        let text = res.text().await.unwrap_or_default();
        Ok(match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) if cond(&v) => Polled::Done(v),
            _ => Polled::NotYet(format!("{status} {text}")),
        })
    })
    .await
}

/// Waits until VOD job `id` on the daemon at `base` is final (`done`, `failed` or `cancelled`); returns its status.
pub async fn wait_job(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    limit: Duration,
) -> Result<serde_json::Value> {
    poll_json(
        http,
        &format!("{base}/v1/jobs/{id}"),
        &format!("job {id} is final"),
        limit,
        |v| matches!(v["state"].as_str(), Some("done" | "failed" | "cancelled")),
    )
    .await
}

/// ffmpeg output options for H.264 (yuv420p) + AAC.
pub const H264_AAC: &[&str] = &["-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac"];
/// ffmpeg output options for H.264 (yuv420p) without audio.
pub const H264: &[&str] = &["-c:v", "libx264", "-pix_fmt", "yuv420p"];

/// Makes a test input with ffmpeg: `video` and each of `audio` are lavfi graphs (e.g.
/// `testsrc2=size=640x360:rate=30`, `sine=sample_rate=48000`), each input mapped once, `seconds` long, encoded
/// with the output options `out` (e.g. [`H264_AAC`]).
pub async fn make_clip(
    path: &Path,
    seconds: f64,
    video: Option<&str>,
    audio: &[&str],
    out: &[&str],
) -> Result<()> {
    let mut cmd = tokio::process::Command::new("ffmpeg");
    cmd.args(["-v", "error", "-nostdin", "-y"]);
    if let Some(v) = video {
        cmd.args(["-f", "lavfi", "-i", v]);
    }
    for a in audio {
        cmd.args(["-f", "lavfi", "-i", a]);
    }
    let n = usize::from(video.is_some()) + audio.len();
    for i in 0..n {
        cmd.args(["-map", &i.to_string()]);
    }
    cmd.args(["-t", &seconds.to_string()]).args(out).arg(path);
    let o = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .with_context(|| format!("ffmpeg making {} took over 120 s", path.display()))??;
    anyhow::ensure!(
        o.status.success(),
        "ffmpeg making {}: {}",
        path.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

/// Runs ffmpeg on `url` for `seconds` of output and returns the frame count per output stream index, decoding
/// everything (framecrc). Fails on any ffmpeg error.
pub async fn ffmpeg_frames(url: &str, seconds: u32, map_all: bool) -> Result<Vec<usize>> {
    ffmpeg_frames_with(url, seconds, if map_all { &["-map", "0"] } else { &[] }).await
}

/// [`ffmpeg_frames`] with extra output options.
pub async fn ffmpeg_frames_with(url: &str, seconds: u32, out_opts: &[&str]) -> Result<Vec<usize>> {
    let mut cmd = tokio::process::Command::new("ffmpeg");
    cmd.args([
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "error",
        "-xerror",
        "-i",
        url,
    ]);
    cmd.args(out_opts);
    cmd.args(["-t", &seconds.to_string(), "-f", "framecrc", "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(u64::from(seconds) + 40), cmd.output())
        .await
        .context("ffmpeg timed out")??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !stderr.trim().is_empty() {
        bail!("ffmpeg failed ({}): {stderr}", out.status);
    }
    let mut counts: Vec<usize> = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if line.starts_with('#') {
            continue;
        }
        let idx: usize = line.split(',').next().unwrap_or("").trim().parse()?;
        if counts.len() <= idx {
            counts.resize(idx + 1, 0);
        }
        counts[idx] += 1;
    }
    Ok(counts)
}

/// One `EXT-X-PART` line.
#[derive(Debug, Clone, PartialEq)]
pub struct PartTag {
    pub uri: String,
    pub duration: f64,
    pub independent: bool,
}

/// A segment of a media playlist with its parts (parts are listed only near the live edge).
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentEntry {
    pub msn: u64,
    /// `None` for the open segment (parts only).
    pub uri: Option<String>,
    pub duration: Option<f64>,
    pub parts: Vec<PartTag>,
}

/// The LL-HLS facts of a media playlist, parsed by hand (m3u8-rs 6 drops LL-HLS tags).
#[derive(Debug, Clone, PartialEq)]
pub struct LlPlaylist {
    pub version: u32,
    pub target_duration: u64,
    pub part_target: f64,
    pub server_control: String,
    pub part_hold_back: f64,
    pub media_sequence: u64,
    pub map_uri: String,
    pub segments: Vec<SegmentEntry>,
    pub preload_hint: Option<String>,
    pub endlist: bool,
    pub pdt_count: usize,
    /// PROGRAM-DATE-TIME values by MSN.
    pub pdt: Vec<(u64, String)>,
    /// `(URI, LAST-MSN, LAST-PART)` of each EXT-X-RENDITION-REPORT.
    pub reports: Vec<(String, u64, u64)>,
    /// SKIPPED-SEGMENTS of an EXT-X-SKIP, and how many EXT-X-SKIP tags there were.
    pub skipped: Option<u64>,
    pub skip_tags: usize,
    pub playlist_type: bool,
    pub hold_back: Option<f64>,
    pub can_skip_until: Option<f64>,
}

impl LlPlaylist {
    /// The newest listed part: (MSN, index).
    pub fn last_part(&self) -> Option<(u64, u64)> {
        let s = self.segments.iter().rev().find(|s| !s.parts.is_empty())?;
        Some((s.msn, s.parts.len() as u64 - 1))
    }

    /// Every part URI listed.
    pub fn part_uris(&self) -> Vec<String> {
        self.segments
            .iter()
            .flat_map(|s| s.parts.iter().map(|p| p.uri.clone()))
            .collect()
    }
}

fn attr<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        let k = k.rsplit(':').next().unwrap_or(k);
        (k == key).then(|| v.trim_matches('"'))
    })
}

/// Parses a live media playlist; also runs it through m3u8-rs to be sure a standard parser accepts it.
pub fn parse_ll(text: &str) -> Result<LlPlaylist> {
    m3u8_rs::parse_media_playlist_res(text.as_bytes())
        .map_err(|e| anyhow::anyhow!("m3u8-rs rejects the playlist: {e:?}"))?;
    if !text.starts_with("#EXTM3U\n") {
        bail!("playlist does not start with #EXTM3U");
    }
    if text.chars().any(|c| c.is_control() && c != '\n') {
        bail!("control characters in playlist");
    }
    let mut p = LlPlaylist {
        version: 0,
        target_duration: 0,
        part_target: 0.0,
        server_control: String::new(),
        part_hold_back: 0.0,
        media_sequence: 0,
        map_uri: String::new(),
        segments: Vec::new(),
        preload_hint: None,
        endlist: false,
        pdt_count: 0,
        pdt: Vec::new(),
        reports: Vec::new(),
        skipped: None,
        skip_tags: 0,
        playlist_type: false,
        hold_back: None,
        can_skip_until: None,
    };
    let mut versions = 0;
    let mut open: Option<SegmentEntry> = None;
    let mut pending_dur: Option<f64> = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("#EXT-X-VERSION:") {
            p.version = v.parse()?;
            versions += 1;
        } else if let Some(v) = line.strip_prefix("#EXT-X-TARGETDURATION:") {
            p.target_duration = v.parse()?;
        } else if let Some(v) = line.strip_prefix("#EXT-X-PART-INF:") {
            p.part_target = attr(v, "PART-TARGET").context("PART-TARGET")?.parse()?;
        } else if let Some(v) = line.strip_prefix("#EXT-X-SERVER-CONTROL:") {
            p.server_control = v.to_string();
            p.part_hold_back = attr(v, "PART-HOLD-BACK")
                .context("PART-HOLD-BACK")?
                .parse()?;
            p.hold_back = attr(v, "HOLD-BACK").map(str::parse).transpose()?;
            p.can_skip_until = attr(v, "CAN-SKIP-UNTIL").map(str::parse).transpose()?;
        } else if let Some(v) = line.strip_prefix("#EXT-X-MEDIA-SEQUENCE:") {
            p.media_sequence = v.parse()?;
        } else if let Some(v) = line.strip_prefix("#EXT-X-MAP:") {
            p.map_uri = attr(v, "URI").context("MAP URI")?.to_string();
        } else if let Some(v) = line.strip_prefix("#EXT-X-PROGRAM-DATE-TIME:") {
            p.pdt_count += 1;
            let msn = p.media_sequence + p.skipped.unwrap_or(0) + p.segments.len() as u64;
            p.pdt.push((msn, v.to_string()));
        } else if let Some(v) = line.strip_prefix("#EXT-X-SKIP:") {
            p.skip_tags += 1;
            p.skipped = Some(
                attr(v, "SKIPPED-SEGMENTS")
                    .context("SKIPPED-SEGMENTS")?
                    .parse()?,
            );
        } else if let Some(v) = line.strip_prefix("#EXT-X-RENDITION-REPORT:") {
            p.reports.push((
                attr(v, "URI").context("report URI")?.to_string(),
                attr(v, "LAST-MSN").context("LAST-MSN")?.parse()?,
                attr(v, "LAST-PART").context("LAST-PART")?.parse()?,
            ));
        } else if line.starts_with("#EXT-X-PLAYLIST-TYPE") {
            p.playlist_type = true;
        } else if let Some(v) = line.strip_prefix("#EXT-X-PART:") {
            let msn = p.media_sequence + p.skipped.unwrap_or(0) + p.segments.len() as u64;
            let seg = open.get_or_insert_with(|| SegmentEntry {
                msn,
                uri: None,
                duration: None,
                parts: Vec::new(),
            });
            seg.parts.push(PartTag {
                uri: attr(v, "URI").context("PART URI")?.to_string(),
                duration: attr(v, "DURATION").context("PART DURATION")?.parse()?,
                independent: attr(v, "INDEPENDENT") == Some("YES"),
            });
        } else if let Some(v) = line.strip_prefix("#EXTINF:") {
            pending_dur = Some(
                v.trim_end_matches(',')
                    .split(',')
                    .next()
                    .unwrap_or("")
                    .parse()?,
            );
        } else if let Some(v) = line.strip_prefix("#EXT-X-PRELOAD-HINT:") {
            p.preload_hint = Some(attr(v, "URI").context("hint URI")?.to_string());
        } else if line == "#EXT-X-ENDLIST" {
            p.endlist = true;
        } else if !line.starts_with('#') && !line.is_empty() {
            let msn = p.media_sequence + p.skipped.unwrap_or(0) + p.segments.len() as u64;
            let mut seg = open.take().unwrap_or(SegmentEntry {
                msn,
                uri: None,
                duration: None,
                parts: Vec::new(),
            });
            seg.uri = Some(line.to_string());
            seg.duration = pending_dur.take();
            p.segments.push(seg);
        }
    }
    if let Some(seg) = open {
        p.segments.push(seg);
    }
    if versions != 1 {
        bail!("{versions} EXT-X-VERSION tags");
    }
    Ok(p)
}

/// The sync-sample/duration facts of a fragment, read with the init segment.
pub fn fragment(init: &[u8], bytes: &[u8]) -> Result<cmaf::FragmentInfo> {
    let i = cmaf::parse_init(init)?;
    Ok(cmaf::parse_fragment(bytes, &i)?)
}

/// Plays `url` with GStreamer's `playbin3` (adaptivedemux2: hlsdemux2) into fake sinks until it has decoded
/// `video_frames` video frames and `audio_buffers` audio buffers, or fails on an error or after `timeout`.
/// Returns (video frames, audio buffers, names of the demuxers seen).
pub async fn gst_play(
    url: &str,
    video_frames: usize,
    audio_buffers: usize,
    timeout: Duration,
) -> Result<(usize, usize, Vec<String>)> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new("gst-launch-1.0")
        .args([
            "-v",
            "playbin3",
            &format!("uri={url}"),
            "video-sink=fakesink name=kv silent=false sync=true",
            "audio-sink=fakesink name=ka silent=false sync=true",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("gst-launch-1.0 not found (gstreamer1.0-tools)")?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut errs = BufReader::new(child.stderr.take().context("stderr")?).lines();
    let (mut v, mut a, mut demuxers) = (0usize, 0usize, Vec::<String>::new());
    // bounded by the timeout below
    let run = async {
        loop {
            tokio::select! {
                line = lines.next_line() => {
                    let Some(line) = line? else { bail!("gst-launch exited early (v={v}, a={a})") };
                    if line.contains("ERROR") {
                        bail!("gst-launch: {line}");
                    }
                    if line.contains("kv:sink") && line.contains("chain") {
                        v += 1;
                    } else if line.contains("ka:sink") && line.contains("chain") {
                        a += 1;
                    }
                    for (class, name) in [("/GstHLSDemux2:", "hlsdemux2"), ("/GstHLSDemux:", "hlsdemux")] {
                        if line.contains(class) && !demuxers.iter().any(|x| x == name) {
                            demuxers.push(name.to_string());
                        }
                    }
                    if v >= video_frames && a >= audio_buffers {
                        return Ok(());
                    }
                }
                line = errs.next_line() => {
                    if let Some(line) = line? {
                        if line.contains("ERROR") { bail!("gst-launch: {line}"); }
                    }
                }
            }
        }
    };
    let res = tokio::time::timeout(timeout, run).await;
    match res {
        Ok(r) => r?,
        Err(_) => bail!(
            "playbin3 decoded only {v} video frames and {a} audio buffers in {timeout:?} (demuxers {demuxers:?})"
        ),
    }
    let _ = child.kill().await;
    Ok((v, a, demuxers))
}

/// A child process (a daemon, a scheduler, redis-server) killed when dropped.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    /// Base URL it printed (`… listening on URL`), or `redis://…` for Redis.
    pub url: String,
    /// Where its stderr goes (unless `KILN_IT_LOGS=1`).
    pub log: std::path::PathBuf,
    child: tokio::process::Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

impl Proc {
    /// Runs `bin args…` and waits (≤ 30 s) for a stdout line containing `ready`; the URL is the line's last word.
    /// Stderr goes to the test's stderr when `KILN_IT_LOGS=1`.
    pub async fn spawn(
        name: &str,
        bin: impl AsRef<OsStr>,
        args: &[&str],
        ready: &str,
    ) -> Result<Self> {
        Self::spawn_env(name, bin, args, &[], ready).await
    }

    /// [`Proc::spawn`] with extra environment variables (secrets the child reads by name).
    pub async fn spawn_env(
        name: &str,
        bin: impl AsRef<OsStr>,
        args: &[&str],
        env: &[(&str, &str)],
        ready: &str,
    ) -> Result<Self> {
        use tokio::io::AsyncBufReadExt;
        let logs = std::env::var("KILN_IT_LOGS").is_ok_and(|v| v == "1");
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let log = std::env::temp_dir().join(format!(
            "kiln-it-{name}-{}-{}.log",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let stderr = if logs {
            Stdio::inherit()
        } else {
            Stdio::from(std::fs::File::create(&log)?)
        };
        let bin = bin.as_ref();
        let mut child = tokio::process::Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.to_string_lossy()))?;
        let out = child.stdout.take().context("stdout")?;
        let mut lines = tokio::io::BufReader::new(out).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(l) = lines.next_line().await? {
                if l.contains(ready) {
                    return Ok::<_, anyhow::Error>(l);
                }
            }
            bail!("{name} exited before printing `{ready}`")
        })
        .await
        .with_context(|| format!("{name} did not get ready"))??;
        // keep draining stdout so the child never blocks on a full pipe
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let url = line
            .split_whitespace()
            .last()
            .unwrap_or_default()
            .to_string();
        Ok(Self {
            name: name.to_string(),
            url,
            log,
            child,
        })
    }

    /// What it wrote to stderr so far (empty with `KILN_IT_LOGS=1`).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// SIGKILL, and wait for it to be gone.
    pub async fn kill(&mut self) -> Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// Waits for the process to exit by itself, at most `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .with_context(|| format!("{} did not exit within {limit:?}", self.name))?
            .map_err(Into::into)
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`).
    pub async fn signal(&self, sig: &str) -> Result<()> {
        let st = tokio::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .await?;
        anyhow::ensure!(st.success(), "kill -{sig} {} failed", self.pid());
        Ok(())
    }
}

/// A kilnd process on a free loopback port: `bin` (a test's `CARGO_BIN_EXE_kiln-it-kilnd`, a bench's
/// [`kilnd_release_bin`]) run with `--listen 127.0.0.1:0` and `args`; ready when it prints
/// `kilnd listening on URL`, which becomes [`Proc::url`].
pub async fn spawn_kilnd(name: &str, bin: impl AsRef<OsStr>, args: &[&str]) -> Result<Proc> {
    spawn_kilnd_env(name, bin, args, &[]).await
}

/// [`spawn_kilnd`] with extra environment variables.
pub async fn spawn_kilnd_env(
    name: &str,
    bin: impl AsRef<OsStr>,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<Proc> {
    let argv: Vec<&str> = ["--listen", "127.0.0.1:0"]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    Proc::spawn_env(name, bin, &argv, env, "listening on").await
}

/// The kilnd the benches measure: `$KILND`, else the workspace's release build (`cargo build --release -p kilnd`).
pub fn kilnd_release_bin() -> Result<PathBuf> {
    let bin = std::env::var_os("KILND")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/kilnd"));
    anyhow::ensure!(
        bin.exists(),
        "{} missing: cargo build --release -p kilnd",
        bin.display()
    );
    Ok(bin)
}

/// CPU time of a process for the benches: utime + stime in clock ticks (`/proc/{pid}/stat`), children included when `children`.
pub fn cpu_ticks(pid: u32, children: bool) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // after "pid (comm)": state, ppid, pgrp, session, tty, tpgid, flags, 4 fault counters, utime, stime,
            // cutime, cstime
            let f: Vec<i64> = s
                .rsplit(')')
                .next()?
                .split_whitespace()
                .skip(1)
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            let base = f.get(10)? + f.get(11)?;
            Some(
                (if children {
                    base + f.get(12)? + f.get(13)?
                } else {
                    base
                })
                .max(0) as u64,
            )
        })
        .unwrap_or(0)
}

/// A private redis-server on a free loopback port, without persistence.
pub async fn redis_server() -> Result<Proc> {
    redis_on(free_port()?, &[]).await
}

/// A port nothing listens on now (for servers that cannot report the one they bound).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// `redis-server` on 127.0.0.1:`port` without persistence, with `extra` flags (e.g. `--replicaof HOST PORT`);
/// its `url` is `redis://127.0.0.1:PORT`.
pub async fn redis_on(port: u16, extra: &[&str]) -> Result<Proc> {
    let p = port.to_string();
    // its own directory: a replica's full sync writes dump.rdb there, and a server started later in the same
    // directory would load it (state from another test)
    let dir = std::env::temp_dir().join(format!("kiln-it-redis-{}-{port}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let dir = dir.display().to_string();
    let args: Vec<&str> = [
        "--port",
        p.as_str(),
        "--bind",
        "127.0.0.1",
        "--dir",
        dir.as_str(),
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    .into_iter()
    .chain(extra.iter().copied())
    .collect();
    let mut r = Proc::spawn(
        &format!("redis-{port}"),
        "redis-server",
        &args,
        "Ready to accept connections",
    )
    .await?;
    r.url = format!("redis://127.0.0.1:{port}");
    Ok(r)
}

/// A Redis Sentinel on 127.0.0.1:`port` watching the master `name` at 127.0.0.1:`master` (quorum 2), declaring
/// it down after 2 s without an answer (1 s made a loaded 2-core host fail over by itself now and then). Its config file (Sentinel rewrites it) lives in `dir`.
pub async fn redis_sentinel(port: u16, name: &str, master: u16, dir: &Path) -> Result<Proc> {
    let conf = dir.join(format!("sentinel-{port}.conf"));
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {name} 127.0.0.1 {master} 2\n\
             sentinel down-after-milliseconds {name} 2000\nsentinel failover-timeout {name} 10000\n",
            dir.display()
        ),
    )?;
    let conf = conf.display().to_string();
    let mut s = Proc::spawn(
        &format!("sentinel-{port}"),
        "redis-server",
        &[conf.as_str(), "--sentinel"],
        "+monitor master",
    )
    .await?;
    s.url = format!("127.0.0.1:{port}");
    Ok(s)
}

/// The browser scripts' directory (`tests/browser`: hls.js and playwright-core), or `None` (after saying why) when the tools are missing outside CI; under CI a missing
/// tool fails the test.
pub fn browser_dir() -> Result<Option<PathBuf>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser");
    let missing =
        if !Path::new("/usr/bin/chromium").exists() && std::env::var_os("CHROMIUM").is_none() {
            Some("chromium is not installed".to_string())
        } else if !dir.join("node_modules/playwright-core").exists()
            || !dir.join("node_modules/hls.js").exists()
        {
            Some(format!("run `npm ci --prefix {}`", dir.display()))
        } else {
            None
        };
    match missing {
        None => Ok(Some(dir)),
        Some(why) if std::env::var_os("CI").is_some() => bail!("browser test cannot run: {why}"),
        Some(why) => {
            eprintln!("skipping the browser test: {why}");
            Ok(None)
        }
    }
}

/// Runs `node script args…` (at most `limit`) and parses the JSON line it prints last.
pub async fn node(
    script: &Path,
    args: &[&std::ffi::OsStr],
    limit: Duration,
) -> Result<serde_json::Value> {
    let out = tokio::time::timeout(
        limit,
        tokio::process::Command::new("node")
            .arg(script)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("the browser run timed out")??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stdout
        .lines()
        .last()
        .with_context(|| format!("no result; stderr: {stderr}"))?;
    serde_json::from_str(line).with_context(|| format!("bad result {line:?}; stderr: {stderr}"))
}
