//! Stream sources, parsed from the `source` string of a stream request.
//!
//! Only schemes kiln knows are accepted; anything else is refused with a reason a client can act on. The parse is
//! strict on purpose: the string never reaches GStreamer as text, the media crate builds elements from the typed
//! value.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The picture a `test:` source draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum TestPattern {
    /// SMPTE colour bars (with a moving element so the encoder has motion to code).
    #[default]
    Smpte,
    /// A moving ball on black: cheap to encode, good for small test streams.
    Ball,
    /// Pure colour bars without noise.
    Bars,
}

impl TestPattern {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "smpte" => Some(Self::Smpte),
            "ball" => Some(Self::Ball),
            "bars" => Some(Self::Bars),
            _ => None,
        }
    }

    /// The name used in `test:pattern=…`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Smpte => "smpte",
            Self::Ball => "ball",
            Self::Bars => "bars",
        }
    }
}

/// A typed stream source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A synthetic live source: test picture with a wall-clock overlay, plus a sine tone.
    Test { pattern: TestPattern },
    /// A media file under the daemon's media directory, looped and paced at real time: `file:///clips/a.mp4`
    /// names `<media dir>/clips/a.mp4`. `path` is relative, with only safe characters and no `.`/`..` parts; the
    /// daemon still resolves symlinks and checks the result stays inside its directory.
    File { path: String },
    /// `srt://host:port?mode=caller|listener&streamid=…&passphrase=…&pbkeylen=…&latency=…`.
    Srt(SrtSource),
    /// `rtsp://[user:password@]host[:port]/path` (and `rtsps://`).
    Rtsp(RtspSource),
    /// `http(s)://host[:port]/path?query`: a progressive stream (MPEG-TS, FLV, MP4, …) that the daemon fetches
    /// itself. HLS/DASH playlists are not media and are refused when they arrive.
    Http(HttpSource),
    /// `publish:`: the stream waits for a publisher to push to the daemon's RTMP or SRT listener with the
    /// stream's key (RTMP) or id and passphrase (SRT).
    Publish,
}

/// A host as written in a source: an address, or a name (lower case) the daemon resolves and checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            Host::Ip(a) => write!(f, "{a}"),
            Host::Name(n) => f.write_str(n),
        }
    }
}

/// Who opens an SRT connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SrtMode {
    /// kiln connects to the sender (`host:port`).
    Caller,
    /// kiln binds `port` (on `host` when it is an address, on every address when it is absent) and waits.
    Listener,
}

/// An SRT source. Every field comes from one strict parse; the media crate sets the element's properties from
/// these fields, never from the source string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrtSource {
    pub mode: SrtMode,
    /// The peer (caller) or the local address to bind (listener; `None` binds every address).
    pub host: Option<Host>,
    pub port: u16,
    pub stream_id: Option<String>,
    pub passphrase: Option<String>,
    /// AES key length in bytes: 16, 24 or 32.
    pub key_length: Option<u8>,
    pub latency_ms: Option<u32>,
}

/// An RTSP camera or server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtspSource {
    pub tls: bool,
    pub host: Host,
    pub port: u16,
    /// Path and query, as the server expects them (starts with `/`).
    pub path: String,
    pub user: Option<String>,
    pub password: Option<String>,
}

/// A progressive HTTP(S) stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSource {
    pub tls: bool,
    pub host: Host,
    pub port: u16,
    /// Path and query (starts with `/`).
    pub path: String,
}

impl HttpSource {
    /// The URL to request.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}:{}{}", self.host, self.port, self.path)
    }
}

/// Network schemes kiln ingests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum UrlScheme {
    Srt,
    Rtsp,
    Rtsps,
    Http,
    Https,
}

impl UrlScheme {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "srt" => Self::Srt,
            "rtsp" => Self::Rtsp,
            "rtsps" => Self::Rtsps,
            "http" => Self::Http,
            "https" => Self::Https,
            _ => return None,
        })
    }

    fn default_port(self) -> Option<u16> {
        match self {
            Self::Srt => None,
            Self::Rtsp => Some(554),
            Self::Rtsps => Some(322),
            Self::Http => Some(80),
            Self::Https => Some(443),
        }
    }
}

/// Why a source string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("source is empty")]
    Empty,
    #[error("a publish source takes no options: write `publish:` and put the key in `ingest`")]
    BadPublishOption,
    #[error("source is too long ({0} bytes, at most {max})", max = Source::MAX_LEN)]
    TooLong(usize),
    #[error("source scheme `{0}` is not supported (supported: test:, publish:, file://, srt://, rtsp://, rtsps://, http://, https://)")]
    UnsupportedScheme(String),
    #[error("source has no scheme (expected e.g. `test:`)")]
    NoScheme,
    #[error("test source option `{0}` is not understood (supported: pattern=smpte|ball|bars)")]
    BadTestOption(String),
    #[error("file source `{0}`: use file:///relative/path.ext under the media directory (letters, digits, `._-/`; no `..`, no host)")]
    BadFilePath(String),
    #[error("URL source is malformed: {0}")]
    BadUrl(String),
    #[error("source parameter `{0}` is given twice: each parameter may appear once")]
    DuplicateParameter(String),
    #[error(
        "source parameter `{name}` is not understood for {scheme}:// (supported: {supported})"
    )]
    UnknownParameter {
        name: String,
        scheme: &'static str,
        supported: &'static str,
    },
    #[error("source parameter `{name}`: {why}")]
    BadParameter { name: String, why: String },
}

/// SRT parameters kiln understands.
const SRT_PARAMS: &str = "mode, streamid, passphrase, pbkeylen, latency";

impl Source {
    /// Longest source string accepted.
    pub const MAX_LEN: usize = 2048;

    /// Parses a source string such as `test:` or `srt://203.0.113.5:9000?streamid=cam1`.
    pub fn parse(s: &str) -> Result<Self, SourceError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(SourceError::Empty);
        }
        if s.len() > Self::MAX_LEN {
            return Err(SourceError::TooLong(s.len()));
        }
        let Some((scheme, rest)) = s.split_once(':') else {
            return Err(SourceError::NoScheme);
        };
        match scheme.to_ascii_lowercase().as_str() {
            "test" => {
                let mut pattern = None;
                for opt in rest.split([',', '&']).filter(|o| !o.is_empty()) {
                    match opt.split_once('=') {
                        Some(("pattern", v)) if pattern.is_none() => {
                            pattern = Some(
                                TestPattern::parse(v)
                                    .ok_or_else(|| SourceError::BadTestOption(opt.to_string()))?,
                            )
                        }
                        Some(("pattern", _)) => {
                            return Err(SourceError::DuplicateParameter("pattern".into()))
                        }
                        _ => return Err(SourceError::BadTestOption(opt.to_string())),
                    }
                }
                Ok(Source::Test {
                    pattern: pattern.unwrap_or_default(),
                })
            }
            "file" => parse_file(rest),
            "publish" if rest.is_empty() => Ok(Source::Publish),
            "publish" => Err(SourceError::BadPublishOption),
            sch => match UrlScheme::parse(sch) {
                Some(scheme) => parse_url(scheme, rest),
                None => Err(SourceError::UnsupportedScheme(
                    sch.chars().take(32).collect(),
                )),
            },
        }
    }

    /// Whether the source delivers encoded media that kiln must decode (everything but `test:`).
    pub fn is_encoded(&self) -> bool {
        !matches!(self, Source::Test { .. })
    }

    /// Whether the stream waits for a publisher (`publish:`).
    pub fn is_publish(&self) -> bool {
        matches!(self, Source::Publish)
    }

    /// Whether the source is a live feed kiln pulls (`srt://`, `rtsp(s)://`, `http(s)://`): one that can be lost
    /// and retried, with the slate standing in meanwhile.
    pub fn is_pulled_live(&self) -> bool {
        matches!(self, Source::Srt(_) | Source::Rtsp(_) | Source::Http(_))
    }

    /// Whether the stream survives the loss of its source (a publisher, or a pulled live feed): the slate
    /// stands in, and `on_source_loss` applies.
    pub fn is_resilient(&self) -> bool {
        self.is_publish() || self.is_pulled_live()
    }

    /// The host kiln connects to, if it connects anywhere (an SRT listener and local sources do not).
    pub fn remote_host(&self) -> Option<(&Host, u16)> {
        match self {
            Source::Srt(SrtSource {
                mode: SrtMode::Caller,
                host: Some(h),
                port,
                ..
            }) => Some((h, *port)),
            Source::Rtsp(r) => Some((&r.host, r.port)),
            Source::Http(h) => Some((&h.host, h.port)),
            _ => None,
        }
    }
}

fn shorten(s: &str) -> String {
    s.chars().take(80).collect()
}

fn parse_file(rest: &str) -> Result<Source, SourceError> {
    let bad = || SourceError::BadFilePath(shorten(rest));
    // file:///a/b.mp4 (empty host) only: a host would mean another machine
    let path = rest.strip_prefix("///").ok_or_else(bad)?;
    let ok_chars = path
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
    let parts: Vec<&str> = path.split('/').collect();
    if path.is_empty()
        || !ok_chars
        || parts
            .iter()
            .any(|p| p.is_empty() || *p == "." || *p == ".." || p.starts_with('.'))
    {
        return Err(bad());
    }
    Ok(Source::File {
        path: path.to_string(),
    })
}

/// The authority of `//authority/path?query#fragment`, split by hand so that every scheme (hierarchical or not
/// in the WHATWG sense) reads the same way: `(userinfo, host, host was in brackets, port, path-and-query)`.
type Parts<'a> = (Option<&'a str>, &'a str, bool, Option<&'a str>, &'a str);

fn split_url(rest: &str) -> Result<Parts<'_>, String> {
    let body = rest.strip_prefix("//").ok_or("no `//`")?;
    if body.contains('#') {
        return Err("a `#fragment` (nothing is sent for it)".into());
    }
    let end = body.find(['/', '?']).unwrap_or(body.len());
    let (authority, path) = body.split_at(end);
    let (userinfo, host_port) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let bracketed = host_port.starts_with('[');
    let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or("an unclosed `[`")?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':').ok_or("junk after `]`")?)),
        }
    } else {
        match host_port.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        }
    };
    Ok((userinfo, host, bracketed, port, path))
}

/// A host name or address: letters, digits, `-` and `.` only (no percent-encoding, no IDN: write punycode).
fn parse_host(h: &str, bracketed_v6: bool) -> Result<Host, String> {
    if let Ok(ip) = h.parse::<IpAddr>() {
        if ip.is_ipv6() != bracketed_v6 {
            return Err("IPv6 addresses (and only they) are written in brackets".into());
        }
        return Ok(Host::Ip(ip));
    }
    if bracketed_v6 {
        return Err(format!("`[{}]` is not an IPv6 address", shorten(h)));
    }
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !ok {
        return Err(format!("`{}` is not a host name", shorten(h)));
    }
    // All-numeric names (`2130706433`, `0x7f.1`, `127.1`) are addresses in other spellings: the resolver would
    // read them as such. Refuse them rather than guess which address they mean.
    if h.split('.')
        .all(|l| l.bytes().all(|b| b.is_ascii_digit()) || l.to_ascii_lowercase().starts_with("0x"))
    {
        return Err(format!(
            "`{}` is not a host name (write addresses in dotted decimal)",
            shorten(h)
        ));
    }
    Ok(Host::Name(h.to_ascii_lowercase()))
}

/// Decodes `%XX` escapes; refuses a malformed escape and anything that is not UTF-8.
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("a bad `%` escape in `{}`", shorten(s)))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("`{}` is not UTF-8", shorten(s)))
}

/// `key=value&…` into pairs: keys are plain lower-case names (no escapes: `m%6fde` is not `mode`), values are
/// percent-decoded, every key at most once, no empty key or value.
fn query_pairs(query: &str) -> Result<Vec<(String, String)>, SourceError> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for item in query.split('&') {
        let (k, v) = item.split_once('=').unwrap_or((item, ""));
        let bad = |why: &str| SourceError::BadParameter {
            name: shorten(k),
            why: why.into(),
        };
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            return Err(bad("parameter names are lower-case letters"));
        }
        if v.is_empty() {
            return Err(bad("has no value"));
        }
        let v = percent_decode(&v.replace('+', " ")).map_err(|e| bad(&e))?;
        if v.chars().any(char::is_control) {
            return Err(bad("control characters"));
        }
        if pairs.iter().any(|(seen, _)| seen == k) {
            return Err(SourceError::DuplicateParameter(k.to_string()));
        }
        pairs.push((k.to_string(), v));
    }
    Ok(pairs)
}

// Long by design: one strict reading per scheme, each field checked where it is read.
fn parse_url(scheme: UrlScheme, rest: &str) -> Result<Source, SourceError> {
    let bad = |why: &str| SourceError::BadUrl(format!("{why} in `{}`", shorten(rest)));
    if rest
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == '\\' || !c.is_ascii())
    {
        return Err(bad(
            "whitespace, control characters, backslashes or non-ASCII",
        ));
    }
    let (userinfo, host, bracketed, port, path) = split_url(rest).map_err(|e| bad(&e))?;
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad("a bad port"))?,
        ),
        Some(_) => return Err(bad("a bad port")),
    };
    let (path_only, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    if path_only.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(bad("`.` or `..` path segments"));
    }
    match scheme {
        UrlScheme::Srt => {
            if userinfo.is_some() {
                return Err(bad("credentials (use passphrase=)"));
            }
            if !path_only.is_empty() && path_only != "/" {
                return Err(bad("a path (SRT has none; use streamid=)"));
            }
            let port = port.ok_or_else(|| bad("no port"))?;
            let mut srt = SrtSource {
                mode: SrtMode::Caller,
                host: None,
                port,
                stream_id: None,
                passphrase: None,
                key_length: None,
                latency_ms: None,
            };
            let pairs = match query {
                None | Some("") => Vec::new(),
                Some(q) => query_pairs(q)?,
            };
            for (k, v) in pairs {
                let param = |why: &str| SourceError::BadParameter {
                    name: k.clone(),
                    why: why.into(),
                };
                match k.as_str() {
                    "mode" => {
                        srt.mode = match v.as_str() {
                            "caller" => SrtMode::Caller,
                            "listener" => SrtMode::Listener,
                            _ => return Err(param("is caller or listener")),
                        }
                    }
                    "streamid" if v.len() <= 512 => srt.stream_id = Some(v),
                    "streamid" => return Err(param("is at most 512 bytes")),
                    "passphrase" if (10..=79).contains(&v.len()) => srt.passphrase = Some(v),
                    "passphrase" => return Err(param("is 10 to 79 characters")),
                    "pbkeylen" => {
                        srt.key_length = Some(match v.as_str() {
                            "16" => 16,
                            "24" => 24,
                            "32" => 32,
                            _ => return Err(param("is 16, 24 or 32")),
                        })
                    }
                    "latency" => {
                        let ms = v
                            .parse::<u32>()
                            .ok()
                            .filter(|ms| *ms <= 10_000)
                            .ok_or_else(|| param("is 0 to 10000 milliseconds"))?;
                        srt.latency_ms = Some(ms);
                    }
                    _ => {
                        return Err(SourceError::UnknownParameter {
                            name: k,
                            scheme: "srt",
                            supported: SRT_PARAMS,
                        })
                    }
                }
            }
            srt.host = match (srt.mode, host) {
                (SrtMode::Caller, "") => return Err(bad("no host")),
                (SrtMode::Listener, "") => None,
                (SrtMode::Caller, h) => Some(parse_host(h, bracketed).map_err(|e| bad(&e))?),
                (SrtMode::Listener, h) => match parse_host(h, bracketed).map_err(|e| bad(&e))? {
                    Host::Ip(ip) if ip.is_unspecified() => None,
                    Host::Ip(ip) => Some(Host::Ip(ip)),
                    Host::Name(_) => return Err(bad("a listener binds an address, not a name")),
                },
            };
            if srt.key_length.is_some() && srt.passphrase.is_none() {
                return Err(SourceError::BadParameter {
                    name: "pbkeylen".into(),
                    why: "needs passphrase=".into(),
                });
            }
            Ok(Source::Srt(srt))
        }
        UrlScheme::Rtsp | UrlScheme::Rtsps => {
            if host.is_empty() {
                return Err(bad("no host"));
            }
            let (user, password) = match userinfo {
                None => (None, None),
                Some(u) => {
                    let (user, pw) = u.split_once(':').unwrap_or((u, ""));
                    let user = percent_decode(user).map_err(|e| bad(&e))?;
                    let pw = percent_decode(pw).map_err(|e| bad(&e))?;
                    if user.is_empty() || user.chars().chain(pw.chars()).any(char::is_control) {
                        return Err(bad("bad credentials"));
                    }
                    (Some(user), (!pw.is_empty()).then_some(pw))
                }
            };
            Ok(Source::Rtsp(RtspSource {
                tls: scheme == UrlScheme::Rtsps,
                host: parse_host(host, bracketed).map_err(|e| bad(&e))?,
                port: port
                    .or(scheme.default_port())
                    .expect("rtsp has a default port"),
                path: if path.is_empty() {
                    "/".into()
                } else {
                    path.into()
                },
                user,
                password,
            }))
        }
        UrlScheme::Http | UrlScheme::Https => {
            if host.is_empty() {
                return Err(bad("no host"));
            }
            if userinfo.is_some() {
                return Err(bad("credentials (not sent to live HTTP sources)"));
            }
            Ok(Source::Http(HttpSource {
                tls: scheme == UrlScheme::Https,
                host: parse_host(host, bracketed).map_err(|e| bad(&e))?,
                port: port
                    .or(scheme.default_port())
                    .expect("http has a default port"),
                path: if path.is_empty() {
                    "/".into()
                } else {
                    path.into()
                },
            }))
        }
    }
}

impl fmt::Display for Source {
    /// A canonical spelling for logs and the API; SRT passphrases and RTSP passwords are not shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Test { pattern } => write!(f, "test:pattern={}", pattern.as_str()),
            Source::File { path } => write!(f, "file:///{path}"),
            Source::Srt(s) => {
                let host = s.host.as_ref().map(Host::to_string).unwrap_or_default();
                let mode = match s.mode {
                    SrtMode::Caller => "caller",
                    SrtMode::Listener => "listener",
                };
                write!(f, "srt://{host}:{}?mode={mode}", s.port)?;
                if let Some(id) = &s.stream_id {
                    write!(f, "&streamid={}", escape(id))?;
                }
                if s.passphrase.is_some() {
                    f.write_str("&passphrase=hidden")?;
                }
                if let Some(k) = s.key_length {
                    write!(f, "&pbkeylen={k}")?;
                }
                if let Some(l) = s.latency_ms {
                    write!(f, "&latency={l}")?;
                }
                Ok(())
            }
            Source::Rtsp(r) => {
                let scheme = if r.tls { "rtsps" } else { "rtsp" };
                let user = r
                    .user
                    .as_ref()
                    .map(|u| format!("{}@", escape(u)))
                    .unwrap_or_default();
                write!(f, "{scheme}://{user}{}:{}{}", r.host, r.port, r.path)
            }
            Source::Http(h) => f.write_str(&h.url()),
            Source::Publish => f.write_str("publish:"),
        }
    }
}

/// Percent-encodes everything but unreserved characters.
fn escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests;
