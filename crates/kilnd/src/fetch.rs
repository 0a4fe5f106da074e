//! Downloads a VOD job's `http(s)` input to local disk before the transcode, under the address policy.
//!
//! The job's URL is chosen by whoever submits jobs, and the daemon fetches it from inside the platform's network,
//! so every connection is checked against [`kiln_model::net::UrlPolicy`] (public addresses only unless the
//! operator allowed networks with `--allow-networks`):
//! - host names are resolved here, and only the allowed addresses are handed to the connector, so the address
//!   checked is the address connected to (no second lookup a rebinding DNS server could answer differently);
//! - literal addresses (which skip resolution) are checked before the first request and on every redirect hop;
//! - redirects: at most [`MAX_REDIRECTS`], `http`/`https` only; proxies from the environment are ignored (they
//!   would connect on our behalf to anything).
//!
//! Downloading first (rather than letting GStreamer stream the URL) also gives the job a size limit, a stall
//! timeout, byte-level progress, and a decoder that reads a seekable local file.

use std::error::Error as StdError;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kiln_model::net::UrlPolicy;
use kiln_model::{Host, Source};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

/// Redirect hops a fetch follows.
pub const MAX_REDIRECTS: usize = 5;
/// A connection must be up within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// No byte for this long (headers or body) fails the fetch.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The slowest a download may go: at least this many bytes in every [`STALL_TIMEOUT`] (32 KiB/s). A server
/// that sends a byte a little more often than the stall limit would otherwise hold a job slot without end;
/// with this floor a download of `--vod-max-input-bytes` ends within that size over 32 KiB/s.
const SLOW_FLOOR_BYTES: u64 = 1 << 20;
/// The longest wait between two reloads of a pulled HLS playlist, whatever its target duration says: half of
/// any target up to 20 s (RFC 8216 §6.3.4's wait), and no longer than that for a larger one.
const MAX_RELOAD: Duration = Duration::from_secs(10);

/// The hint every refusal carries.
fn hint(ip: IpAddr) -> String {
    let net = match ip {
        IpAddr::V4(_) => format!("{ip}/32"),
        IpAddr::V6(_) => format!("{ip}/128"),
    };
    format!("sources may only reach public addresses unless kilnd runs with --allow-networks (e.g. {net})")
}

/// Resolves names with the system resolver and keeps only the addresses the policy allows.
struct PolicyResolver {
    policy: Arc<UrlPolicy>,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| format!("cannot resolve {host}: {e}"))?
                .collect();
            let (ok, denied): (Vec<SocketAddr>, Vec<SocketAddr>) =
                all.into_iter().partition(|a| policy.check(a.ip()).is_ok());
            if ok.is_empty() {
                let Some(first) = denied.first() else {
                    return Err(format!("{host} resolves to no address").into());
                };
                let why = policy
                    .check(first.ip())
                    .err()
                    .map(|d| d.to_string())
                    .unwrap_or_default();
                return Err(format!("{host} resolves to {why}; {}", hint(first.ip())).into());
            }
            let addrs: Addrs = Box::new(ok.into_iter());
            Ok(addrs)
        })
    }
}

/// Checks a URL's scheme and, for a literal address, the address itself.
fn check_url(policy: &UrlPolicy, url: &Url) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "only http and https inputs are fetched, not {}",
            url.scheme()
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("input URLs may not carry credentials".into());
    }
    let ip = match url.host() {
        Some(url::Host::Ipv4(a)) => IpAddr::V4(a),
        Some(url::Host::Ipv6(a)) => IpAddr::V6(a),
        Some(url::Host::Domain(_)) => return Ok(()),
        None => return Err("the input URL has no host".into()),
    };
    policy
        .check(ip)
        .map_err(|d| format!("host {d}; {}", hint(ip)))
}

/// Checks the host a live source connects to (SRT caller, RTSP, HTTP) and returns the address to connect to: a
/// literal address must be allowed; a name must resolve only to allowed addresses, and the first of them is the
/// one the pipeline connects to (the media crate hands GStreamer the address, so nothing resolves the name again).
/// Sources that connect nowhere (test, file, an SRT listener) return `None`. HTTP sources are fetched through
/// [`Fetcher::open_live`], which checks every connection and redirect hop again.
pub async fn check_source(policy: &UrlPolicy, source: &Source) -> Result<Option<IpAddr>, String> {
    let Some((host, port)) = source.remote_host() else {
        return Ok(None);
    };
    let ip = match host {
        Host::Ip(ip) => *ip,
        Host::Name(name) => {
            let addrs: Vec<SocketAddr> = tokio::time::timeout(
                CONNECT_TIMEOUT,
                tokio::net::lookup_host((name.as_str(), port)),
            )
            .await
            .map_err(|_| format!("resolving {name} timed out"))?
            .map_err(|e| format!("cannot resolve {name}: {e}"))?
            .collect();
            for a in &addrs {
                if let Err(d) = policy.check(a.ip()) {
                    return Err(format!("{name} resolves to {d}; {}", hint(a.ip())));
                }
            }
            return addrs
                .first()
                .map(|a| Some(a.ip()))
                .ok_or_else(|| format!("{name} resolves to no address"));
        }
    };
    policy
        .check(ip)
        .map_err(|d| format!("source host {d}; {}", hint(ip)))?;
    Ok(Some(ip))
}

/// Media types of HLS playlists: such a source is pulled by kilnd ([`Fetcher::open_live`]), never handed to
/// GStreamer's adaptive demuxer, which would fetch its segments with its own client, past the address policy.
const PLAYLIST_TYPES: [&str; 4] = [
    "application/vnd.apple.mpegurl",
    "application/x-mpegurl",
    "audio/mpegurl",
    "audio/x-mpegurl",
];

/// The body of a live HTTP source as a blocking reader, for the media crate's feed thread.
struct LiveBody {
    rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, String>>,
    chunk: bytes::Bytes,
}

impl std::io::Read for LiveBody {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(c)) => self.chunk = c,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

/// The fetcher of one daemon (one connection pool).
#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    policy: Arc<UrlPolicy>,
    max_bytes: u64,
    /// A download must bring `.1` bytes in every `.0` (or finish): [`STALL_TIMEOUT`], [`SLOW_FLOOR_BYTES`].
    floor: (Duration, u64),
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("policy", &self.policy)
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

/// Every cause in an error chain, outermost first (reqwest's own message hides "connection refused").
fn chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

impl Fetcher {
    pub fn new(policy: UrlPolicy, max_bytes: u64) -> Result<Fetcher, String> {
        let policy = Arc::new(policy);
        let redirect_policy = policy.clone();
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(STALL_TIMEOUT)
            .dns_resolver(Arc::new(PolicyResolver {
                policy: policy.clone(),
            }))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    let n = attempt.previous().len();
                    return attempt.error(format!("more than {n} redirects"));
                }
                match check_url(&redirect_policy, attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(e) => {
                        let e = format!("redirected to {}: {e}", attempt.url());
                        attempt.error(e)
                    }
                }
            }))
            .user_agent(concat!("kilnd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("the HTTP client: {e}"))?;
        Ok(Fetcher {
            client,
            policy,
            max_bytes,
            floor: (STALL_TIMEOUT, SLOW_FLOOR_BYTES),
        })
    }

    /// Downloads `url` to `dest` (created or truncated), calling `progress(bytes, total)` as it goes. Fails on a
    /// refused address, a non-2xx answer, more than the size limit, an empty body, a stall, a transfer slower
    /// than the floor (32 KiB/s over any 30 s), or `cancel`.
    pub async fn fetch(
        &self,
        url: &str,
        dest: &Path,
        cancel: &AtomicBool,
        progress: &mut (dyn FnMut(u64, Option<u64>) + Send),
    ) -> Result<u64, String> {
        let parsed = Url::parse(url).map_err(|e| format!("input URL: {e}"))?;
        check_url(&self.policy, &parsed)?;
        let mut resp = tokio::time::timeout(
            STALL_TIMEOUT + CONNECT_TIMEOUT,
            self.client.get(parsed).send(),
        )
        .await
        .map_err(|_| {
            format!(
                "fetching the input: no answer in {} s",
                (STALL_TIMEOUT + CONNECT_TIMEOUT).as_secs()
            )
        })?
        .map_err(|e| format!("fetching the input: {}", chain(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("fetching the input: the server answered {status}"));
        }
        let total = resp.content_length();
        if let Some(n) = total.filter(|n| *n > self.max_bytes) {
            return Err(format!(
                "the input is {n} bytes, more than the {} this daemon accepts (--vod-max-input-bytes)",
                self.max_bytes
            ));
        }
        let mut file = std::fs::File::create(dest).map_err(|e| format!("input download: {e}"))?;
        let mut got: u64 = 0;
        let (window, floor) = self.floor;
        let mut window_start = (tokio::time::Instant::now(), 0u64);
        progress(0, total);
        loop {
            if cancel.load(Ordering::SeqCst) {
                return Err("cancelled".into());
            }
            let chunk = tokio::time::timeout(STALL_TIMEOUT, resp.chunk())
                .await
                .map_err(|_| {
                    format!(
                        "fetching the input: no data for {} s",
                        STALL_TIMEOUT.as_secs()
                    )
                })?
                .map_err(|e| format!("fetching the input: {}", chain(&e)))?;
            let Some(chunk) = chunk else { break };
            got += chunk.len() as u64;
            if window_start.0.elapsed() >= window {
                if got - window_start.1 < floor {
                    return Err(format!(
                        "fetching the input: {} bytes in the last {window:?}, slower than a download must go \
                         (at least {floor} bytes every {window:?})",
                        got - window_start.1,
                    ));
                }
                window_start = (tokio::time::Instant::now(), got);
            }
            if got > self.max_bytes {
                return Err(format!(
                    "the input is more than the {} bytes this daemon accepts (--vod-max-input-bytes)",
                    self.max_bytes
                ));
            }
            file.write_all(&chunk)
                .map_err(|e| format!("input download: {e}"))?;
            progress(got, total);
        }
        if let Some(n) = total.filter(|n| *n != got) {
            return Err(format!("fetching the input: {got} of {n} bytes arrived"));
        }
        if got == 0 {
            return Err("fetching the input: the server sent an empty body".into());
        }
        file.sync_all()
            .map_err(|e| format!("input download: {e}"))?;
        Ok(got)
    }

    /// Opens a live HTTP source on `rt` as a byte stream for the pipeline. Every request goes through the checked
    /// client (every resolved address and every redirect hop checked against the policy; literal addresses and
    /// non-http schemes in playlists checked before the request). A progressive body is passed on as it arrives;
    /// an HLS playlist (by content type or by its first bytes) is pulled: the highest variant's segments are
    /// fetched in order and concatenated (TS, or fMP4 after its `EXT-X-MAP`), the playlist reloaded every half
    /// target duration, and the stream ends after an `EXT-X-ENDLIST` playlist's last segment ([`kiln_llhls::pull`]).
    /// DASH is refused. No size limit but the stall timeout. The reader ends when the source does; when it is
    /// dropped, the requests stop at their next chunk.
    pub fn open_live(
        &self,
        rt: &tokio::runtime::Handle,
        url: String,
    ) -> std::io::Result<Box<dyn std::io::Read + Send>> {
        let parsed =
            Url::parse(&url).map_err(|e| std::io::Error::other(format!("`{url}`: {e}")))?;
        check_url(&self.policy, &parsed).map_err(std::io::Error::other)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let live = Live {
            client: self.client.clone(),
            policy: self.policy.clone(),
            tx,
        };
        rt.spawn(async move {
            if let Err(e) = live.run(parsed).await {
                let _ = live.tx.send(Err(e)).await;
            }
        });
        Ok(Box::new(LiveBody {
            rx,
            chunk: bytes::Bytes::new(),
        }))
    }
}

/// Largest playlist read while pulling HLS.
const MAX_PLAYLIST_BYTES: usize = 1 << 20;

/// One live HTTP source being fetched into the pipeline's channel.
struct Live {
    client: reqwest::Client,
    policy: Arc<UrlPolicy>,
    tx: tokio::sync::mpsc::Sender<Result<bytes::Bytes, String>>,
}

/// Why the reader went away (not an error to report).
const GONE: &str = "the pipeline stopped reading";

impl Live {
    async fn get(&self, url: &Url) -> Result<reqwest::Response, String> {
        check_url(&self.policy, url)?;
        let resp = tokio::time::timeout(
            STALL_TIMEOUT + CONNECT_TIMEOUT,
            self.client.get(url.clone()).send(),
        )
        .await
        .map_err(|_| {
            format!(
                "the HTTP source did not answer in {} s",
                (STALL_TIMEOUT + CONNECT_TIMEOUT).as_secs()
            )
        })?
        .map_err(|e| format!("the HTTP source: {}", chain(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("the HTTP source answered {status} for {url}"));
        }
        Ok(resp)
    }

    async fn chunk(resp: &mut reqwest::Response) -> Result<Option<bytes::Bytes>, String> {
        tokio::time::timeout(STALL_TIMEOUT, resp.chunk())
            .await
            .map_err(|_| {
                format!(
                    "the HTTP source sent nothing for {} s",
                    STALL_TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| format!("the HTTP source: {}", chain(&e)))
    }

    async fn send(&self, bytes: bytes::Bytes) -> Result<(), String> {
        self.tx.send(Ok(bytes)).await.map_err(|_| GONE.to_string())
    }

    /// The whole body (a playlist), at most [`MAX_PLAYLIST_BYTES`].
    async fn text(&self, url: &Url) -> Result<Vec<u8>, String> {
        let mut resp = self.get(url).await?;
        let mut body = Vec::new();
        while let Some(c) = Self::chunk(&mut resp).await? {
            body.extend_from_slice(&c);
            if body.len() > MAX_PLAYLIST_BYTES {
                return Err(format!(
                    "the playlist {url} is over {MAX_PLAYLIST_BYTES} bytes"
                ));
            }
        }
        Ok(body)
    }

    async fn run(&self, url: Url) -> Result<(), String> {
        let mut resp = self.get(&url).await?;
        let ctype = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if ctype == "application/dash+xml" {
            return Err(format!("the HTTP source is a DASH manifest ({ctype}): kiln pulls media streams and HLS, not DASH"));
        }
        let first = Self::chunk(&mut resp).await?.unwrap_or_default();
        if PLAYLIST_TYPES.contains(&ctype.as_str()) || first.starts_with(b"#EXTM3U") {
            let mut body = first.to_vec();
            while let Some(c) = Self::chunk(&mut resp).await? {
                body.extend_from_slice(&c);
                if body.len() > MAX_PLAYLIST_BYTES {
                    return Err(format!(
                        "the playlist {url} is over {MAX_PLAYLIST_BYTES} bytes"
                    ));
                }
            }
            let final_url = resp.url().clone();
            return match self.pull_hls(final_url, body).await {
                Err(e) if e == GONE => Ok(()),
                r => r,
            };
        }
        if !first.is_empty() && self.send(first).await.is_err() {
            return Ok(());
        }
        while let Some(c) = Self::chunk(&mut resp).await? {
            if self.send(c).await.is_err() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Follows an HLS playlist at `url` (first body `body`) until it ends.
    async fn pull_hls(&self, mut url: Url, mut body: Vec<u8>) -> Result<(), String> {
        use kiln_llhls::pull::{self, PullPlaylist};
        let join = |base: &Url, uri: &str| {
            base.join(uri)
                .map_err(|e| format!("the playlist names `{uri}`: {e}"))
        };
        // a multivariant playlist: follow its highest variant (one level)
        if let PullPlaylist::Variant(v) = pull::read(&body)? {
            url = join(&url, &v)?;
            body = self.text(&url).await?;
        }
        let mut last: Option<u64> = None;
        let mut init_sent: Option<Url> = None;
        let mut last_new = std::time::Instant::now();
        loop {
            let PullPlaylist::Media {
                items,
                ended,
                target_duration_s,
            } = pull::read(&body)?
            else {
                return Err(format!(
                    "{url}: a multivariant playlist where a media playlist was expected"
                ));
            };
            let todo = pull::next(&items, ended, last);
            if !todo.is_empty() {
                last_new = std::time::Instant::now();
            }
            for item in todo {
                if let Some(init) = &item.init {
                    let iu = join(&url, init)?;
                    if init_sent.as_ref() != Some(&iu) {
                        let bytes = self.text(&iu).await?;
                        self.send(bytes.into()).await?;
                        init_sent = Some(iu);
                    }
                }
                let su = join(&url, &item.uri)?;
                let mut resp = self.get(&su).await?;
                while let Some(c) = Self::chunk(&mut resp).await? {
                    self.send(c).await?;
                }
                last = Some(item.msn);
            }
            if ended {
                return Ok(());
            }
            if last_new.elapsed() > STALL_TIMEOUT {
                return Err(format!(
                    "the HLS source {url} listed no new segment for {} s",
                    STALL_TIMEOUT.as_secs()
                ));
            }
            // half a target duration (RFC 8216 §6.3.4), but never longer than `MAX_RELOAD`: the target comes
            // from the remote playlist (`#EXT-X-TARGETDURATION:86400` would park this task, and the pipeline's
            // reader with it, for half a day), and the stall check above must come round
            let reload =
                Duration::from_millis(target_duration_s.saturating_mul(500)).min(MAX_RELOAD);
            tokio::select! {
                _ = tokio::time::sleep(reload) => {}
                _ = self.tx.closed() => return Ok(()),
            }
            body = self.text(&url).await?;
        }
    }
}

#[cfg(test)]
mod tests;
