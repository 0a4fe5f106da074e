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
    let Source::Srt(srt) = &u else {
        panic!("{u:?}")
    };
    assert_eq!(srt.mode, SrtMode::Caller);
    assert_eq!(srt.host, Some(Host::Ip("203.0.113.5".parse().unwrap())));
    assert_eq!(srt.stream_id.as_deref(), Some("abc"));
    assert_eq!(
        u.to_string(),
        "srt://203.0.113.5:9000?mode=caller&streamid=abc"
    );
    assert_eq!(Source::parse(&u.to_string()).unwrap(), u);
    let r = Source::parse("rtsp://user:p%40ss@Cam.Example/live?ch=1").unwrap();
    assert_eq!(
        r,
        Source::Rtsp(RtspSource {
            tls: false,
            host: Host::Name("cam.example".into()),
            port: 554,
            path: "/live?ch=1".into(),
            user: Some("user".into()),
            password: Some("p@ss".into()),
        })
    );
    assert!(!r.to_string().contains("p@ss") && !r.to_string().contains("p%40ss"));
    let h = Source::parse("https://[2001:db8::1]:8443/a.ts").unwrap();
    let Source::Http(http) = &h else {
        panic!("{h:?}")
    };
    assert_eq!(http.url(), "https://[2001:db8::1]:8443/a.ts");
    for bad in [
        "http://",
        "http:/x",
        "rtsp://cam:99999/x",
        "rtsp://cam:0/x",
        "http://a b/",
        "http://x/\u{7}",
        "srt://:9000",
        "srt://h",
        "http://2130706433/",
        "http://0x7f.1/",
        "http://127.1/",
        "http://[127.0.0.1]/",
        "http://::1/",
        "http://u:p@h/",
        "srt://u@h:1",
        "http://h/#frag",
        "http://h/../x",
        "http://h\\@evil/",
        "http://h%2eevil/",
        "http://é.example/",
        "srt://h:1/path",
        "srt://name.example:9000?mode=listener",
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

#[test]
fn srt_parameters_are_read_once_each_and_only_known_ones() {
    // the adversarial case: one check saw `listener`, GStreamer used the last `mode`
    for dup in [
        "srt://127.0.0.1:9000?mode=listener&mode=caller",
        "srt://127.0.0.1:9000?mode=caller&mode=listener",
        "srt://10.0.0.1:9000?streamid=a&streamid=b",
    ] {
        assert!(
            matches!(Source::parse(dup), Err(SourceError::DuplicateParameter(_))),
            "{dup}: {:?}",
            Source::parse(dup)
        );
    }
    for unknown in [
        "srt://127.0.0.1:9000?MODE=listener",
        "srt://127.0.0.1:9000?m%6fde=listener",
        "srt://127.0.0.1:9000?mode=server",
        "srt://127.0.0.1:9000?mode=rendezvous",
        "srt://127.0.0.1:9000?mode=",
        "srt://127.0.0.1:9000?=x",
        "srt://127.0.0.1:9000?mode",
        "srt://127.0.0.1:9000?localaddress=1.2.3.4",
        "srt://127.0.0.1:9000?passphrase=short",
        "srt://127.0.0.1:9000?pbkeylen=16",
        "srt://127.0.0.1:9000?latency=-1",
        "srt://127.0.0.1:9000?streamid=%ZZ",
        "srt://127.0.0.1:9000?streamid=%0a",
    ] {
        let r = Source::parse(unknown);
        assert!(
            matches!(
                r,
                Err(SourceError::UnknownParameter { .. } | SourceError::BadParameter { .. })
            ),
            "{unknown}: {r:?}"
        );
    }
    let l =
        Source::parse("srt://:9000?mode=listener&latency=200&passphrase=0123456789&pbkeylen=32")
            .unwrap();
    assert_eq!(
        l,
        Source::Srt(SrtSource {
            mode: SrtMode::Listener,
            host: None,
            port: 9000,
            stream_id: None,
            passphrase: Some("0123456789".into()),
            key_length: Some(32),
            latency_ms: Some(200),
        })
    );
    assert_eq!(l.remote_host(), None, "a listener connects nowhere");
    assert!(!l.to_string().contains("0123456789"));
    let c = Source::parse("srt://[::1]:9000?streamid=%23%21%3A%3A").unwrap();
    let Source::Srt(srt) = &c else { panic!() };
    assert_eq!(srt.stream_id.as_deref(), Some("#!::"));
    assert_eq!(
        c.remote_host().map(|(h, p)| (h.to_string(), p)),
        Some(("[::1]".into(), 9000))
    );
    assert!(matches!(
        Source::parse("test:pattern=ball&pattern=smpte"),
        Err(SourceError::DuplicateParameter(_))
    ));
}

use proptest::prelude::*;

fn param_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("mode".to_string()),
        Just("streamid".to_string()),
        Just("latency".to_string()),
        Just("passphrase".to_string()),
        Just("pbkeylen".to_string()),
        "[a-zA-Z%0-9]{1,8}",
    ]
}

fn param_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("caller".to_string()),
        Just("listener".to_string()),
        Just("LISTENER".to_string()),
        Just("server".to_string()),
        Just("%6c%69stener".to_string()),
        Just(String::new()),
        "[a-z0-9%=&]{0,12}",
    ]
}

proptest! {
    /// Whatever the query, an SRT source is either refused or has exactly the meaning a second parse of its
    /// canonical form has: no parameter is read twice, and mode is never listener unless the one and only
    /// `mode` value (percent-decoded) is `listener` (so a source that connects is never taken for one that
    /// does not).
    #[test]
    fn srt_queries_mean_one_thing(params in proptest::collection::vec((param_name(), param_value()), 0..5)) {
        let q: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let src = format!("srt://127.0.0.1:9000?{}", q.join("&"));
        if let Ok(parsed) = Source::parse(&src) {
            let modes: Vec<&String> = params.iter().filter(|(k, _)| k == "mode").map(|(_, v)| v).collect();
            let Source::Srt(srt) = &parsed else { panic!("{parsed:?}") };
            prop_assert!(modes.len() <= 1, "{src} accepted with {} modes", modes.len());
            let names: Vec<&String> = params.iter().map(|(k, _)| k).collect();
            for (i, n) in names.iter().enumerate() {
                prop_assert!(!names[i + 1..].contains(n), "{src}: `{n}` twice");
            }
            let decoded: Vec<String> = modes.iter().map(|m| percent_decode(m).unwrap_or_default()).collect();
            prop_assert_eq!(srt.mode == SrtMode::Listener, decoded == ["listener"]);
            prop_assert_eq!(parsed.remote_host().is_none(), srt.mode == SrtMode::Listener);
            if srt.passphrase.is_none() {
                let again = Source::parse(&parsed.to_string());
                prop_assert_eq!(again.as_ref(), Ok(&parsed));
            }
        }
    }

    /// Any host spelling either parses to a host the daemon can check (an address, or a plain lower-case
    /// name that is not an address in disguise), or is refused.
    #[test]
    fn hosts_are_addresses_or_plain_names(host in "[0-9a-fA-FxX.:%\\[\\]@-]{1,20}", scheme in "(srt|rtsp|http|https)") {
        let src = format!("{scheme}://{host}:9000/");
        let src = if scheme == "srt" { src.trim_end_matches('/').to_string() } else { src };
        if let Ok(parsed) = Source::parse(&src) {
            let (h, _) = parsed.remote_host().expect("a caller source connects");
            match h {
                Host::Ip(_) => {}
                Host::Name(n) => {
                    prop_assert!(n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-'), "{n}");
                    prop_assert!(n.parse::<IpAddr>().is_err());
                    let numeric = n.split('.').all(|l| l.bytes().all(|b| b.is_ascii_digit()) || l.starts_with("0x"));
                    prop_assert!(!numeric, "{n} is an address in another spelling");
                }
            }
        }
    }
}
