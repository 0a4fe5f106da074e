//! LL-DASH from the same CMAF chunks: the dynamic MPD, segments streamed chunk by chunk while they are produced,
//! and ffmpeg playing the MPD.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use kiln_integration::{ffmpeg_frames_with, small_stream_spec, Daemon};

async fn start() -> Result<Daemon> {
    let d = Daemon::start_default().await?;
    let (st, body) = d.put_stream("d", small_stream_spec()).await?;
    ensure!(st == 201, "PUT: {st} {body}");
    Ok(d)
}

fn attr<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let i = xml.find(&format!(" {name}=\""))? + name.len() + 3;
    Some(&xml[i..i + xml[i..].find('"')?])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mpd_is_dynamic_low_latency_and_addresses_the_hls_segments() -> Result<()> {
    let d = start().await?;
    let pl = d.wait_for_segments("d", "hi", 1).await?;
    let (st, mpd) = d.get_text("/live/d/manifest.mpd").await?;
    ensure!(st == 200, "{st}");
    ensure!(attr(&mpd, "type") == Some("dynamic"));
    ensure!(attr(&mpd, "availabilityTimeComplete") == Some("false"));
    let ato: f64 = attr(&mpd, "availabilityTimeOffset")
        .context("ATO")?
        .parse()?;
    ensure!(
        (ato - (2.0 - pl.part_target)).abs() < 0.01,
        "availabilityTimeOffset {ato}"
    );
    ensure!(mpd.contains(r#"media="hi/seg-$Number$.m4s""#) && mpd.contains("<UTCTiming"));
    ensure!(mpd.matches("<Representation").count() == 3);
    // $Number$ is the HLS media sequence number: segment n of the MPD is seg-n.m4s of the playlist
    let start: u64 = attr(&mpd, "startNumber").context("startNumber")?.parse()?;
    ensure!(
        start <= pl.media_sequence && pl.media_sequence - start < 5,
        "startNumber {start} vs MSN {}",
        pl.media_sequence
    );
    // prepared once per publish, not rendered per request: its publishTime is when it was rendered, so of 30
    // requests 10 ms apart most follow one with the same publishTime (a part boundary, about three a second,
    // changes it once); rendered per request, none would
    let mut times = Vec::new();
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    for _ in 0..30 {
        pace.tick().await;
        let (_, mpd) = d.get_text("/live/d/manifest.mpd").await?;
        times.push(
            attr(&mpd, "publishTime")
                .context("publishTime")?
                .to_string(),
        );
    }
    let same = times.windows(2).filter(|w| w[0] == w[1]).count();
    ensure!(
        same >= 15,
        "{same} of 29 MPDs had the publishTime of the one before: {times:?}"
    );
    // the clock endpoint
    let (_, t) = d.get_text("/time").await?;
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() % 60;
    let server_s: u64 = t[17..19].parse()?;
    ensure!(
        now_s.abs_diff(server_s) <= 1 || now_s.abs_diff(server_s) == 59,
        "/time says {t}"
    );
    d.shutdown().await
}

/// Over HTTP/1.1 (chunked) and HTTP/2 (h2c, where the origin times every piece of an answer, its end included:
/// kiln_http::http2), at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_segment_is_streamed_part_by_part() -> Result<()> {
    let d = start().await?;
    let pl = d.wait_for_segments("d", "hi", 1).await?;
    let (m, _) = pl.last_part().context("parts")?;
    // the next segment: requested before it exists, as an LL-DASH client does with availabilityTimeOffset
    let url = d.url(&format!("/live/d/hi/seg-{}.m4s", m + 1));
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build()?;
    let read = |client: reqwest::Client, version: reqwest::Version| {
        let url = url.clone();
        async move {
            let mut res = client.get(&url).send().await?;
            ensure!(res.status() == 200, "{}", res.status());
            ensure!(res.version() == version, "{:?}", res.version());
            ensure!(
                res.headers().get("content-length").is_none(),
                "an open segment has no length yet"
            );
            let t0 = Instant::now();
            let mut chunks = Vec::new();
            let mut body = Vec::new();
            while let Some(c) = res.chunk().await? {
                chunks.push(t0.elapsed());
                body.extend_from_slice(&c);
            }
            anyhow::Ok((chunks, body))
        }
    };
    let (h1, h2) = tokio::join!(
        read(d.http.clone(), reqwest::Version::HTTP_11),
        read(h2, reqwest::Version::HTTP_2)
    );
    let whole = d
        .get_bytes(&format!("/live/d/hi/seg-{}.m4s", m + 1))
        .await?;
    for (how, got) in [("HTTP/1.1", h1), ("HTTP/2", h2)] {
        let (chunks, body) = got.with_context(|| how)?;
        ensure!(chunks.len() >= 4, "{how}: {} chunks", chunks.len());
        let span = *chunks.last().unwrap() - chunks[0];
        ensure!(
            span >= Duration::from_millis(1000),
            "{how}: chunks arrived within {span:?}: not progressive"
        );
        ensure!(
            whole.as_ref() == body.as_slice(),
            "{how}: streamed bytes differ from the complete segment"
        );
    }
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_plays_the_mpd() -> Result<()> {
    let d = start().await?;
    d.wait_for_segments("d", "hi", 1).await?;
    // ffmpeg's DASH demuxer opens the representations one after another, each at the segment of "now", so their
    // starts differ by up to a segment each; 8 s of output leaves every stream at least 2 s.
    let counts = ffmpeg_frames_with(&d.url("/live/d/manifest.mpd"), 8, &["-map", "0"]).await?;
    ensure!(counts.len() == 3, "{counts:?}");
    ensure!(
        counts[0] >= 60 && counts[1] >= 60,
        "video frames {counts:?}"
    );
    ensure!(counts[2] >= 90, "audio frames {counts:?}");
    d.shutdown().await
}
