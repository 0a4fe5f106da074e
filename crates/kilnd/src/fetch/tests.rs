use super::*;
use axum::response::{IntoResponse, Redirect};
use axum::routing::get;

async fn server() -> (String, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new()
        .route("/ok", get(|| async { vec![7u8; 1000] }))
        .route("/empty", get(|| async { Vec::<u8>::new() }))
        .route(
            "/missing",
            get(|| async { axum::http::StatusCode::NOT_FOUND }),
        )
        .route("/loop", get(|| async { Redirect::temporary("/loop") }))
        .route(
            "/to-metadata",
            get(|| async { Redirect::temporary("http://169.254.169.254/latest/meta-data/") }),
        )
        .route(
            "/drip",
            get(|| async {
                // 10 bytes every 20 ms, for ever: never a stall, always too slow
                let drip = futures::stream::unfold((), |()| async {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Some((
                        Ok::<_, std::io::Error>(bytes::Bytes::from_static(&[1; 10])),
                        (),
                    ))
                });
                axum::body::Body::from_stream(drip)
            }),
        )
        .route(
            "/to-ok",
            get(|| async { Redirect::temporary("/ok").into_response() }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let h = tokio::spawn(async move {
        axum::serve(l, app).await.unwrap();
    });
    (url, h)
}

async fn get_to(f: &Fetcher, url: &str) -> (Result<u64, String>, Vec<u8>, Vec<(u64, Option<u64>)>) {
    let dir = std::env::temp_dir().join(format!("kiln-fetch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dest = dir.join(url.replace(['/', ':', '[', ']'], "_"));
    let mut seen = Vec::new();
    let r = f
        .fetch(url, &dest, &AtomicBool::new(false), &mut |a, b| {
            seen.push((a, b))
        })
        .await;
    let bytes = std::fs::read(&dest).unwrap_or_default();
    let _ = std::fs::remove_file(&dest);
    (r, bytes, seen)
}

#[tokio::test]
async fn internal_addresses_are_refused_before_any_connection() {
    // a listener that must never see a connection
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let f = Fetcher::new(UrlPolicy::default(), 1 << 20).unwrap();
    for (url, want) in [
        (
            format!("http://127.0.0.1:{port}/a.mp4"),
            "127.0.0.1 is a loopback address",
        ),
        (
            format!("http://localhost:{port}/a.mp4"),
            "localhost resolves to",
        ),
        (format!("http://[::ffff:127.0.0.1]:{port}/"), "loopback"),
        (
            "http://169.254.169.254/latest/meta-data/".into(),
            "link-local",
        ),
        ("http://10.0.0.1/".into(), "private"),
        ("http://[fe80::1]/".into(), "link-local"),
    ] {
        let (r, _, _) = get_to(&f, &url).await;
        let e = r.expect_err(&url);
        assert!(e.contains(want), "{url}: {e}");
        assert!(
            e.contains("--allow-networks"),
            "{url}: the error names the flag: {e}"
        );
    }
    let accepted = tokio::time::timeout(Duration::from_millis(200), l.accept())
        .await
        .is_ok();
    assert!(!accepted, "a refused URL reached the listener");
}

#[tokio::test]
async fn live_sources_are_checked_by_address_and_listeners_are_not() {
    let p = UrlPolicy::default();
    let check = |p: UrlPolicy, src: &'static str| async move {
        check_source(&p, &Source::parse(src).expect(src)).await
    };
    for (src, want) in [
        ("rtsp://10.0.0.1/cam", "private"),
        ("rtsp://[fe80::1]:554/cam", "link-local"),
        ("srt://127.0.0.1:9000?streamid=x", "loopback"),
        ("srt://localhost:9000", "localhost resolves to"),
        ("http://169.254.169.254/latest", "link-local"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
    ] {
        let e = check(p.clone(), src).await.expect_err(src);
        assert!(
            e.contains(want) && e.contains("--allow-networks"),
            "{src}: {e}"
        );
    }
    // public literal addresses need no lookup and are what the pipeline connects to; a listener binds locally
    let public: IpAddr = "8.8.8.8".parse().unwrap();
    assert_eq!(
        check(p.clone(), "rtsp://8.8.8.8/cam").await,
        Ok(Some(public))
    );
    assert_eq!(
        check(p.clone(), "srt://0.0.0.0:9000?mode=listener").await,
        Ok(None)
    );
    assert_eq!(check(p.clone(), "test:").await, Ok(None));
    let lan = UrlPolicy::parse("10.0.0.0/8,127.0.0.1").unwrap();
    let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
    assert_eq!(
        check(lan.clone(), "rtsp://10.2.3.4/cam").await,
        Ok(ip("10.2.3.4"))
    );
    assert_eq!(
        check(lan.clone(), "srt://127.0.0.1:9000").await,
        Ok(ip("127.0.0.1"))
    );
    // a name is resolved once here, and the pipeline is given the address
    let lo = UrlPolicy::parse("127.0.0.0/8,::1").unwrap();
    let a = check(lo, "srt://localhost:9000").await;
    assert_eq!(
        a.clone().ok().flatten().map(|a| a.is_loopback()),
        Some(true),
        "{a:?}"
    );
}

#[tokio::test]
async fn allowed_fetches_check_status_size_redirects_and_bodies() {
    let (base, h) = server().await;
    let policy = UrlPolicy::parse("127.0.0.1/32").unwrap();
    let f = Fetcher::new(policy.clone(), 1 << 20).unwrap();
    let (r, bytes, seen) = get_to(&f, &format!("{base}/ok")).await;
    assert_eq!(r, Ok(1000));
    assert_eq!(bytes, vec![7u8; 1000]);
    assert_eq!(seen.last(), Some(&(1000, Some(1000))));
    let (r, bytes, _) = get_to(&f, &format!("{base}/to-ok")).await;
    assert_eq!(
        (r, bytes.len()),
        (Ok(1000), 1000),
        "a redirect within the policy is followed"
    );
    for (path, want) in [
        ("/missing", "404"),
        ("/empty", "empty body"),
        ("/loop", "more than 5 redirects"),
        (
            "/to-metadata",
            "redirected to http://169.254.169.254/latest/meta-data/",
        ),
    ] {
        let (r, _, _) = get_to(&f, &format!("{base}{path}")).await;
        let e = r.expect_err(path);
        assert!(e.contains(want), "{path}: {e}");
    }
    let small = Fetcher::new(policy, 999).unwrap();
    let e = get_to(&small, &format!("{base}/ok")).await.0.unwrap_err();
    assert!(e.contains("1000 bytes, more than the 999"), "{e}");
    // a closed port is a clear connection error
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let e = get_to(&f, &format!("http://127.0.0.1:{closed}/x"))
        .await
        .0
        .unwrap_err();
    assert!(e.to_lowercase().contains("refused"), "{e}");
    h.abort();
}

#[tokio::test]
async fn a_download_slower_than_the_floor_fails_and_one_above_it_does_not() {
    let (base, h) = server().await;
    let policy = UrlPolicy::parse("127.0.0.1/32").unwrap();
    let mut f = Fetcher::new(policy, 1 << 20).unwrap();
    // 500 B/s against a floor of 2,000 bytes every 300 ms
    f.floor = (Duration::from_millis(300), 2_000);
    let (r, bytes, _) = get_to(&f, &format!("{base}/drip")).await;
    let e = r.unwrap_err();
    assert!(e.contains("slower than a download must go"), "{e}");
    assert!(
        bytes.len() < 1_000,
        "it ended within a window or two: {}",
        bytes.len()
    );
    // the same drip clears a floor below its rate (the size limit ends it instead)
    f.floor = (Duration::from_millis(300), 50);
    f.max_bytes = 400;
    let e = get_to(&f, &format!("{base}/drip")).await.0.unwrap_err();
    assert!(e.contains("more than the 400 bytes"), "{e}");
    h.abort();
}

/// A pulled HLS playlist is reloaded within `MAX_RELOAD` whatever target duration it declares: a day-long
/// `EXT-X-TARGETDURATION` would otherwise park the puller (and the pipeline's reader) for half a day.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pulled_playlist_is_reloaded_within_seconds_whatever_its_target_duration() {
    use std::sync::atomic::AtomicUsize;
    let loads = Arc::new(AtomicUsize::new(0));
    let seen = loads.clone();
    let app = axum::Router::new()
        .route(
            "/live.m3u8",
            get(move || {
                let n = seen.fetch_add(1, Ordering::SeqCst);
                async move {
                    let mut text = String::from(
                        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:86400\n#EXT-X-MEDIA-SEQUENCE:0\n\
                         #EXTINF:2.0,\nseg0.ts\n",
                    );
                    if n > 0 {
                        text.push_str("#EXTINF:2.0,\nseg1.ts\n");
                    }
                    text
                }
            }),
        )
        .route("/seg0.ts", get(|| async { "AAAA" }))
        .route("/seg1.ts", get(|| async { "BBBB" }));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/live.m3u8", l.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    let f = Fetcher::new(UrlPolicy::parse("127.0.0.1/32").unwrap(), 1 << 20).unwrap();
    let mut body = f
        .open_live(&tokio::runtime::Handle::current(), url)
        .unwrap();
    let read = tokio::task::spawn_blocking(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while got.len() < 8 {
            match std::io::Read::read(&mut body, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    });
    let got = tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("the second segment came within 20 s")
        .unwrap();
    assert_eq!(got, b"AAAABBBB");
    assert!(loads.load(Ordering::SeqCst) >= 2);
    server.abort();
}
