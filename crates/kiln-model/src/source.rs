//! Stream sources, parsed from the `source` string of a stream request.
//!
//! Only schemes kiln knows are accepted; anything else is refused with a reason a client can act on. The parse is
//! strict on purpose: the string never reaches GStreamer as text, the media crate builds elements from the typed
//! value.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The picture a `test:` source draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
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
    /// A network source (`srt://`, `rtsp://`, `rtsps://`, `http://`, `https://`).
    Url { scheme: UrlScheme, url: String },
}

/// Network schemes kiln ingests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// Why a source string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("source is empty")]
    Empty,
    #[error("source is too long ({0} bytes, at most {max})", max = Source::MAX_LEN)]
    TooLong(usize),
    #[error("source scheme `{0}` is not supported (supported: test:, file://, srt://, rtsp://, rtsps://, http://, https://)")]
    UnsupportedScheme(String),
    #[error("source has no scheme (expected e.g. `test:`)")]
    NoScheme,
    #[error("test source option `{0}` is not understood (supported: pattern=smpte|ball|bars)")]
    BadTestOption(String),
    #[error("file source `{0}`: use file:///relative/path.ext under the media directory (letters, digits, `._-/`; no `..`, no host)")]
    BadFilePath(String),
    #[error("URL source is malformed: {0}")]
    BadUrl(String),
}

impl Source {
    /// Longest source string accepted.
    pub const MAX_LEN: usize = 2048;

    /// Parses a source string such as `test:` or `test:pattern=ball`.
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
                let mut pattern = TestPattern::default();
                for opt in rest.split([',', '&']).filter(|o| !o.is_empty()) {
                    match opt.split_once('=') {
                        Some(("pattern", v)) => {
                            pattern = TestPattern::parse(v)
                                .ok_or_else(|| SourceError::BadTestOption(opt.to_string()))?
                        }
                        _ => return Err(SourceError::BadTestOption(opt.to_string())),
                    }
                }
                Ok(Source::Test { pattern })
            }
            "file" => parse_file(rest),
            sch if UrlScheme::parse(sch).is_some() => {
                let scheme = UrlScheme::parse(sch).expect("checked");
                check_url(rest)?;
                Ok(Source::Url {
                    scheme,
                    url: format!("{sch}:{rest}"),
                })
            }
            other => Err(SourceError::UnsupportedScheme(
                other.chars().take(32).collect(),
            )),
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

fn check_url(rest: &str) -> Result<(), SourceError> {
    let bad = |why: &str| SourceError::BadUrl(format!("{why} in `{}`", shorten(rest)));
    let authority_and_path = rest.strip_prefix("//").ok_or_else(|| bad("no `//`"))?;
    if rest
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == '\\')
    {
        return Err(bad("whitespace, control characters or backslashes"));
    }
    let authority = authority_and_path
        .split(['/', '?', '#'])
        .next()
        .unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("");
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if let Some(port) = host_port.rsplit_once("]:").map(|(_, p)| p).or_else(|| {
        (!host_port.starts_with('['))
            .then(|| host_port.split_once(':').map(|(_, p)| p))
            .flatten()
    }) {
        if port.parse::<u16>().is_err() {
            return Err(bad("a bad port"));
        }
    }
    Ok(())
}

impl Source {
    /// Whether the source delivers encoded media that kiln must decode (everything but `test:`).
    pub fn is_encoded(&self) -> bool {
        !matches!(self, Source::Test { .. })
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Test { pattern } => write!(f, "test:pattern={}", pattern.as_str()),
            Source::File { path } => write!(f, "file:///{path}"),
            Source::Url { url, .. } => f.write_str(url),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_test_sources() {
        assert_eq!(
            Source::parse("test:").unwrap(),
            Source::Test {
                pattern: TestPattern::Smpte
            }
        );
        assert_eq!(
            Source::parse("TEST:pattern=ball").unwrap(),
            Source::Test {
                pattern: TestPattern::Ball
            }
        );
        let s = Source::parse("test:pattern=bars").unwrap();
        assert_eq!(Source::parse(&s.to_string()).unwrap(), s);
    }

    #[test]
    fn parses_files_and_urls_and_refuses_hostile_ones() {
        assert_eq!(
            Source::parse("file:///clips/a-1.mp4").unwrap(),
            Source::File {
                path: "clips/a-1.mp4".into()
            }
        );
        for bad in [
            "file:///../etc/passwd",
            "file:///clips/../../x.mp4",
            "file://host/a.mp4",
            "file:/a.mp4",
            "file:///",
            "file:///a//b.mp4",
            "file:///.hidden.mp4",
            "file:///a b.mp4",
            "file:///a%2e%2e/b.mp4",
            "file:///a;rm.mp4",
        ] {
            assert!(
                matches!(Source::parse(bad), Err(SourceError::BadFilePath(_))),
                "{bad}: {:?}",
                Source::parse(bad)
            );
        }
        let u = Source::parse("srt://203.0.113.5:9000?streamid=abc").unwrap();
        assert!(matches!(
            u,
            Source::Url {
                scheme: UrlScheme::Srt,
                ..
            }
        ));
        assert_eq!(u.to_string(), "srt://203.0.113.5:9000?streamid=abc");
        assert!(Source::parse("rtsp://user:pw@cam.example/live").is_ok());
        assert!(Source::parse("https://[2001:db8::1]:8443/a.m3u8").is_ok());
        for bad in [
            "http://",
            "http:/x",
            "rtsp://cam:99999/x",
            "http://a b/",
            "http://x/\u{7}",
            "srt://:9000",
        ] {
            assert!(
                matches!(Source::parse(bad), Err(SourceError::BadUrl(_))),
                "{bad}: {:?}",
                Source::parse(bad)
            );
        }
        assert!(!Source::parse("test:").unwrap().is_encoded());
        assert!(Source::parse("file:///a.mp4").unwrap().is_encoded());
    }

    #[test]
    fn refuses_what_it_does_not_know() {
        assert_eq!(Source::parse(""), Err(SourceError::Empty));
        assert_eq!(Source::parse("nothing"), Err(SourceError::NoScheme));
        assert!(matches!(
            Source::parse("gopher://x"),
            Err(SourceError::UnsupportedScheme(s)) if s == "gopher"
        ));
        assert!(matches!(
            Source::parse("test:pattern=snow"),
            Err(SourceError::BadTestOption(_))
        ));
        assert!(matches!(
            Source::parse("test:videotestsrc ! fakesink"),
            Err(SourceError::BadTestOption(_))
        ));
        assert!(matches!(
            Source::parse(&"test:".repeat(1000)),
            Err(SourceError::TooLong(_))
        ));
    }
}
