//! LL-HLS conformance: one check per item of the checklist in LLHLS.md §5 (an `async fn item_NN_…` each), against
//! real daemons (port 0) running real pipelines. Streams are tiny (320x180 + 160x90 + AAC) so a 2-core host keeps
//! up. Section numbers refer to draft-pantos-hls-rfc8216bis-22.
//!
//! Most items need nothing but a running stream, so they share one: a test function starts a daemon and its
//! streams once, then runs its items in sequence (each under its own name and time limit; every item runs, and
//! the test fails naming each item that failed). `KILN_ITEMS=03,38` runs only those items. The groups:
//! - [`items_on_one_live_stream`]: every item that only reads a live stream (stream `c`), and the delta-update
//!   items 31–32 on a stream with 1 s segments (`s`) started beside it;
//! - [`items_that_end_stall_or_roll_a_stream`]: items that end a stream (14, 30), pause one (29) or need a
//!   3-segment window (19), each on a stream of its own in a daemon with that window;
//! - [`item_18_parts_and_segments_arrive_on_time`]: 30 s of part timing, in nextest's `realtime` group (one such
//!   test at a time, beside up to two others);
//! - [`items_across_a_lost_publisher_and_its_return`]: the playlist items on a `publish:` stream whose window
//!   holds a publisher, the slate after it was killed, and a second publisher.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kiln_integration::{
    fragment, parse_ll, poll_until, small_stream_spec, Daemon, LlPlaylist, Polled,
};
use kiln_llhls::cmaf;

const RENDITIONS: [&str; 3] = ["hi", "lo", "audio"];

/// One live stream (`id`) on a shared daemon.
struct Fx<'a> {
    d: &'a Daemon,
    id: &'static str,
}

impl Fx<'_> {
    fn path(&self, r: &str) -> String {
        format!("/live/{}/{r}/index.m3u8", self.id)
    }

    async fn get(&self, r: &str, query: &str) -> Result<(u16, String)> {
        let q = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        self.d.get_text(&format!("{}{q}", self.path(r))).await
    }

    async fn playlist(&self, r: &str) -> Result<(String, LlPlaylist)> {
        let (st, text) = self.get(r, "").await?;
        ensure!(st == 200, "GET {r}: {st} {text}");
        let pl = parse_ll(&text)?;
        Ok((text, pl))
    }

    /// Blocks until the part after `pl`'s newest part is published; returns the new playlist.
    async fn next(&self, r: &str, pl: &LlPlaylist) -> Result<(String, LlPlaylist)> {
        let (m, p) = pl.last_part().context("no parts")?;
        let (st, text) = self
            .get(r, &format!("_HLS_msn={m}&_HLS_part={}", p + 1))
            .await?;
        ensure!(st == 200, "blocking GET {r}: {st} {text}");
        let pl = parse_ll(&text)?;
        Ok((text, pl))
    }

    async fn segments(&self, r: &str, n: u64) -> Result<LlPlaylist> {
        self.d.wait_for_segments(self.id, r, n).await
    }

    async fn bytes(&self, r: &str, uri: &str) -> Result<bytes::Bytes> {
        self.d
            .get_bytes(&format!("/live/{}/{r}/{uri}", self.id))
            .await
    }

    async fn all_playlists(&self, n: u64) -> Result<BTreeMap<&'static str, LlPlaylist>> {
        let mut m = BTreeMap::new();
        for r in RENDITIONS {
            m.insert(r, self.segments(r, n).await?);
        }
        Ok(m)
    }
}

/// Starts streams `ids` with `spec` on `d`.
async fn start_streams(d: &Daemon, ids: &[&str], spec: &str) -> Result<()> {
    for id in ids {
        let (st, body) = d.put_stream(id, spec).await?;
        ensure!(st == 201, "PUT {id}: {st} {body}");
    }
    Ok(())
}

/// How one item went.
struct Outcome {
    name: &'static str,
    result: Result<()>,
    took: Duration,
}

/// Runs `item` (named `name`) within `limit`, unless `KILN_ITEMS` leaves it out (`None`).
async fn attempt(
    name: &'static str,
    limit: Duration,
    item: impl Future<Output = Result<()>>,
) -> Option<Outcome> {
    if let Ok(only) = std::env::var("KILN_ITEMS") {
        let number = name.split('_').nth(1).unwrap_or_default();
        if !only.split(',').any(|n| n.trim() == number) {
            return None;
        }
    }
    let t = Instant::now();
    let result = match tokio::time::timeout(limit, item).await {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!("did not finish within {limit:?}")),
    };
    Some(Outcome {
        name,
        result,
        took: t.elapsed(),
    })
}

/// The items a test function ran, and their failures.
#[derive(Default)]
struct Items {
    failed: Vec<String>,
    ran: usize,
}

impl Items {
    /// The longest an item may take (item 20 needs ~3 segments plus 3 × TD).
    const LIMIT: Duration = Duration::from_secs(60);

    fn record(&mut self, outcome: Option<Outcome>) {
        let Some(Outcome { name, result, took }) = outcome else {
            return;
        };
        self.ran += 1;
        match result {
            Ok(()) => eprintln!("{name}: ok ({:.1} s)", took.as_secs_f64()),
            Err(e) => {
                eprintln!("{name}: FAILED after {:.1} s: {e:#}", took.as_secs_f64());
                self.failed.push(format!("{name}: {e:#}"));
            }
        }
    }

    fn finish(self) -> Result<()> {
        if !self.failed.is_empty() {
            bail!(
                "{} of {} items failed:\n{}",
                self.failed.len(),
                self.ran,
                self.failed.join("\n")
            );
        }
        Ok(())
    }
}

/// Runs each item fn with its fixture, one after the other.
macro_rules! run_items {
    ($items:expr, [$($item:ident => $fx:expr),+ $(,)?]) => {
        $( $items.record(attempt(stringify!($item), Items::LIMIT, $item($fx)).await); )+
    };
}

/// Runs the item fns at the same time (items that mostly wait for parts and time nothing), then records each
/// under its own name.
macro_rules! run_items_together {
    ($items:expr, [$($item:ident => $fx:expr),+ $(,)?]) => {{
        let ($($item,)+) = tokio::join!($( attempt(stringify!($item), Items::LIMIT, $item($fx)) ),+);
        for outcome in [$($item),+] {
            $items.record(outcome);
        }
    }};
}

/// Parsed PROGRAM-DATE-TIME (`YYYY-MM-DDTHH:MM:SS.mmmZ`) as milliseconds of the day (enough for comparisons).
fn pdt_ms(s: &str) -> Result<i64> {
    ensure!(
        s.len() == 24 && s.ends_with('Z') && &s[19..20] == ".",
        "PDT needs ms and a zone: {s}"
    );
    let h: i64 = s[11..13].parse()?;
    let m: i64 = s[14..16].parse()?;
    let sec: i64 = s[17..19].parse()?;
    let ms: i64 = s[20..23].parse()?;
    Ok(((h * 60 + m) * 60 + sec) * 1000 + ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_on_one_live_stream() -> Result<()> {
    let d = Daemon::start_default().await?;
    start_streams(&d, &["c"], small_stream_spec()).await?;
    start_streams(&d, &["s"], SHORT_SEGMENTS).await?;
    let mut items = Items::default();
    let fx = &Fx { d: &d, id: "c" };
    // items that wait for a few parts per rendition and time nothing: together
    run_items_together!(
        items,
        [
            item_03_target_duration_fixed_and_shared => fx,
            item_06_server_control_identical_and_stable => fx,
            item_15_hint_names_the_next_part => fx,
            item_20_part_tags_near_the_edge_and_removed_parts_stay => fx,
        ]
    );
    // the rest one at a time: several time their answers, and items 33 and 38 count the origin's parked requests
    run_items!(
        items,
        [
            item_01_playlist_syntax => fx,
            item_02_content_type => fx,
            item_04_extinf_rounds_within_target_duration => fx,
            item_05_part_inf_and_part_hold_back => fx,
            item_07_hold_back_and_skip_boundary => fx,
            item_08_parts_have_uri_duration_within_target => fx,
            item_09_parts_at_least_85_percent_unless_exempt => fx,
            item_10_independent_exactly_on_sync_parts => fx,
            item_11_parts_sum_to_parent_and_concatenate_to_it => fx,
            item_12_segment_tags_precede_first_part => fx,
            item_13_program_date_time_everywhere_and_consistent => fx,
            item_16_rendition_reports_for_every_other_rendition => fx,
            item_17_codecs_are_rfc6381 => fx,
            item_21_listed_uris_are_complete_immediately => fx,
            item_22_renditions_stay_in_step => fx,
            item_23_blocking_part_request => fx,
            item_24_msn_only_blocks_until_the_next_segment => fx,
            item_25_part_past_a_closed_segment_means_next_segment => fx,
            item_26_old_msn_gets_full_playlist_at_once => fx,
            item_27_part_without_msn_is_400 => fx,
            item_28_too_far_ahead_is_400_at_once => fx,
            item_33_hinted_part_is_held_then_sent_whole => fx,
            item_34_open_ended_range_on_hint => fx,
            item_35_unknown_resources_are_404_at_once => fx,
            item_36_http2_ranges_and_gzip => fx,
            item_37_cache_control_and_no_age => fx,
            item_38_identical_blocked_requests_share_one_publish => fx,
            item_39_init_and_fragments_are_cmaf => fx,
        ]
    );
    // delta updates, on the stream with 1 s segments that ran beside all of the above
    let fx = &Fx { d: &d, id: "s" };
    run_items!(
        items,
        [
            item_31_delta_update_merges_into_the_full_playlist => fx,
            item_32_only_segments_beyond_the_skip_boundary_are_skipped => fx,
        ]
    );
    d.shutdown().await?;
    items.finish()
}

/// ffmpeg publishing a test picture and a tone over RTMP to `url` (real time, for at most a minute).
fn rtmp_publisher(url: &str, size: &str) -> Result<tokio::process::Child> {
    tokio::process::Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-nostdin",
            "-loglevel",
            "error",
            "-re",
            "-f",
            "lavfi",
        ])
        .args([
            "-i",
            &format!("testsrc2=size={size}:rate=30"),
            "-f",
            "lavfi",
        ])
        .args([
            "-i",
            "sine=frequency=440:sample_rate=48000",
            "-t",
            "60",
            "-c:v",
            "libx264",
        ])
        .args([
            "-preset",
            "ultrafast",
            "-tune",
            "zerolatency",
            "-g",
            "60",
            "-pix_fmt",
            "yuv420p",
        ])
        .args(["-c:a", "aac", "-b:a", "64k", "-f", "flv", url])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting ffmpeg")
}

/// Polls until `id`'s status satisfies `done` (what it says of the status while not).
async fn wait_status(
    d: &Daemon,
    id: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    poll_until(
        what,
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let (_, text) = d.get_text(&format!("/v1/streams/{id}")).await?;
            let s: serde_json::Value = serde_json::from_str(&text)?;
            Ok(if done(&s) {
                Polled::Done(s)
            } else {
                Polled::NotYet(text)
            })
        },
    )
    .await
}

/// A `publish:` stream through a loss and a reconnect: an RTMP publisher, killed; the slate for two segments;
/// a second publisher at another size for three more. Then every item that reads the playlists, the parts and
/// the fragments runs on that window, which spans both switches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_across_a_lost_publisher_and_its_return() -> Result<()> {
    let config = kilnd::Config {
        ingest: kilnd::config::IngestConfig {
            rtmp_listen: Some("127.0.0.1:0".parse()?),
            ..Default::default()
        },
        ..Default::default()
    };
    let d = Daemon::start(config).await?;
    let spec = small_stream_spec().replace("test:pattern=ball", "publish:");
    let (st, v) = d.put_stream("p", &spec).await?;
    ensure!(st == 201, "PUT p: {st} {v}");
    let url = v["ingest"]["rtmp_url"]
        .as_str()
        .context("rtmp_url")?
        .to_string();
    let msn = |s: &serde_json::Value| s["renditions"][0]["last_msn"].as_u64().unwrap_or(0);
    let mut first = rtmp_publisher(&url, "320x180")?;
    let s = wait_status(&d, "p", "p running", |s| s["state"] == "running").await?;
    let start = msn(&s);
    wait_status(&d, "p", "two segments of the first publisher", |s| {
        msn(s) >= start + 2
    })
    .await?;
    first.kill().await?;
    let s = wait_status(&d, "p", "the slate", |s| {
        s["resilience"]["active_input"] == "slate"
    })
    .await?;
    let lost = msn(&s);
    wait_status(&d, "p", "two segments of slate", |s| msn(s) >= lost + 2).await?;
    let _second = rtmp_publisher(&url, "256x144")?;
    let s = wait_status(&d, "p", "the second publisher", |s| {
        s["resilience"]["reconnects"] == 1
    })
    .await?;
    let back = msn(&s);
    wait_status(&d, "p", "three segments of the second publisher", |s| {
        msn(s) >= back + 3
    })
    .await?;
    // the window the items read still starts before the loss
    for r in RENDITIONS {
        let (_, text) = d.get_text(&format!("/live/p/{r}/index.m3u8")).await?;
        let first = parse_ll(&text)?.media_sequence;
        ensure!(
            first < lost,
            "{r}: the window starts at {first}, after the loss at {lost}"
        );
    }
    let mut items = Items::default();
    let fx = &Fx { d: &d, id: "p" };
    run_items!(
        items,
        [
            item_01_playlist_syntax => fx,
            item_03_target_duration_fixed_and_shared => fx,
            item_04_extinf_rounds_within_target_duration => fx,
            item_05_part_inf_and_part_hold_back => fx,
            item_08_parts_have_uri_duration_within_target => fx,
            item_09_parts_at_least_85_percent_unless_exempt => fx,
            item_10_independent_exactly_on_sync_parts => fx,
            item_11_parts_sum_to_parent_and_concatenate_to_it => fx,
            item_12_segment_tags_precede_first_part => fx,
            item_13_program_date_time_everywhere_and_consistent => fx,
            item_16_rendition_reports_for_every_other_rendition => fx,
            item_17_codecs_are_rfc6381 => fx,
            item_21_listed_uris_are_complete_immediately => fx,
            item_22_renditions_stay_in_step => fx,
            item_39_init_and_fragments_are_cmaf => fx,
        ]
    );
    d.shutdown().await?;
    items.finish()
}

/// Items that end a stream, stall one or need old segments to leave the playlist quickly: a daemon with a
/// 3-segment window (6 s = 3 × TD), one stream per item, all started at once and checked at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_that_end_stall_or_roll_a_stream() -> Result<()> {
    let d = Daemon::start(kilnd::Config {
        window_segments: 3,
        ..Default::default()
    })
    .await?;
    start_streams(&d, &["e14", "e30", "w19", "p29"], small_stream_spec()).await?;
    let fixture = |id| Fx { d: &d, id };
    let (e14, e30, w19, p29) = (
        fixture("e14"),
        fixture("e30"),
        fixture("w19"),
        fixture("p29"),
    );
    let mut items = Items::default();
    run_items_together!(
        items,
        [
            item_14_no_playlist_type_and_no_hint_after_endlist => &e14,
            item_30_endlist_ignores_blocking_parameters => &e30,
            item_19_media_sequence_counts_removed_segments => &w19,
            item_29_stalled_stream_gives_503_after_3_td => &p29,
        ]
    );
    d.shutdown().await?;
    items.finish()
}

/// 30 s of part and segment timing; it measures real-time behaviour, so it runs in nextest's `realtime` group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item_18_parts_and_segments_arrive_on_time() -> Result<()> {
    let d = Daemon::start_default().await?;
    start_streams(&d, &["c"], small_stream_spec()).await?;
    let mut items = Items::default();
    let fx = &Fx { d: &d, id: "c" };
    items.record(attempt("item_18", Duration::from_secs(60), check_item_18(fx)).await);
    d.shutdown().await?;
    items.finish()
}

async fn item_01_playlist_syntax(fx: &Fx<'_>) -> Result<()> {
    let id = fx.id;
    for r in RENDITIONS {
        let (text, pl) = fx.playlist(r).await?; // parse_ll checks #EXTM3U, one VERSION, no control characters
        ensure!(pl.version >= 6, "{r}: version {}", pl.version);
        ensure!(!text.starts_with('\u{feff}'), "BOM");
    }
    let (_, master) = fx.d.get_text(&format!("/live/{id}/master.m3u8")).await?;
    ensure!(master.starts_with("#EXTM3U\n") && master.matches("#EXT-X-VERSION:").count() == 1);
    Ok(())
}

async fn item_02_content_type(fx: &Fx<'_>) -> Result<()> {
    let id = fx.id;
    for path in [
        format!("/live/{id}/master.m3u8"),
        fx.path("hi"),
        fx.path("audio"),
    ] {
        let res = fx.d.http.get(fx.d.url(&path)).send().await?;
        ensure!(res.status() == 200);
        ensure!(
            res.headers()["content-type"] == "application/vnd.apple.mpegurl",
            "{path}"
        );
    }
    Ok(())
}

async fn item_03_target_duration_fixed_and_shared(fx: &Fx<'_>) -> Result<()> {
    let mut seen = Vec::new();
    for r in RENDITIONS {
        let (_, mut pl) = fx.playlist(r).await?;
        for _ in 0..8 {
            ensure!(pl.target_duration >= 1);
            seen.push(pl.target_duration);
            pl = fx.next(r, &pl).await?.1;
        }
    }
    ensure!(
        seen.iter().all(|t| *t == seen[0]),
        "TARGETDURATION varies: {seen:?}"
    );
    Ok(())
}

async fn item_04_extinf_rounds_within_target_duration(fx: &Fx<'_>) -> Result<()> {
    for (r, pl) in fx.all_playlists(3).await? {
        for s in &pl.segments {
            if let Some(d) = s.duration {
                ensure!(
                    d.round() as u64 <= pl.target_duration,
                    "{r}: EXTINF {d} > TD {}",
                    pl.target_duration
                );
            }
        }
    }
    Ok(())
}

async fn item_05_part_inf_and_part_hold_back(fx: &Fx<'_>) -> Result<()> {
    for r in RENDITIONS {
        let (text, pl) = fx.playlist(r).await?;
        ensure!(text.contains("#EXT-X-PART-INF:PART-TARGET="));
        ensure!(pl.part_target > 0.0);
        ensure!(
            pl.part_hold_back >= 3.0 * pl.part_target - 1e-9,
            "{r}: PHB {} < 3 × {}",
            pl.part_hold_back,
            pl.part_target
        );
    }
    Ok(())
}

async fn item_06_server_control_identical_and_stable(fx: &Fx<'_>) -> Result<()> {
    let mut seen = Vec::new();
    for r in RENDITIONS {
        let (_, mut pl) = fx.playlist(r).await?;
        for _ in 0..6 {
            seen.push((pl.server_control.clone(), pl.part_target.to_bits()));
            pl = fx.next(r, &pl).await?.1;
        }
    }
    ensure!(
        seen.iter().all(|s| *s == seen[0]),
        "SERVER-CONTROL/PART-TARGET differ: {seen:?}"
    );
    Ok(())
}

async fn item_07_hold_back_and_skip_boundary(fx: &Fx<'_>) -> Result<()> {
    for r in RENDITIONS {
        let (_, pl) = fx.playlist(r).await?;
        let td = pl.target_duration as f64;
        ensure!(pl.hold_back.context("HOLD-BACK")? >= 3.0 * td);
        ensure!(pl.can_skip_until.context("CAN-SKIP-UNTIL")? >= 6.0 * td);
        ensure!(!pl.server_control.contains("CAN-SKIP-DATERANGES") || pl.can_skip_until.is_some());
    }
    Ok(())
}

async fn item_08_parts_have_uri_duration_within_target(fx: &Fx<'_>) -> Result<()> {
    for (r, pl) in fx.all_playlists(2).await? {
        let parts: Vec<_> = pl.segments.iter().flat_map(|s| &s.parts).collect();
        ensure!(!parts.is_empty());
        for p in parts {
            ensure!(!p.uri.is_empty());
            ensure!(
                p.duration > 0.0 && p.duration <= pl.part_target,
                "{r}: {} lasts {}",
                p.uri,
                p.duration
            );
        }
    }
    Ok(())
}

async fn item_09_parts_at_least_85_percent_unless_exempt(fx: &Fx<'_>) -> Result<()> {
    for (r, pl) in fx.all_playlists(3).await? {
        let open = pl.segments.last().unwrap().msn;
        for s in &pl.segments {
            for (i, p) in s.parts.iter().enumerate() {
                // exempt: INDEPENDENT, and the last part of a parent (the newest part of the open segment may be)
                let last_of_parent = i + 1 == s.parts.len();
                if p.independent || last_of_parent || (s.msn == open && i + 1 == s.parts.len()) {
                    continue;
                }
                ensure!(
                    p.duration >= 0.85 * pl.part_target,
                    "{r}: {} lasts {}",
                    p.uri,
                    p.duration
                );
            }
        }
    }
    Ok(())
}

async fn item_10_independent_exactly_on_sync_parts(fx: &Fx<'_>) -> Result<()> {
    for (r, pl) in fx.all_playlists(2).await? {
        let init = fx.bytes(r, &pl.map_uri).await?;
        for s in &pl.segments {
            for p in &s.parts {
                let f = fragment(&init, &fx.bytes(r, &p.uri).await?)?;
                ensure!(
                    p.independent == f.starts_with_sync,
                    "{r}: {} INDEPENDENT={} first sync={}",
                    p.uri,
                    p.independent,
                    f.starts_with_sync
                );
                ensure!(
                    p.independent != f.sync_samples.is_empty(),
                    "{r}: {} has sync samples {:?}",
                    p.uri,
                    f.sync_samples
                );
            }
        }
    }
    Ok(())
}

async fn item_11_parts_sum_to_parent_and_concatenate_to_it(fx: &Fx<'_>) -> Result<()> {
    for (r, pl) in fx.all_playlists(3).await? {
        let init = fx.bytes(r, &pl.map_uri).await?;
        let mut checked = 0;
        for s in pl
            .segments
            .iter()
            .filter(|s| s.uri.is_some() && !s.parts.is_empty())
        {
            let sum: f64 = s.parts.iter().map(|p| p.duration).sum();
            let dur = s.duration.unwrap();
            ensure!(
                (sum - dur).abs() < 0.0005,
                "{r}: parts {sum} vs EXTINF {dur}"
            );
            let mut cat = Vec::new();
            for p in &s.parts {
                cat.extend_from_slice(&fx.bytes(r, &p.uri).await?);
            }
            let seg = fx.bytes(r, s.uri.as_ref().unwrap()).await?;
            ensure!(
                seg.as_ref() == cat.as_slice(),
                "{r}: segment {} differs from its parts",
                s.msn
            );
            let f = fragment(&init, &seg)?;
            ensure!(
                (f.duration_ns() as f64 / 1e9 - dur).abs() < 0.0005,
                "{r}: samples {} vs EXTINF {dur}",
                f.duration_ns()
            );
            checked += 1;
        }
        ensure!(checked >= 1, "{r}: no complete segment with parts");
    }
    Ok(())
}

async fn item_12_segment_tags_precede_first_part(fx: &Fx<'_>) -> Result<()> {
    for r in RENDITIONS {
        fx.segments(r, 2).await?;
        let (text, _) = fx.playlist(r).await?;
        let mut in_parts = false;
        for line in text.lines() {
            if line.starts_with("#EXT-X-PART:") {
                in_parts = true;
            } else if line.starts_with("#EXTINF") {
                in_parts = false;
            } else if [
                "#EXT-X-DISCONTINUITY",
                "#EXT-X-MAP",
                "#EXT-X-KEY",
                "#EXT-X-PROGRAM-DATE-TIME",
            ]
            .iter()
            .any(|t| line.starts_with(t))
            {
                ensure!(!in_parts, "{r}: `{line}` after a part of the same parent");
            }
        }
    }
    Ok(())
}

async fn item_13_program_date_time_everywhere_and_consistent(fx: &Fx<'_>) -> Result<()> {
    let all = fx.all_playlists(2).await?;
    let mut by_msn: BTreeMap<u64, Vec<(&str, i64)>> = BTreeMap::new();
    for (r, pl) in &all {
        ensure!(
            pl.pdt_count == pl.segments.len(),
            "{r}: one PDT per segment"
        );
        for (msn, v) in &pl.pdt {
            by_msn.entry(*msn).or_default().push((r, pdt_ms(v)?));
        }
    }
    for (msn, v) in by_msn.iter().filter(|(_, v)| v.len() == 3) {
        let video: Vec<i64> = v
            .iter()
            .filter(|(r, _)| *r != "audio")
            .map(|x| x.1)
            .collect();
        ensure!(
            video.iter().all(|t| *t == video[0]),
            "segment {msn}: video PDTs differ {v:?}"
        );
        let audio = v.iter().find(|(r, _)| *r == "audio").unwrap().1;
        // audio segments start at the first AAC frame at/after the same grid point (< 21.4 ms later), video ones at
        // the first frame at/after it (< 33.4 ms later: a live source's frames are not aligned to the grid; seen
        // 28 ms); PDTs are whole milliseconds
        ensure!(
            (-34..=22).contains(&(audio - video[0])),
            "segment {msn}: audio PDT {audio} vs video {}",
            video[0]
        );
    }
    Ok(())
}

async fn item_14_no_playlist_type_and_no_hint_after_endlist(fx: &Fx<'_>) -> Result<()> {
    let id = fx.id;
    for r in RENDITIONS {
        let (_, pl) = fx.playlist(r).await?;
        ensure!(!pl.playlist_type && !pl.endlist && pl.preload_hint.is_some());
    }
    let res =
        fx.d.http
            .delete(fx.d.url(&format!("/v1/streams/{id}")))
            .send()
            .await?;
    ensure!(res.status() == 204);
    for r in RENDITIONS {
        let (_, pl) = fx.playlist(r).await?;
        ensure!(
            pl.endlist && pl.preload_hint.is_none(),
            "{r}: ENDLIST without hint"
        );
    }
    Ok(())
}

async fn item_15_hint_names_the_next_part(fx: &Fx<'_>) -> Result<()> {
    for r in RENDITIONS {
        let (text, mut pl) = fx.playlist(r).await?;
        ensure!(text.matches("#EXT-X-PRELOAD-HINT:TYPE=PART").count() == 1);
        for _ in 0..10 {
            let hint = pl.preload_hint.clone().context("hint")?;
            let before = pl.part_uris();
            let (_, next) = fx.next(r, &pl).await?;
            let new: Vec<String> = next
                .part_uris()
                .into_iter()
                .filter(|u| !before.contains(u))
                .collect();
            ensure!(
                new.first() == Some(&hint),
                "{r}: hinted {hint}, published {new:?}"
            );
            pl = next;
        }
    }
    Ok(())
}

async fn item_16_rendition_reports_for_every_other_rendition(fx: &Fx<'_>) -> Result<()> {
    fx.all_playlists(1).await?;
    // Each report is bracketed by the other rendition's own playlist fetched just before (less the one part of
    // lag LLHLS.md allows) and just after. (Three fetches "at once" are not at once on a loaded host: a part is a
    // third of a second.)
    // (the part before the last, the last): LLHLS.md allows a report one part behind
    let last = |r: &'static str| async move {
        let (_, pl) = fx.playlist(r).await?;
        let parts: Vec<(u64, u64)> = pl
            .segments
            .iter()
            .flat_map(|s| (0..s.parts.len() as u64).map(move |i| (s.msn, i)))
            .collect();
        anyhow::ensure!(parts.len() >= 2, "{r}: fewer than two parts listed");
        Ok::<_, anyhow::Error>((parts[parts.len() - 2], parts[parts.len() - 1]))
    };
    for r in RENDITIONS {
        let others: Vec<&'static str> = RENDITIONS.iter().copied().filter(|o| *o != r).collect();
        let mut before = BTreeMap::new();
        for o in &others {
            before.insert(*o, last(o).await?);
        }
        let (_, pl) = fx.playlist(r).await?;
        let mut after = BTreeMap::new();
        for o in &others {
            after.insert(*o, last(o).await?);
        }
        let mut uris: Vec<&str> = pl.reports.iter().map(|x| x.0.as_str()).collect();
        uris.sort();
        let mut want: Vec<String> = others
            .iter()
            .map(|o| format!("../{o}/index.m3u8"))
            .collect();
        want.sort();
        ensure!(uris == want, "{r}: reports {uris:?}");
        for (uri, msn, part) in &pl.reports {
            let other = uri
                .trim_start_matches("../")
                .trim_end_matches("/index.m3u8");
            // at least the part before the last one seen just before, at most the last one seen just after
            let (b, a) = (before[other].0, after[other].1);
            ensure!(
                b <= (*msn, *part) && (*msn, *part) <= a,
                "{r} reports {other} at {msn}.{part}; it was at least at {}.{} just before (allowing one part) \
                 and at {}.{} just after",
                b.0,
                b.1,
                a.0,
                a.1
            );
        }
    }
    Ok(())
}

async fn item_17_codecs_are_rfc6381(fx: &Fx<'_>) -> Result<()> {
    let id = fx.id;
    let (_, master) = fx.d.get_text(&format!("/live/{id}/master.m3u8")).await?;
    let parsed = m3u8_rs::parse_master_playlist_res(master.as_bytes())
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    ensure!(parsed.variants.len() == 2);
    for v in &parsed.variants {
        let codecs = v.codecs.as_deref().context("CODECS")?;
        let list: Vec<&str> = codecs.split(',').collect();
        ensure!(list.len() == 2, "{codecs}");
        let avc = list[0];
        ensure!(
            avc.len() == 11
                && avc.starts_with("avc1.")
                && u32::from_str_radix(&avc[5..], 16).is_ok(),
            "{avc}"
        );
        ensure!(list[1] == "mp4a.40.2", "{codecs}");
        // the string matches the init segment's avcC
        let uri = v.uri.trim_end_matches("/index.m3u8");
        let init = fx.bytes(uri, "init.mp4").await?;
        ensure!(cmaf::parse_init(&init)?.codecs().as_deref() == Some(avc));
    }
    Ok(())
}

/// How long item 18 watches the parts arrive: 90 parts (89 gaps), 15 segments.
const ITEM_18_WINDOW: Duration = Duration::from_secs(30);

async fn check_item_18(fx: &Fx<'_>) -> Result<()> {
    let (_, mut pl) = fx.playlist("hi").await?;
    let mut part_times = Vec::new();
    let mut seg_times = Vec::new();
    let start = Instant::now();
    while start.elapsed() < ITEM_18_WINDOW {
        let (m, _) = pl.last_part().unwrap();
        pl = fx.next("hi", &pl).await?.1;
        let now = Instant::now();
        part_times.push(now);
        if pl.last_part().unwrap().0 != m {
            seg_times.push(now);
        }
    }
    let gaps =
        |t: &[Instant]| -> Vec<f64> { t.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect() };
    let mut pg = gaps(&part_times);
    pg.sort_by(f64::total_cmp);
    let mean = pg.iter().sum::<f64>() / pg.len() as f64;
    let median = pg[pg.len() / 2];
    // all gaps but the worst one: the rank the p99 of a 60 s window (179 gaps) had before the window was halved
    let second = pg[pg.len() - 2];
    let max = *pg.last().unwrap();
    let sg = gaps(&seg_times);
    let seg_max = sg.iter().copied().fold(0.0, f64::max);
    eprintln!("part gaps over {ITEM_18_WINDOW:?}: mean {mean:.4} s, median {median:.3} s, second-worst {second:.3} s, max {max:.3} s; segment gap max {seg_max:.3} s");
    // The muxer's cadence is exactly PART-TARGET, so parts keep real time when their mean gap is PART-TARGET. The
    // median of gaps seen at the client straddles it (seen in CI: 0.33403 s against 0.33333), so it is not the
    // measure; 5 ms over the window is what a stream that falls behind by 1.5 % would show.
    ensure!(
        mean <= pl.part_target + 0.005,
        "mean part gap {mean} s over {ITEM_18_WINDOW:?}"
    );
    // Observed at the client, a gap includes the scheduling jitter of a loaded 2-core host (other tests run beside
    // this one; seen alone: the worst gaps 0.376 s); a late part makes the next gap short. Hold every gap but the
    // worst to the target + 150 ms and the worst to 2 × PART-TARGET: a stream that falls behind or publishes in
    // bursts still fails.
    ensure!(
        second <= pl.part_target + 0.15,
        "second-worst part gap {second}"
    );
    ensure!(max <= 2.0 * pl.part_target, "max part gap {max}");
    ensure!(
        seg_max <= 1.5 * pl.target_duration as f64,
        "segment gap {seg_max}"
    );
    Ok(())
}

async fn item_19_media_sequence_counts_removed_segments(fx: &Fx<'_>) -> Result<()> {
    let mut prev = fx.segments("hi", 4).await?;
    for _ in 0..3 {
        let (m, _) = prev.last_part().unwrap();
        let (st, text) = fx.get("hi", &format!("_HLS_msn={}", m + 1)).await?;
        ensure!(st == 200);
        let pl = parse_ll(&text)?;
        let removed = prev
            .segments
            .iter()
            .filter(|s| s.msn < pl.media_sequence)
            .count() as u64;
        ensure!(
            pl.media_sequence == prev.media_sequence + removed,
            "MEDIA-SEQUENCE {} -> {} with {removed} removed",
            prev.media_sequence,
            pl.media_sequence
        );
        let dur: f64 = pl.segments.iter().filter_map(|s| s.duration).sum();
        ensure!(
            dur >= 3.0 * pl.target_duration as f64 - 1e-6,
            "playlist lasts {dur} s"
        );
        prev = pl;
    }
    Ok(())
}

async fn item_20_part_tags_near_the_edge_and_removed_parts_stay(fx: &Fx<'_>) -> Result<()> {
    let id = fx.id;
    let pl = fx.segments("hi", 5).await?;
    let td = pl.target_duration as f64;
    // distance of each part's start from the end of the playlist
    let total: f64 = pl
        .segments
        .iter()
        .map(|s| {
            s.duration
                .unwrap_or_else(|| s.parts.iter().map(|p| p.duration).sum())
        })
        .sum();
    let mut t = 0.0;
    for s in &pl.segments {
        for p in &s.parts {
            ensure!(
                total - t <= 3.0 * td + 1e-6,
                "{} sits {} s from the end",
                p.uri,
                total - t
            );
            t += p.duration;
        }
        if s.parts.is_empty() {
            t += s.duration.unwrap();
        }
    }
    // wait until the oldest listed part's tag is gone, then it must stay downloadable for 3 × TD
    let oldest = pl
        .segments
        .iter()
        .find(|s| !s.parts.is_empty())
        .unwrap()
        .parts[0]
        .uri
        .clone();
    let mut cur = pl;
    while cur.part_uris().contains(&oldest) {
        cur = fx.next("hi", &cur).await?.1;
    }
    let removed_at = Instant::now();
    let until = removed_at + Duration::from_secs_f64(3.0 * td);
    let mut checks = 0u32;
    // one check per published part, the last one at or after `until`
    while checks == 0 || Instant::now() < until {
        if checks > 0 {
            cur = fx.next("hi", &cur).await?.1;
        }
        let res =
            fx.d.http
                .get(fx.d.url(&format!("/live/{id}/hi/{oldest}")))
                .send()
                .await?;
        ensure!(
            res.status() == 200,
            "{oldest} gone {:?} after its tag",
            removed_at.elapsed()
        );
        checks += 1;
    }
    Ok(())
}

async fn item_21_listed_uris_are_complete_immediately(fx: &Fx<'_>) -> Result<()> {
    let id = fx.id;
    let (_, mut pl) = fx.playlist("lo").await?;
    let mut seen: Vec<String> = Vec::new();
    for _ in 0..12 {
        pl = fx.next("lo", &pl).await?.1;
        let mut uris = pl.part_uris();
        uris.extend(pl.segments.iter().filter_map(|s| s.uri.clone()));
        uris.push(pl.map_uri.clone());
        let fresh: Vec<String> = uris.into_iter().filter(|u| !seen.contains(u)).collect();
        for u in fresh {
            let t = Instant::now();
            let res =
                fx.d.http
                    .get(fx.d.url(&format!("/live/{id}/lo/{u}")))
                    .send()
                    .await?;
            ensure!(res.status() == 200, "{u}: {}", res.status());
            let len: usize = res.headers()["content-length"].to_str()?.parse()?;
            let body = res.bytes().await?;
            ensure!(body.len() == len && len > 0);
            ensure!(
                t.elapsed() < Duration::from_millis(250),
                "{u} took {:?}",
                t.elapsed()
            );
            seen.push(u);
        }
    }
    Ok(())
}

async fn item_22_renditions_stay_in_step(fx: &Fx<'_>) -> Result<()> {
    fx.all_playlists(1).await?;
    // Each answer is the rendition's state at some moment between sending the three requests and the last answer;
    // on a loaded host that window is not zero, and each edge moves 1 s per second of it. The allowance is one
    // part (renditions publish each part at slightly different moments) + 50 ms + that window, measured.
    let timed = |r: &'static str| async move {
        let res = fx.playlist(r).await;
        (res, Instant::now())
    };
    for _ in 0..10 {
        let t0 = Instant::now();
        let ((a, ta), (b, tb), (c, tc)) = tokio::join!(timed("hi"), timed("lo"), timed("audio"));
        let window = (ta.max(tb).max(tc) - t0).as_secs_f64();
        let edge = |pl: &LlPlaylist| -> f64 {
            // media time of the live edge, from PDT of the last segment plus its parts
            let s = pl.segments.last().unwrap();
            let pdt = pdt_ms(&pl.pdt.last().unwrap().1).unwrap() as f64 / 1000.0;
            pdt + s.parts.iter().map(|p| p.duration).sum::<f64>()
        };
        let (a, b, c) = (a?.1, b?.1, c?.1);
        let e = [edge(&a), edge(&b), edge(&c)];
        let spread =
            e.iter().copied().fold(f64::MIN, f64::max) - e.iter().copied().fold(f64::MAX, f64::min);
        ensure!(
            spread <= a.part_target + 0.05 + window,
            "live edges {e:?} spread {spread} (answers took {window:.3} s)"
        );
        fx.next("hi", &a).await?;
    }
    Ok(())
}

async fn item_23_blocking_part_request(fx: &Fx<'_>) -> Result<()> {
    let (_, pl) = fx.playlist("hi").await?;
    let (m, p) = pl.last_part().unwrap();
    let t = Instant::now();
    let (st, text) = fx
        .get("hi", &format!("_HLS_msn={m}&_HLS_part={}", p + 1))
        .await?;
    let waited = t.elapsed();
    ensure!(st == 200);
    let next = parse_ll(&text)?;
    let uris = next.part_uris();
    ensure!(
        uris.contains(&format!("part-{m}-{}.m4s", p + 1))
            || uris.contains(&format!("part-{}-0.m4s", m + 1)),
        "{uris:?}"
    );
    ensure!(
        next.last_part().unwrap() > (m, p),
        "answered with the old playlist"
    );
    ensure!(
        waited <= Duration::from_secs_f64(pl.part_target + 0.25),
        "took {waited:?}"
    );
    Ok(())
}

async fn item_24_msn_only_blocks_until_the_next_segment(fx: &Fx<'_>) -> Result<()> {
    let (_, pl) = fx.playlist("hi").await?;
    let (m, _) = pl.last_part().unwrap();
    let (st, text) = fx.get("hi", &format!("_HLS_msn={}", m + 1)).await?;
    ensure!(st == 200);
    let next = parse_ll(&text)?;
    // kiln answers msn-only at part 0 of that segment (OME/MistServer behaviour; see blocking.rs)
    ensure!(
        next.part_uris().contains(&format!("part-{}-0.m4s", m + 1)),
        "never unchanged"
    );
    ensure!(next.last_part().unwrap().0 == m + 1);
    Ok(())
}

async fn item_25_part_past_a_closed_segment_means_next_segment(fx: &Fx<'_>) -> Result<()> {
    let pl = fx.segments("hi", 2).await?;
    let closed = pl
        .segments
        .iter()
        .rev()
        .find(|s| s.uri.is_some() && !s.parts.is_empty())
        .unwrap();
    let n = closed.parts.len();
    let (st, text) = fx
        .get("hi", &format!("_HLS_msn={}&_HLS_part={n}", closed.msn))
        .await?;
    ensure!(st == 200);
    ensure!(parse_ll(&text)?
        .part_uris()
        .contains(&format!("part-{}-0.m4s", closed.msn + 1)));
    Ok(())
}

async fn item_26_old_msn_gets_full_playlist_at_once(fx: &Fx<'_>) -> Result<()> {
    let (_, pl) = fx.playlist("hi").await?;
    let t = Instant::now();
    let (st, text) = fx
        .get(
            "hi",
            &format!("_HLS_msn={}", pl.media_sequence.saturating_sub(5)),
        )
        .await?;
    ensure!(st == 200 && t.elapsed() < Duration::from_millis(200));
    let got = parse_ll(&text)?;
    ensure!(got.segments.len() >= pl.segments.len() && got.media_sequence >= pl.media_sequence);
    Ok(())
}

async fn item_27_part_without_msn_is_400(fx: &Fx<'_>) -> Result<()> {
    fx.playlist("hi").await?;
    let (st, _) = fx.get("hi", "_HLS_part=0").await?;
    ensure!(st == 400, "{st}");
    Ok(())
}

async fn item_28_too_far_ahead_is_400_at_once(fx: &Fx<'_>) -> Result<()> {
    let (_, pl) = fx.playlist("hi").await?;
    let (m, p) = pl.last_part().unwrap();
    let t = Instant::now();
    let (st, _) = fx.get("hi", &format!("_HLS_msn={}", m + 3)).await?;
    ensure!(st == 400, "msn + 3: {st}");
    let apl = (3.0 / pl.part_target).ceil() as u64;
    let (st, _) = fx
        .get("hi", &format!("_HLS_msn={m}&_HLS_part={}", p + apl + 1))
        .await?;
    ensure!(st == 400, "beyond the advance part limit: {st}");
    ensure!(t.elapsed() < Duration::from_millis(500), "not immediate");
    Ok(())
}

async fn item_29_stalled_stream_gives_503_after_3_td(fx: &Fx<'_>) -> Result<()> {
    let (_, pl) = fx.playlist("hi").await?;
    let h = fx.d.state.supervisor.get(fx.id).context("stream")?;
    ensure!(h.pause(), "pausing the pipeline");
    // wait until nothing new is published any more (a part may have been in flight): the newest part stays the
    // same for 1 s, three part targets
    let seen = std::cell::Cell::new((fx.playlist("hi").await?.1.last_part(), Instant::now()));
    let last = poll_until(
        "the paused stream stops publishing",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            let now = fx.playlist("hi").await?.1.last_part();
            if now != seen.get().0 {
                seen.set((now, Instant::now()));
            }
            Ok(if seen.get().1.elapsed() >= Duration::from_secs(1) {
                Polled::Done(now)
            } else {
                Polled::NotYet(format!("newest part {now:?}"))
            })
        },
    )
    .await?;
    let (m, p) = last.context("no parts")?;
    let td = pl.target_duration as f64;
    let t = Instant::now();
    let (st, _) = fx
        .get("hi", &format!("_HLS_msn={m}&_HLS_part={}", p + 1))
        .await?;
    let waited = t.elapsed().as_secs_f64();
    ensure!(st == 503, "{st}");
    ensure!(
        waited >= 3.0 * td - 0.05 && waited <= 3.0 * td + 1.0,
        "503 after {waited} s"
    );
    Ok(())
}

async fn item_30_endlist_ignores_blocking_parameters(fx: &Fx<'_>) -> Result<()> {
    let id = fx.id;
    fx.playlist("hi").await?;
    fx.d.http
        .delete(fx.d.url(&format!("/v1/streams/{id}")))
        .send()
        .await?;
    let t = Instant::now();
    for q in [
        "_HLS_msn=999999999999&_HLS_part=99",
        "_HLS_part=3",
        "_HLS_skip=YES",
    ] {
        let (st, text) = fx.get("hi", q).await?;
        ensure!(
            st == 200 && text.contains("#EXT-X-ENDLIST") && !text.contains("EXT-X-SKIP"),
            "{q}: {st}"
        );
    }
    ensure!(t.elapsed() < Duration::from_millis(500));
    Ok(())
}

/// 1 s segments so the 6 s Skip Boundary is passed after ~8 s.
const SHORT_SEGMENTS: &str = r#"{"source": "test:pattern=ball", "segment_ms": 1000,
    "renditions": [{"name": "hi", "width": 320, "height": 180, "fps": 30, "bitrate_kbps": 300},
                   {"name": "lo", "width": 160, "height": 90, "fps": 30, "bitrate_kbps": 120}],
    "audio": {"bitrate_kbps": 64}}"#;

async fn item_31_delta_update_merges_into_the_full_playlist(fx: &Fx<'_>) -> Result<()> {
    fx.segments("hi", 9).await?;
    let (_, full_before) = fx.playlist("hi").await?;
    let (m, p) = full_before.last_part().unwrap();
    let q = format!("_HLS_msn={m}&_HLS_part={}", p + 1);
    let (st, delta_text) = fx.get("hi", &format!("{q}&_HLS_skip=YES")).await?;
    ensure!(st == 200);
    let (_, full_text) = fx.get("hi", &q).await?; // the same state, in full
    let delta = parse_ll(&delta_text)?;
    let full = parse_ll(&full_text)?;
    ensure!(delta.skip_tags == 1 && delta.version >= 9, "{delta_text}");
    ensure!(delta.media_sequence == full.media_sequence);
    let skipped = delta.skipped.unwrap();
    ensure!(skipped > 0, "nothing skipped: {delta_text}");
    // merge: the previous full playlist's first `skipped` segments + the delta's = the current full list
    let mut merged: Vec<_> = full_before
        .segments
        .iter()
        .filter(|s| s.msn >= delta.media_sequence)
        .take(skipped as usize)
        .map(|s| (s.msn, s.uri.clone()))
        .collect();
    merged.extend(delta.segments.iter().map(|s| (s.msn, s.uri.clone())));
    let want: Vec<_> = full
        .segments
        .iter()
        .map(|s| (s.msn, s.uri.clone()))
        .collect();
    ensure!(merged == want, "merged {merged:?}\nfull {want:?}");
    ensure!(
        delta.segments == full.segments[skipped as usize..],
        "delta segments differ from the full playlist's"
    );
    Ok(())
}

async fn item_32_only_segments_beyond_the_skip_boundary_are_skipped(fx: &Fx<'_>) -> Result<()> {
    fx.segments("hi", 9).await?;
    let (_, text) = fx.get("hi", "_HLS_skip=YES").await?;
    let delta = parse_ll(&text)?;
    let (_, full) = fx.playlist("hi").await?;
    let skipped = delta.skipped.unwrap() as usize;
    let boundary = full.can_skip_until.unwrap();
    // end of the last complete segment, from the full playlist
    let last_complete = full.segments.iter().rposition(|s| s.uri.is_some()).unwrap();
    let end_of = |i: usize| -> f64 {
        full.segments[..=i]
            .iter()
            .map(|s| s.duration.unwrap_or(0.0))
            .sum()
    };
    let end = end_of(last_complete);
    for i in 0..skipped {
        ensure!(
            end - end_of(i) > boundary - 0.0005,
            "skipped segment {i} ends only {} s before the end",
            end - end_of(i)
        );
    }
    let (_, v2) = fx.get("hi", "_HLS_skip=v2").await?;
    ensure!(
        v2.contains("#EXT-X-VERSION:10") && v2.contains("RECENTLY-REMOVED-DATERANGES=\"\""),
        "{v2}"
    );
    Ok(())
}

async fn item_33_hinted_part_is_held_then_sent_whole(fx: &Fx<'_>) -> Result<()> {
    let id = fx.id;
    // right after a publish, so that the hinted part is a whole part target away
    let (_, pl) = fx.next("hi", &fx.playlist("hi").await?.1).await?;
    let hint = pl.preload_hint.clone().unwrap();
    let http = fx.d.http.clone();
    let url = fx.d.url(&format!("/live/{id}/hi/{hint}"));
    let part = tokio::spawn(async move {
        let res = http.get(url).send().await?;
        let len: usize = res.headers()["content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let body = res.bytes().await?;
        anyhow::Ok((len, body))
    });
    // the request is parked on the rendition (no response, not even headers) until the part is complete
    let origin = &fx.d.state.origin;
    let held = &part;
    poll_until(
        "the hinted part request parks",
        Duration::from_secs(5),
        Duration::from_millis(1),
        || async move {
            ensure!(
                !held.is_finished(),
                "the hinted part was answered before it existed"
            );
            Ok(match origin.parked() {
                0 => Polled::NotYet("nothing parked".into()),
                _ => Polled::Done(()),
            })
        },
    )
    .await?;
    let (_, next) = fx.next("hi", &pl).await?;
    let (len, body) = part.await??;
    ensure!(next.part_uris().contains(&hint));
    ensure!(
        body.len() == len && !body.is_empty(),
        "whole part with its length up front"
    );
    ensure!(body == fx.bytes("hi", &hint).await?);
    Ok(())
}

async fn item_34_open_ended_range_on_hint(fx: &Fx<'_>) -> Result<()> {
    let id = fx.id;
    let (_, pl) = fx.playlist("hi").await?;
    let hint = pl.preload_hint.clone().unwrap();
    let res =
        fx.d.http
            .get(fx.d.url(&format!("/live/{id}/hi/{hint}")))
            .header("range", "bytes=0-9007199254740991")
            .send()
            .await?;
    ensure!(res.status() == 206, "{}", res.status());
    let cr = res.headers()["content-range"].to_str()?.to_string();
    let body = res.bytes().await?;
    ensure!(
        cr == format!("bytes 0-{}/{}", body.len() - 1, body.len()),
        "{cr}"
    );
    ensure!(body == fx.bytes("hi", &hint).await?);
    Ok(())
}

async fn item_35_unknown_resources_are_404_at_once(fx: &Fx<'_>) -> Result<()> {
    let id = fx.id;
    let pl = fx.segments("hi", 2).await?;
    let (m, _) = pl.last_part().unwrap();
    let closed = pl.segments.iter().rev().find(|s| s.uri.is_some()).unwrap();
    let t = Instant::now();
    for u in [
        format!("part-{}-0.m4s", m + 50),
        format!("part-{}-{}.m4s", closed.msn, closed.parts.len()),
        "seg-0.m4s".into(),
        "nope.txt".into(),
        format!("seg-{}.m4s", m + 2),
    ] {
        let res =
            fx.d.http
                .get(fx.d.url(&format!("/live/{id}/hi/{u}")))
                .send()
                .await?;
        ensure!(res.status() == 404, "{u}: {}", res.status());
    }
    ensure!(
        t.elapsed() < Duration::from_millis(500),
        "404s must not wait"
    );
    Ok(())
}

async fn item_36_http2_ranges_and_gzip(fx: &Fx<'_>) -> Result<()> {
    let id = fx.id;
    let (_, pl) = fx.playlist("hi").await?;
    // h2c with prior knowledge here; HTTPS with ALPN h2 is covered by live_skeleton::https_negotiates_h2_with_alpn
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build()?;
    let res = h2.get(fx.d.url(&fx.path("hi"))).send().await?;
    ensure!(res.version() == reqwest::Version::HTTP_2 && res.status() == 200);
    let part = pl.part_uris()[0].clone();
    let res = h2
        .get(fx.d.url(&format!("/live/{id}/hi/{part}")))
        .header("range", "bytes=0-99")
        .send()
        .await?;
    ensure!(res.status() == 206 && res.bytes().await?.len() == 100);
    let res =
        fx.d.http
            .get(fx.d.url(&fx.path("hi")))
            .header("accept-encoding", "gzip")
            .send()
            .await?;
    ensure!(
        res.headers()
            .get("content-encoding")
            .is_some_and(|v| v == "gzip"),
        "playlists are gzipped on request"
    );
    let res =
        fx.d.http
            .get(fx.d.url(&format!("/live/{id}/hi/{part}")))
            .header("accept-encoding", "gzip")
            .send()
            .await?;
    ensure!(
        res.headers().get("content-encoding").is_none(),
        "media is never gzipped"
    );
    Ok(())
}

async fn item_37_cache_control_and_no_age(fx: &Fx<'_>) -> Result<()> {
    let id = fx.id;
    let (_, pl) = fx.playlist("hi").await?;
    let td = pl.target_duration;
    let (m, p) = pl.last_part().unwrap();
    let part = pl.part_uris()[0].clone();
    let seg = pl.segments.iter().find_map(|s| s.uri.clone()).unwrap();
    let cases = [
        (fx.path("hi"), 200, td / 2),
        (
            format!("{}?_HLS_msn={m}&_HLS_part={}", fx.path("hi"), p + 1),
            200,
            6 * td,
        ),
        (format!("{}?_HLS_part=1", fx.path("hi")), 400, 4 * td),
        (format!("/live/{id}/hi/{part}"), 200, 6 * td),
        (format!("/live/{id}/hi/{seg}"), 200, 86_400),
        (format!("/live/{id}/hi/part-{}-0.m4s", m + 50), 404, td),
    ];
    for (path, status, max_age) in cases {
        let res = fx.d.http.get(fx.d.url(&path)).send().await?;
        ensure!(res.status() == status, "{path}: {}", res.status());
        // errors: App. B.1's max-age for players, and at most a second in a shared cache (the edge)
        let want = if status >= 400 && max_age > 1 {
            format!("public, max-age={max_age}, s-maxage=1")
        } else {
            format!("public, max-age={max_age}")
        };
        ensure!(
            res.headers()["cache-control"] == want.as_str(),
            "{path}: {:?}",
            res.headers()["cache-control"]
        );
        ensure!(res.headers().get("age").is_none(), "{path}: Age sent");
    }
    Ok(())
}

async fn item_38_identical_blocked_requests_share_one_publish(fx: &Fx<'_>) -> Result<()> {
    // right after a publish, so that both requests park well before the next one
    let (_, pl) = fx.next("hi", &fx.playlist("hi").await?.1).await?;
    let (m, p) = pl.last_part().unwrap();
    let q = format!("_HLS_msn={m}&_HLS_part={}", p + 1);
    let stream = fx.d.state.origin.get(fx.id).context("stream")?;
    let rendition = stream.rendition("hi").context("rendition")?;
    let origin = &fx.d.state.origin;
    // both requests are parked (the origin counts them) before the publish that answers them
    let both_parked = poll_until(
        "both requests park",
        Duration::from_secs(5),
        Duration::from_millis(1),
        || async move {
            Ok(match origin.parked() {
                n if n >= 2 => Polled::Done(()),
                n => Polled::NotYet(format!("{n} parked")),
            })
        },
    );
    let (a, b, parked) = tokio::join!(fx.get("hi", &q), fx.get("hi", &q), both_parked);
    let ((sa, ta), (sb, tb)) = (a?, b?);
    parked?;
    ensure!(sa == 200 && sb == 200);
    let (la, lb) = (parse_ll(&ta)?.last_part(), parse_ll(&tb)?.last_part());
    ensure!(
        la == lb,
        "answers from different publishes: {la:?} vs {lb:?}"
    );
    // ONE publish: the origin's test hook saw both answers served from the very same snapshot `Arc` (pointer
    // identity), and that snapshot's playlist, rendered once when it was published, is what both received
    let (snap, answers) = rendition.served_from();
    let snap = snap.context("the origin recorded no playlist answer")?;
    ensure!(
        answers == 2,
        "{answers} answer(s) in a row from the last snapshot answered from: the two did not share one publish"
    );
    ensure!(
        snap.playlist == ta && snap.playlist == tb,
        "an answer differs from the shared snapshot's playlist"
    );
    ensure!(
        snap.last.map(|l| (l.msn, l.part)) == la,
        "the shared snapshot ends at {:?}, the answers at {la:?}",
        snap.last
    );
    Ok(())
}

async fn item_39_init_and_fragments_are_cmaf(fx: &Fx<'_>) -> Result<()> {
    for (r, pl) in fx.all_playlists(2).await? {
        let init = fx.bytes(r, &pl.map_uri).await?;
        let info = cmaf::parse_init(&init)?;
        ensure!(cmaf::top_level_kinds(&init)? == ["ftyp", "moov"], "{r}");
        ensure!(
            info.compatible_brands.iter().any(|b| b == "iso6")
                && info.compatible_brands.iter().any(|b| b == "cmfc"),
            "{r}: {:?}",
            info.compatible_brands
        );
        ensure!(
            info.movie_duration == 0
                && info
                    .tracks
                    .iter()
                    .all(|t| t.tkhd_duration == 0 && t.stbl_sample_count == 0)
        );
        ensure!(info.has_mvex && !info.has_mdat);
        ensure!(
            info.tracks
                .iter()
                .all(|t| info.trex_tracks.contains(&t.track_id)),
            "a trex per track"
        );
        let mut prev: Option<u64> = None;
        for s in pl.segments.iter().filter(|s| !s.parts.is_empty()) {
            for p in &s.parts {
                let f = fragment(&init, &fx.bytes(r, &p.uri).await?)?;
                ensure!(f.moofs.len() == 1, "{r}: one moof per part");
                if let Some(end) = prev {
                    ensure!(
                        f.base_decode_time == end,
                        "{r}: {} tfdt {} != {end}",
                        p.uri,
                        f.base_decode_time
                    );
                }
                prev = Some(f.base_decode_time + f.duration);
            }
        }
    }
    Ok(())
}
