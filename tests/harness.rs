//! kiln-integration: the test sandbox.
//!
//! Starts real daemons (`kilnd::serve` on a 127.0.0.1:0 listener, real GStreamer pipelines) and gives tests an
//! HTTP client, stream helpers, external-tool runners (ffmpeg) and the LL-HLS playlist checks the suites share.

use std::process::Stdio;
use std::time::Duration;

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
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
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
        match self.task.take() {
            Some(t) => t.await?,
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
    /// (MSNs relative to the first one the playlist showed) or later. Returns the playlist.
    pub async fn wait_for_segments(
        &self,
        id: &str,
        rendition: &str,
        count: u64,
    ) -> Result<LlPlaylist> {
        let path = format!("/live/{id}/{rendition}/index.m3u8");
        let (st, text) = self.get_text(&path).await?;
        if st != 200 {
            bail!("GET {path}: {st} {text}");
        }
        let mut pl = parse_ll(&text)?;
        let first = pl.segments.first().context("no segments")?.msn;
        loop {
            let last = pl.segments.last().context("no segments")?.msn;
            if last >= first + count {
                return Ok(pl);
            }
            let (st, text) = self
                .get_text(&format!("{path}?_HLS_msn={}", last + 1))
                .await?;
            if st != 200 {
                bail!("blocking GET: {st} {text}");
            }
            pl = parse_ll(&text)?;
        }
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
    pub async fn spawn(name: &str, bin: &str, args: &[&str], ready: &str) -> Result<Self> {
        Self::spawn_env(name, bin, args, &[], ready).await
    }

    /// [`Proc::spawn`] with extra environment variables (secrets the child reads by name).
    pub async fn spawn_env(
        name: &str,
        bin: &str,
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
        let mut child = tokio::process::Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
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

/// A private redis-server on a free loopback port, without persistence.
pub async fn redis_server() -> Result<Proc> {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let p = port.to_string();
    let mut r = Proc::spawn(
        "redis",
        "redis-server",
        &[
            "--port",
            &p,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        "Ready to accept connections",
    )
    .await?;
    r.url = format!("redis://127.0.0.1:{port}");
    Ok(r)
}
