//! The LL-HLS shield (`deploy/edge/kiln-edge.conf.template`): a real nginx, rendered from the shipped template,
//! in front of a real kilnd. Hundreds of simulated LL-HLS viewers (one async client: blocking playlist reloads
//! on each preload hint, then the part) watch through the edge; kilnd's own request counters show that the edge
//! collapses them into about one origin request per part and per playlist version.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kiln_integration::Daemon;

const SPEC: &str = r#"{"source": "test:pattern=ball",
    "renditions": [{"name": "v", "width": 160, "height": 90, "fps": 30, "bitrate_kbps": 200}],
    "audio": {"enabled": false}}"#;

/// nginx with the shipped template rendered for `origin` (host:port), in `dir`; returns it and its base URL.
async fn start_edge(origin: &str, dir: &Path) -> Result<(tokio::process::Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/edge/kiln-edge.conf.template"),
    )?;
    // what envsubst does with the three documented variables
    let rendered = template
        .replace("${KILN_ORIGIN}", origin)
        .replace("${KILN_EDGE_LISTEN}", &format!("127.0.0.1:{port}"))
        .replace(
            "${KILN_CACHE_DIR}",
            &dir.join("cache").display().to_string(),
        );
    ensure!(
        !rendered.contains("${"),
        "a variable the README does not name"
    );
    std::fs::write(dir.join("kiln-edge.conf"), rendered)?;
    let d = dir.display();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 8192; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  \
             scgi_temp_path {d}/scgi;\n  include {d}/kiln-edge.conf;\n}}\n"
        ),
    )?;
    let nginx = if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    };
    let child = tokio::process::Command::new(nginx)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-p")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("nginx (apt-get install nginx-light)")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        ensure!(
            Instant::now() < deadline,
            "nginx did not start: {}",
            std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((child, format!("http://127.0.0.1:{port}")))
}

/// The part a playlist's preload hint names: (msn, part).
fn hint(playlist: &str) -> Option<(u64, u64)> {
    let line = playlist
        .lines()
        .find(|l| l.starts_with("#EXT-X-PRELOAD-HINT:TYPE=PART"))?;
    let stem = line.split("URI=\"part-").nth(1)?.split(".m4s").next()?;
    let (m, p) = stem.split_once('-')?;
    Some((m.parse().ok()?, p.parse().ok()?))
}

/// The parts a playlist lists from `from` on, in order: (msn, part).
fn parts_from(playlist: &str, from: (u64, u64)) -> Vec<(u64, u64)> {
    playlist
        .lines()
        .filter(|l| l.starts_with("#EXT-X-PART:"))
        .filter_map(|l| {
            let stem = l.split("URI=\"part-").nth(1)?.split(".m4s").next()?;
            let (m, p) = stem.split_once('-')?;
            Some((m.parse().ok()?, p.parse().ok()?))
        })
        .filter(|pos| *pos >= from)
        .collect()
}

/// One viewer for `parts` parts from `first`, as an LL-HLS player does: a blocking reload for the hinted part,
/// then every part the playlist lists from there (an answer that came late lists more than one), again and
/// again. Returns the parts it got, in order.
async fn viewer(
    http: reqwest::Client,
    edge: String,
    first: (u64, u64),
    parts: usize,
    token: String,
) -> Result<Vec<(u64, u64)>> {
    let mut next = first;
    let mut seen = Vec::new();
    while seen.len() < parts {
        let (m, p) = next;
        let url = format!("{edge}/live/e/v/index.m3u8?_HLS_msn={m}&_HLS_part={p}{token}");
        let res = http.get(&url).send().await?;
        ensure!(res.status() == 200, "{url}: {}", res.status());
        let text = res.text().await?;
        let listed = parts_from(&text, next);
        ensure!(
            listed.first() == Some(&next),
            "{url}: the playlist lacks part {next:?}"
        );
        for (m, p) in listed {
            if seen.len() == parts {
                break;
            }
            let name = format!("part-{m}-{p}.m4s");
            let part = http
                .get(format!(
                    "{edge}/live/e/v/{name}?{}",
                    token.trim_start_matches('&')
                ))
                .send()
                .await?;
            ensure!(part.status() == 200, "{name}: {}", part.status());
            ensure!(!part.bytes().await?.is_empty(), "{name}: empty");
            seen.push((m, p));
        }
        next = hint(&text).context("no preload hint")?;
    }
    Ok(seen)
}

/// A series' value in the daemon's `/metrics` (0 when absent).
async fn series(d: &Daemon, name: &str) -> Result<f64> {
    let (_, text) = d.get_text("/metrics").await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0))
}

/// `viewers` viewers for `secs` through the edge; checks that all saw every part and that the origin saw about
/// one request per part and per playlist version. `token`: a query suffix (`&exp=…&sig=…`) or empty.
async fn watch_through_edge(
    d: &Daemon,
    edge: &str,
    viewers: usize,
    secs: u64,
    token: &str,
) -> Result<()> {
    let (_, text) = d
        .get_text(&format!(
            "/live/e/v/index.m3u8?{}",
            token.trim_start_matches('&')
        ))
        .await?;
    let first = hint(&text).context("no preload hint")?;
    let parts_before = series(d, r#"kiln_http_requests_total{kind="part",status="200"}"#).await?;
    let blocking_before = series(
        d,
        r#"kiln_http_requests_total{kind="playlist_blocking",status="200"}"#,
    )
    .await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()?;
    // 3 parts a second (334 ms parts): every viewer watches the same parts, a fixed number of them
    let want = (secs * 3) as usize;
    let tasks: Vec<_> = (0..viewers)
        .map(|_| {
            tokio::spawn(viewer(
                http.clone(),
                edge.to_string(),
                first,
                want,
                token.to_string(),
            ))
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await??);
    }
    let reference = all[0].clone();
    let parts = reference.len() as f64;
    // every part, in order: each one the next of the one before (the next part of its segment, or the next
    // segment's first)
    for w in reference.windows(2) {
        let ((m, p), next) = (w[0], w[1]);
        ensure!(
            next == (m, p + 1) || next == (m + 1, 0),
            "a part skipped: {:?} then {next:?}",
            w[0]
        );
    }
    for (i, seen) in all.iter().enumerate() {
        ensure!(
            *seen == reference,
            "viewer {i} saw other parts than viewer 0"
        );
    }
    let origin_parts =
        series(d, r#"kiln_http_requests_total{kind="part",status="200"}"#).await? - parts_before;
    let origin_blocking = series(
        d,
        r#"kiln_http_requests_total{kind="playlist_blocking",status="200"}"#,
    )
    .await?
        - blocking_before;
    ensure!(
        origin_parts >= 1.0 && origin_blocking >= 1.0,
        "the origin's request counters did not move: {origin_parts} {origin_blocking}"
    );
    let served = all.iter().map(|s| s.len()).sum::<usize>() as f64;
    eprintln!(
        "{viewers} viewers, {secs} s{}: {parts} parts each; the edge answered {served} part and {served} playlist \
         requests, the origin {origin_parts} and {origin_blocking} ({:.2} and {:.2} per part)",
        if token.is_empty() { "" } else { ", signed" },
        origin_parts / parts,
        origin_blocking / parts
    );
    ensure!(
        origin_parts <= 2.0 * (parts + 1.0) && origin_blocking <= 2.0 * (parts + 1.0),
        "the edge did not collapse: {origin_parts} part and {origin_blocking} playlist requests at the origin \
         for {parts} parts"
    );
    // 500 viewers: the edge answers at least 100 requests for each one the origin does
    let fan = viewers as f64 / 5.0;
    ensure!(
        served >= fan * origin_parts,
        "the edge served {served} part requests for {origin_parts} at the origin (want ≥ {fan}×)"
    );
    Ok(())
}

/// 500 viewers watch a live stream through nginx rendered from the shipped template: no error, every viewer
/// sees every part, and the origin answers at most two requests per part and per playlist version. Then with
/// signed URLs: a bad token gets 403 through the edge, and viewers sharing a token still collapse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_edge_collapses_hundreds_of_ll_hls_viewers_into_one_origin_request_per_part(
) -> Result<()> {
    let key = "edge-test-playback-key-0123456789";
    let d = Daemon::start_default().await?;
    let (st, body) = d.put_stream("e", SPEC).await?;
    ensure!(st == 201, "PUT: {st} {body}");
    d.wait_for_segments("e", "v", 1).await?;
    let dir = tempfile::tempdir()?;
    let origin = d.base.trim_start_matches("http://").to_string();
    let (_edge, edge) = start_edge(&origin, dir.path()).await?;
    watch_through_edge(&d, &edge, 500, 20, "").await?;
    d.shutdown().await?;

    // signed playback: the token is part of the key; the origin still checks every new one
    let d = Daemon::start(kilnd::Config {
        playback_key: Some(key.as_bytes().to_vec()),
        ..Default::default()
    })
    .await?;
    let (st, body) = d.put_stream("e", SPEC).await?;
    ensure!(st == 201, "PUT: {st} {body}");
    let signer = kiln_origin::signing::UrlSigner::new(key.as_bytes()).context("signer")?;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 600;
    let token = format!("&{}", signer.sign("e", exp));
    let dir = tempfile::tempdir()?;
    let origin = d.base.trim_start_matches("http://").to_string();
    let (_edge, edge) = start_edge(&origin, dir.path()).await?;
    let http = reqwest::Client::new();
    let (_, text) = d
        .get_text(&format!(
            "/live/e/v/index.m3u8?{}",
            token.trim_start_matches('&')
        ))
        .await?;
    let (m, p) = hint(&text).context("hint")?;
    let good = format!("{edge}/live/e/v/index.m3u8?_HLS_msn={m}&_HLS_part={p}{token}");
    ensure!(http.get(&good).send().await?.status() == 200);
    // the same request with a forged signature, after the good one is cached
    let forged = good.replace("sig=", "sig=0");
    let status = http.get(&forged).send().await?.status();
    ensure!(status == 403, "a forged token through the edge: {status}");
    ensure!(
        http.get(format!(
            "{edge}/live/e/v/index.m3u8?_HLS_msn={m}&_HLS_part={p}"
        ))
        .send()
        .await?
        .status()
            == 403,
        "no token through the edge"
    );
    watch_through_edge(&d, &edge, 100, 8, &token).await?;
    d.shutdown().await
}
