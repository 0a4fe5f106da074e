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
}

/// Why a source string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("source is empty")]
    Empty,
    #[error("source is too long ({0} bytes, at most {max})", max = Source::MAX_LEN)]
    TooLong(usize),
    #[error("source scheme `{0}` is not supported (supported: test:)")]
    UnsupportedScheme(String),
    #[error("source has no scheme (expected e.g. `test:`)")]
    NoScheme,
    #[error("test source option `{0}` is not understood (supported: pattern=smpte|ball|bars)")]
    BadTestOption(String),
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
            other => Err(SourceError::UnsupportedScheme(
                other.chars().take(32).collect(),
            )),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Test { pattern } => write!(f, "test:pattern={}", pattern.as_str()),
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
