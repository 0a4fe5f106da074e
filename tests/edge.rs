//! The LL-HLS shields (`deploy/edge/`): a real nginx rendered from `kiln-edge.conf.template` and a real Varnish
//! from `kiln-edge.vcl.template`, each in front of a real kilnd. Hundreds of simulated LL-HLS viewers (one async
//! client: blocking playlist reloads on each preload hint, then the part) watch through the edge; kilnd's own
//! request counters show that the edge collapses them into about one origin request per part and per playlist
//! version, and the origin's own publish stamps give how long after its publish each viewer had each part.
//! Viewers reach Varnish over TLS and HTTP/2 through hitch (`kiln-edge-hitch.conf.template`), as browsers do.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kiln_integration::Daemon;

const SPEC: &str = r#"{"source": "test:pattern=ball",
    "renditions": [{"name": "v", "width": 160, "height": 90, "fps": 30, "bitrate_kbps": 200}],
    "audio": {"enabled": false}}"#;

/// The caching tier in front of the origin.
#[derive(Clone, Copy, Debug)]
enum Shield {
    Nginx,
    Varnish,
}

/// A running shield: its base URL (plain HTTP/1.1) and the one viewers reach it on over TLS with ALPN h2 (nginx
/// itself; Varnish through hitch); its processes are stopped on drop, hitch before the shield behind it
/// (SIGTERM, so nginx's workers, Varnish's child and hitch's workers go with them).
struct Edge {
    children: Vec<tokio::process::Child>,
    base: String,
    h2_base: String,
}

/// The edge's ports: plain HTTP/1.1, TLS, and Varnish's PROXY-protocol listener that hitch writes to.
#[derive(Clone, Copy)]
struct Ports {
    plain: u16,
    tls: u16,
    proxy: u16,
}

impl Drop for Edge {
    fn drop(&mut self) {
        for child in self.children.iter_mut().rev() {
            let Some(pid) = child.id() else { continue };
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            // let the master stop its workers and nginx's cache manager before kill_on_drop's SIGKILL (seen: a
            // master killed at once left its cache manager running)
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// The `${NAME}`s in `text`.
fn variables(text: &str) -> std::collections::BTreeSet<&str> {
    text.split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once('}').map(|(name, _)| name))
        .collect()
}

/// The shipped template `file`, rendered as envsubst would for `origin` (host:port), the edge's `ports`, and the
/// cache directory and TLS certificate under `dir`. The envsubst command in the template's header must name
/// every variable the template uses (envsubst leaves any other as it is).
fn render(file: &str, origin: &str, ports: Ports, dir: &Path) -> Result<String> {
    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/edge")
            .join(file),
    )?;
    let listed = template
        .lines()
        .find(|l| l.contains("envsubst '"))
        .map(variables)
        .with_context(|| format!("{file}: no envsubst command in its header"))?;
    ensure!(
        listed == variables(&template),
        "{file}: its header's envsubst names {listed:?}, the template uses {:?}",
        variables(&template)
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (host, origin_port) = origin.rsplit_once(':').context("host:port")?;
    let rendered = template
        .replace("${KILN_ORIGIN}", origin)
        .replace("${KILN_ORIGIN_HOST}", host)
        .replace("${KILN_ORIGIN_PORT}", origin_port)
        .replace("${KILN_EDGE_LISTEN}", &format!("127.0.0.1:{}", ports.plain))
        .replace(
            "${KILN_EDGE_TLS_LISTEN}",
            &format!("127.0.0.1:{}", ports.tls),
        )
        .replace("${KILN_EDGE_TLS_HOST}", "127.0.0.1")
        .replace("${KILN_EDGE_TLS_PORT}", &ports.tls.to_string())
        .replace("${KILN_VARNISH_PROXY_PORT}", &ports.proxy.to_string())
        .replace("${KILN_HITCH_WORKERS}", &cores.to_string())
        .replace(
            "${KILN_TLS_CERT}",
            &dir.join("edge.pem").display().to_string(),
        )
        .replace(
            "${KILN_TLS_KEY}",
            &dir.join("edge.key").display().to_string(),
        )
        .replace(
            "${KILN_CACHE_DIR}",
            &dir.join("cache").display().to_string(),
        );
    ensure!(
        !rendered.contains("${"),
        "{file}: a variable the test does not set"
    );
    Ok(rendered)
}

/// A self-signed certificate for 127.0.0.1 in `dir` (edge.pem, edge.key).
fn self_signed(dir: &Path) -> Result<()> {
    let st = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(dir.join("edge.key"))
        .arg("-out")
        .arg(dir.join("edge.pem"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("openssl")?;
    ensure!(st.success(), "openssl could not make a certificate");
    Ok(())
}

/// `/usr/sbin/<name>` where it exists (a user's PATH may not have /usr/sbin), else `name`.
fn sbin(name: &str) -> String {
    let path = Path::new("/usr/sbin").join(name);
    if path.exists() {
        path.display().to_string()
    } else {
        name.to_string()
    }
}

/// The command that runs `shield` in the foreground on `ports`, its configuration written under `dir`.
fn shield_command(
    shield: Shield,
    origin: &str,
    ports: Ports,
    dir: &Path,
) -> Result<tokio::process::Command> {
    Ok(match shield {
        Shield::Nginx => {
            let rendered = render("kiln-edge.conf.template", origin, ports, dir)?;
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
            let mut c = tokio::process::Command::new(sbin("nginx"));
            c.arg("-c").arg(dir.join("nginx.conf")).arg("-p").arg(dir);
            c
        }
        Shield::Varnish => {
            let rendered = render("kiln-edge.vcl.template", origin, ports, dir)?;
            std::fs::write(dir.join("kiln-edge.vcl"), rendered)?;
            let mut c = tokio::process::Command::new(sbin("varnishd"));
            // foreground, no privilege separation (the test's temporary directory is private to its user), the
            // management port off, HTTP/2 on and a PROXY listener for hitch, as the template says
            c.args(["-F", "-j", "none", "-T", "none", "-s", "malloc,256m"])
                .args(["-p", "feature=+http2", "-p", "rush_exponent=1000"])
                .args(["-p", "thread_pool_min=500", "-a"])
                .arg(format!("127.0.0.1:{}", ports.plain))
                .arg("-a")
                .arg(format!("127.0.0.1:{},PROXY", ports.proxy))
                .arg("-n")
                .arg(dir.join("varnish"))
                .arg("-f")
                .arg(dir.join("kiln-edge.vcl"));
            c
        }
    })
}

/// hitch in the foreground from `kiln-edge-hitch.conf.template`: TLS with ALPN h2 on `ports.tls`, to Varnish's
/// PROXY listener, with a worker per core of this host. hitch refuses to run its workers as root: as root (CI),
/// they run as nobody (the certificate is read before that).
fn hitch_command(origin: &str, ports: Ports, dir: &Path) -> Result<tokio::process::Command> {
    let rendered = render("kiln-edge-hitch.conf.template", origin, ports, dir)?;
    std::fs::write(dir.join("hitch.conf"), rendered)?;
    let mut c = tokio::process::Command::new(sbin("hitch"));
    c.arg(format!("--config={}", dir.join("hitch.conf").display()));
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .context("id -u")?;
    if root.stdout.trim_ascii() == b"0" {
        c.arg("--user=nobody");
    }
    Ok(c)
}

/// Runs `command` (its stderr in `dir/<name>.log`) and waits until it accepts connections on `port`.
async fn spawn_listening(
    name: &str,
    mut command: tokio::process::Command,
    port: u16,
    dir: &Path,
) -> Result<tokio::process::Child> {
    let log_file = dir.join(format!("{name}.log"));
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log_file)?))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("{name} (apt-get install nginx-light varnish hitch)"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        let log = || {
            std::fs::read_to_string(&log_file).unwrap_or_default()
                + &std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        };
        ensure!(
            Instant::now() < deadline && child.try_wait()?.is_none(),
            "{name} did not start: {}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(child)
}

/// `shield` with the shipped templates rendered for `origin` (host:port), in `dir`: for Varnish, hitch too.
async fn start_edge(shield: Shield, origin: &str, dir: &Path) -> Result<Edge> {
    // three free ports, held until all are chosen so that none is picked twice
    let held = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let port = |i: usize| -> Result<u16> { Ok(held[i].local_addr()?.port()) };
    let ports = Ports {
        plain: port(0)?,
        tls: port(1)?,
        proxy: port(2)?,
    };
    drop(held);
    self_signed(dir)?;
    let name = format!("{shield:?}").to_lowercase();
    let command = shield_command(shield, origin, ports, dir)?;
    let mut children = vec![spawn_listening(&name, command, ports.plain, dir).await?];
    if let Shield::Varnish = shield {
        let hitch = hitch_command(origin, ports, dir)?;
        children.push(spawn_listening("hitch", hitch, ports.tls, dir).await?);
    }
    let base = format!("http://127.0.0.1:{}", ports.plain);
    Ok(Edge {
        children,
        h2_base: format!("https://127.0.0.1:{}", ports.tls),
        base,
    })
}

/// The test's HTTP clients: a pooled connection idle for 2 s is dropped. Varnish closes one idle for 5 s
/// (`timeout_idle`), and a request sent on it as it closes fails ("connection closed before message completed";
/// seen once in the 500-viewer run); a browser retries such a request, reqwest does not.
fn client() -> reqwest::ClientBuilder {
    reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(2))
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
/// again. Returns the parts it got, in order, each with how long after its publish at the origin its bytes had
/// arrived (`since`: read from the origin's own publish stamps at that moment), and how many blocking reloads it
/// made.
async fn viewer(
    http: reqwest::Client,
    base: String,
    first: (u64, u64),
    parts: usize,
    token: String,
    since: Stamps,
) -> Result<(Seen, usize)> {
    let mut next = first;
    let mut seen = Vec::new();
    let mut reloads = 0;
    while seen.len() < parts {
        reloads += 1;
        let (m, p) = next;
        let url = format!("{base}/live/e/v/index.m3u8?_HLS_msn={m}&_HLS_part={p}{token}");
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
                    "{base}/live/e/v/{name}?{}",
                    token.trim_start_matches('&')
                ))
                .send()
                .await?;
            ensure!(part.status() == 200, "{name}: {}", part.status());
            ensure!(!part.bytes().await?.is_empty(), "{name}: empty");
            seen.push(((m, p), since((m, p))));
        }
        next = hint(&text).context("no preload hint")?;
    }
    Ok((seen, reloads))
}

/// The parts a viewer got, in order, each with how long after its publish it had the bytes (`None`: too late for
/// the origin's stamps).
type Seen = Vec<((u64, u64), Option<Duration>)>;

/// How long ago the origin published a part (`None`: too long ago for its stamps, ~5 s).
type Stamps = std::sync::Arc<dyn Fn((u64, u64)) -> Option<Duration> + Send + Sync>;

/// The origin's publish stamps of rendition `v` of stream `e`, in the daemon's process.
fn stamps(d: &Daemon) -> Result<Stamps> {
    let stream = d.state.origin.get("e").context("stream e")?;
    let r = stream.rendition("v").context("rendition v")?.clone();
    Ok(std::sync::Arc::new(move |(msn, part)| {
        r.since_part_published(kiln_llhls::packager::PartPos { msn, part })
            .map(Duration::from_secs_f64)
    }))
}

/// A series' value in the daemon's `/metrics` (0 when absent).
async fn series(d: &Daemon, name: &str) -> Result<f64> {
    let (_, text) = d.get_text("/metrics").await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0))
}

/// The p-th percentile (0–100) of sorted `v` (`Duration::MAX` when empty).
fn percentile(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::MAX;
    }
    v[((v.len() - 1) as f64 * p / 100.0).round() as usize]
}

/// The parts every viewer saw after the first `skip`: how long after its publish at the origin each had the
/// part's bytes.
fn delays(all: &[Seen], skip: usize) -> Delays {
    let mut known = Vec::new();
    let mut unknown = 0;
    for (_, d) in all.iter().flat_map(|seen| seen.iter().skip(skip)) {
        match d {
            Some(d) => known.push(*d),
            None => unknown += 1,
        }
    }
    known.sort();
    Delays { known, unknown }
}

/// How long after its publish each viewer had each part (sorted), and how many parts it had later than the
/// origin's stamps reach back (~5 s).
struct Delays {
    known: Vec<Duration>,
    unknown: usize,
}

/// Every viewer saw the same parts, each the next of the one before (the next part of its segment, or the next
/// segment's first).
fn check_continuity(all: &[Seen]) -> Result<Vec<(u64, u64)>> {
    let parts = |v: &Seen| v.iter().map(|(p, _)| *p).collect::<Vec<_>>();
    let reference = parts(&all[0]);
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
            parts(seen) == reference,
            "viewer {i} saw other parts than viewer 0"
        );
    }
    Ok(reference)
}

/// What a run of viewers measured: for every viewer and every part after the first segment, how long after its
/// publish at the origin the viewer had the part (sorted), through the edge and (the anchor) on the origin
/// directly.
struct Watched {
    edge: Delays,
    direct: Delays,
}

/// `viewers` viewers for `secs` through the edge, and at the same time `direct` viewers on the origin itself;
/// checks that all saw every part and that, for the edge's viewers, the origin saw at most two requests per part
/// and per playlist version. `token`: a query suffix (`&exp=…&sig=…`) or empty.
async fn watch_through_edge(
    d: &Daemon,
    edge: &Edge,
    (viewers, direct): (usize, usize),
    secs: u64,
    token: &str,
) -> Result<Watched> {
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
    let http = client().timeout(Duration::from_secs(20)).build()?;
    // 3 parts a second (334 ms parts): every viewer watches the same parts, a fixed number of them
    let want = (secs * 3) as usize;
    let since = stamps(d)?;
    let spawn = |base: &str| {
        tokio::spawn(viewer(
            http.clone(),
            base.to_string(),
            first,
            want,
            token.to_string(),
            since.clone(),
        ))
    };
    let tasks: Vec<_> = (0..viewers).map(|_| spawn(&edge.base)).collect();
    let direct_tasks: Vec<_> = (0..direct).map(|_| spawn(&d.base)).collect();
    let (mut all, mut reloads) = (Vec::new(), 0);
    for t in tasks {
        let (seen, n) = t.await??;
        all.push(seen);
        reloads += n;
    }
    let (mut on_origin, mut direct_reloads) = (Vec::new(), 0);
    for t in direct_tasks {
        let (seen, reloads) = t.await??;
        on_origin.push(seen);
        direct_reloads += reloads;
    }
    let parts = check_continuity(&all)?.len() as f64;
    // what the edge asked for: the direct viewers' own requests are known exactly
    let origin_parts = series(d, r#"kiln_http_requests_total{kind="part",status="200"}"#).await?
        - parts_before
        - (direct * want) as f64;
    let origin_blocking = series(
        d,
        r#"kiln_http_requests_total{kind="playlist_blocking",status="200"}"#,
    )
    .await?
        - blocking_before
        - direct_reloads as f64;
    ensure!(
        origin_parts >= 1.0 && origin_blocking >= 1.0,
        "the origin's request counters did not move: {origin_parts} {origin_blocking}"
    );
    let served = all.iter().map(|s| s.len()).sum::<usize>() as f64;
    // the first segment's 6 parts: hundreds of new connections set up at once, which a player does once
    let late = delays(&all, 6);
    let first_parts = delays(&all, 0);
    let on_origin = delays(&on_origin, 6);
    let anchor = if direct > 0 {
        format!(
            "; {direct} viewers on the origin itself: p50 {:?} p99 {:?}",
            percentile(&on_origin.known, 50.0),
            percentile(&on_origin.known, 99.0)
        )
    } else {
        String::new()
    };
    eprintln!(
        "{viewers} viewers, {secs} s{}: {parts} parts each; the edge answered {served} part and {reloads} \
         blocking playlist requests, the origin {origin_parts} and {origin_blocking} ({:.2} and {:.2} per part); \
         each part in the viewers' hands after its publish at the origin: p50 {:?} p99 {:?} max {:?}, {} over 5 s \
         (first segment included: max {:?}, {} over 5 s){anchor}",
        if token.is_empty() { "" } else { ", signed" },
        origin_parts / parts,
        origin_blocking / parts,
        percentile(&late.known, 50.0),
        percentile(&late.known, 99.0),
        percentile(&late.known, 100.0),
        late.unknown,
        percentile(&first_parts.known, 100.0),
        first_parts.unknown,
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
    Ok(Watched {
        edge: late,
        direct: on_origin,
    })
}

/// 500 viewers watch a live stream for `secs` through `shield` rendered from its shipped template: no error,
/// every viewer sees every part, and the origin answers at most two requests per part and per playlist version.
/// Then 50 viewers, few enough that this 2-core host keeps up with them (500 saturate it: the client and kilnd
/// take 1.3 cores, the shield the rest, and the viewers fall behind by a second), beside 50 on the origin
/// itself: the delay from a part's publish to its bytes in a viewer's hands, at the 99th percentile, is at most
/// `added_limit` more through the edge than on the origin. Then HTTP/2 and errors through the edge
/// ([`h2_errors_and_the_api`]). Then with signed URLs: a bad or missing token gets 403 through the edge, and
/// viewers sharing a token still collapse.
async fn shield_collapses_viewers(shield: Shield, secs: u64, added_limit: Duration) -> Result<()> {
    let d = Daemon::start_default().await?;
    let (st, body) = d.put_stream("e", SPEC).await?;
    ensure!(st == 201, "PUT: {st} {body}");
    d.wait_for_segments("e", "v", 1).await?;
    let dir = tempfile::tempdir()?;
    let origin = d.base.trim_start_matches("http://").to_string();
    let edge = start_edge(shield, &origin, dir.path()).await?;
    watch_through_edge(&d, &edge, (500, 0), secs, "").await?;
    let watched = watch_through_edge(&d, &edge, (50, 50), 6, "").await?;
    ensure!(
        watched.edge.unknown == 0 && watched.direct.unknown == 0,
        "through {shield:?}, {} parts reached their viewer over 5 s after the publish ({} on the origin)",
        watched.edge.unknown,
        watched.direct.unknown
    );
    let (edge_p99, direct_p99) = (
        percentile(&watched.edge.known, 99.0),
        percentile(&watched.direct.known, 99.0),
    );
    ensure!(
        edge_p99 <= direct_p99 + added_limit,
        "through {shield:?}, a part reached 1 % of the viewers over {edge_p99:?} after its publish, against \
         {direct_p99:?} on the origin itself (limit: {added_limit:?} more)"
    );
    h2_errors_and_the_api(shield, &d, &edge).await?;
    drop(edge);
    d.shutdown().await?;
    signed_through_edge(shield).await
}

/// Signed playback through `shield`: the token is part of the key; the origin still checks every new one.
async fn signed_through_edge(shield: Shield) -> Result<()> {
    let key = "edge-test-playback-key-0123456789";
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
    let edge = start_edge(shield, &origin, dir.path()).await?;
    let http = client().build()?;
    let (_, text) = d
        .get_text(&format!(
            "/live/e/v/index.m3u8?{}",
            token.trim_start_matches('&')
        ))
        .await?;
    let (m, p) = hint(&text).context("hint")?;
    let e = &edge.base;
    let good = format!("{e}/live/e/v/index.m3u8?_HLS_msn={m}&_HLS_part={p}{token}");
    ensure!(http.get(&good).send().await?.status() == 200);
    // the same request with a forged signature, after the good one is cached
    let forged = good.replace("sig=", "sig=0");
    let status = http.get(&forged).send().await?.status();
    ensure!(
        status == 403,
        "{shield:?}: a forged token through the edge: {status}"
    );
    let bare = format!("{e}/live/e/v/index.m3u8?_HLS_msn={m}&_HLS_part={p}");
    let status = http.get(&bare).send().await?.status();
    ensure!(
        status == 403,
        "{shield:?}: no token through the edge: {status}"
    );
    watch_through_edge(&d, &edge, (50, 0), 3, &token).await?;
    drop(edge);
    d.shutdown().await
}

/// nginx (`kiln-edge.conf.template`). Its cache lock re-checks a waiting request every 500 ms (nginx 1.22 wakes
/// nobody when the answer lands), so a part reaches most viewers up to half a second late, and up to a second
/// when a viewer waits on the lock twice (the blocking reload, then the part): the bound is that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_collapses_hundreds_of_ll_hls_viewers_into_one_origin_request_per_part() -> Result<()>
{
    shield_collapses_viewers(Shield::Nginx, 10, Duration::from_millis(1000)).await
}

/// Varnish (`kiln-edge.vcl.template`): the same collapsing for 30 s, and its waiting list wakes every waiting
/// viewer when the answer lands: at the 99th percentile a part reaches the viewers at most 50 ms later than it
/// reaches viewers on the origin itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn varnish_collapses_hundreds_of_ll_hls_viewers_and_adds_under_50_ms() -> Result<()> {
    shield_collapses_viewers(Shield::Varnish, 30, Duration::from_millis(50)).await
}

/// Through either shield: a blocking reload over HTTP/2 is answered (TLS with ALPN h2: nginx itself, Varnish
/// through hitch; Varnish also over h2c on its plain port); an error stays in the edge at most a second (the
/// origin gives App. B.1's max-age for players, kept in what they get, and `s-maxage=1` for caches) but is
/// cached (a storm of one failing request reaches the origin once); the daemon's API is not reachable through
/// the edge.
async fn h2_errors_and_the_api(shield: Shield, d: &Daemon, edge: &Edge) -> Result<()> {
    // ALPN picks h2 (reqwest offers h2 and http/1.1, as browsers do)
    let h2 = client().danger_accept_invalid_certs(true).build()?;
    let h2c = client().http2_prior_knowledge().build()?;
    let mut ways = vec![(&h2, edge.h2_base.as_str())];
    if let Shield::Varnish = shield {
        ways.push((&h2c, edge.base.as_str()));
    }
    for (http, base) in ways {
        let (_, text) = d.get_text("/live/e/v/index.m3u8").await?;
        let (m, p) = hint(&text).context("hint")?;
        let res = http
            .get(format!(
                "{base}/live/e/v/index.m3u8?_HLS_msn={m}&_HLS_part={p}"
            ))
            .send()
            .await?;
        ensure!(
            res.version() == reqwest::Version::HTTP_2 && res.status() == 200,
            "{shield:?}: h2 through the edge ({base}): {:?} {}",
            res.version(),
            res.status()
        );
        ensure!(res.text().await?.contains(&format!("part-{m}-{p}.m4s")));
    }
    errors_are_cached_a_second(shield, d, edge, &h2).await?;
    accept_encodings_share_one_copy(shield, d, edge, &h2).await?;
    // an unsigned origin refuses a token (caches key on it): through the edge too
    let res = h2
        .get(format!("{}/live/e/v/index.m3u8?sig=1", edge.h2_base))
        .send()
        .await?;
    ensure!(
        res.status() == 400,
        "{shield:?}: a token on an unsigned origin: {}",
        res.status()
    );
    // /vod/ reaches the origin: its JSON error (this daemon has no data directory, so no VOD: 503), not the
    // edge's own page
    let res = h2
        .get(format!("{}/vod/nojob/master.m3u8", edge.h2_base))
        .send()
        .await?;
    let status = res.status();
    let body = res.text().await?;
    ensure!(
        status == 503 && body.contains("\"error\""),
        "{shield:?}: /vod/ did not reach the origin: {status} {body}"
    );
    let api = h2
        .get(format!("{}/v1/streams", edge.h2_base))
        .send()
        .await?;
    ensure!(
        api.status() == 404,
        "the API through the edge: {}",
        api.status()
    );
    Ok(())
}

/// Errors through `shield`: 20 concurrent requests that fail (a blocking request without `_HLS_msn`: 400, max-age
/// 8 for players, kept in what they get, and s-maxage 1) reach the origin once; 2.2 s later it is asked again
/// (nginx counts TTLs in whole seconds: a 1 s TTL ends within 2 s). Ten requests in a row for a missing part (404)
/// reach it once.
async fn errors_are_cached_a_second(
    shield: Shield,
    d: &Daemon,
    edge: &Edge,
    h2: &reqwest::Client,
) -> Result<()> {
    let bad = format!("{}/live/e/v/index.m3u8?_HLS_part=1", edge.h2_base);
    let count = || {
        series(
            d,
            r#"kiln_http_requests_total{kind="playlist_blocking",status="400"}"#,
        )
    };
    let before = count().await?;
    let storm: Vec<_> = (0..20).map(|_| tokio::spawn(h2.get(&bad).send())).collect();
    for r in storm {
        let res = r.await??;
        ensure!(res.status() == 400, "{bad}: {}", res.status());
        let cc = res.headers()["cache-control"].to_str()?;
        ensure!(
            cc == "public, max-age=8, s-maxage=1",
            "{shield:?}: players get {cc}"
        );
    }
    let asked = count().await? - before;
    ensure!(
        asked == 1.0,
        "{shield:?}: 20 requests for a failing key reached the origin {asked} times"
    );
    tokio::time::sleep(Duration::from_millis(2200)).await;
    ensure!(h2.get(&bad).send().await?.status() == 400);
    let asked = count().await? - before;
    ensure!(
        asked == 2.0,
        "{shield:?}: 2.2 s later the origin had answered {asked} requests for a 400 (max-age 8, s-maxage 1)"
    );
    let missing = format!("{}/live/e/v/part-999999-0.m4s", edge.h2_base);
    let count = || series(d, r#"kiln_http_requests_total{kind="part",status="404"}"#);
    let before = count().await?;
    for _ in 0..10 {
        let status = h2.get(&missing).send().await?.status();
        ensure!(status == 404, "{missing}: {status}");
    }
    let asked = count().await? - before;
    ensure!(
        asked == 1.0,
        "{shield:?}: the origin answered {asked} of 10 requests for a missing part"
    );
    Ok(())
}

/// Viewers sending different Accept-Encoding strings (as different browsers do) share the edge's copy of a
/// playlist: after the first, none reaches the origin, and each gets a body it can read.
async fn accept_encodings_share_one_copy(
    shield: Shield,
    d: &Daemon,
    edge: &Edge,
    h2: &reqwest::Client,
) -> Result<()> {
    let (_, text) = d.get_text("/live/e/v/index.m3u8").await?;
    let last = parts_from(&text, (0, 0))
        .last()
        .copied()
        .context("no part")?;
    // a part already published: answered at once, kept 6 x TD
    let url = format!(
        "{}/live/e/v/index.m3u8?_HLS_msn={}&_HLS_part={}",
        edge.h2_base, last.0, last.1
    );
    let count = || {
        series(
            d,
            r#"kiln_http_requests_total{kind="playlist_blocking",status="200"}"#,
        )
    };
    let before = count().await?;
    for ae in [
        "gzip, deflate, br, zstd",
        "gzip, deflate, br",
        "gzip",
        "identity",
        "br",
    ] {
        let res = h2.get(&url).header("accept-encoding", ae).send().await?;
        ensure!(res.status() == 200, "{shield:?} {ae}: {}", res.status());
        let gzipped = res
            .headers()
            .get("content-encoding")
            .is_some_and(|v| v == "gzip");
        ensure!(
            !gzipped || ae.contains("gzip"),
            "{shield:?}: gzip sent to a client that asked for {ae}"
        );
        let body = res.bytes().await?;
        ensure!(
            gzipped || body.starts_with(b"#EXTM3U"),
            "{shield:?} {ae}: not a playlist"
        );
    }
    let asked = count().await? - before;
    // one copy with gzip and one without
    ensure!(
        asked <= 2.0,
        "{shield:?}: 5 Accept-Encoding strings cost the origin {asked} requests for one playlist"
    );
    Ok(())
}

/// hls.js in Chromium through the Varnish shield, over TLS and HTTP/2 from hitch as a browser reaches it, plays
/// with the latency it has on the origin itself: two browsers watch the same stream at the same time for 15 s,
/// one with the page on the shield's origin (its `/live/` requests go to the shield; ALPN must have picked h2),
/// the other on kilnd (HTTP/1.1). Latency is the wall clock minus the PROGRAM-DATE-TIME of the frame on screen
/// (publish to screen), and hls.js's own live latency; each must be within 0.2 s of the direct viewer's, and
/// neither may stall. (nginx's shield adds up to a second by design: its cache lock polls, see the tests above
/// and ARCHITECTURE.md.) hls.js's median latency through hitch and Varnish minus direct, 14 runs: −0.06 to
/// +0.03 s (1.07–1.15 s each way). Both viewers' requests are intercepted alike (page.mjs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hlsjs_plays_through_varnish_at_the_latency_it_has_on_the_origin() -> Result<()> {
    let Some(browser) = kiln_integration::browser_dir()? else {
        return Ok(());
    };
    let d = Daemon::start(kilnd::Config {
        assets_dir: Some(browser.join("node_modules/hls.js/dist")),
        ..Default::default()
    })
    .await?;
    let (st, body) = d.put_stream("e", SPEC).await?;
    ensure!(st == 201, "PUT: {st} {body}");
    d.wait_for_segments("e", "v", 1).await?;
    let dir = tempfile::tempdir()?;
    let origin = d.base.trim_start_matches("http://").to_string();
    let edge = start_edge(Shield::Varnish, &origin, dir.path()).await?;
    let page = format!("{}/#e", d.base);
    let watch = |via: String, shot: &'static str| {
        let (script, page, shot) = (
            browser.join("watch.mjs"),
            page.clone(),
            dir.path().join(shot),
        );
        async move {
            let args = [page.as_ref(), "15".as_ref(), shot.as_os_str(), via.as_ref()];
            kiln_integration::node(&script, &args, Duration::from_secs(90)).await
        }
    };
    // An hls.js buffer stall raises that viewer's target latency by a part for good (see the page), which voids
    // the comparison; seen once in three runs at start-up, with two Chromiums starting at once on this 2-core
    // host. Such a pair is run again, once.
    let mut pair = None;
    for attempt in 1..=2 {
        let (direct, through) = tokio::try_join!(
            watch(d.base.clone(), "direct.png"),
            watch(edge.h2_base.clone(), "edge.png")
        )?;
        eprintln!("attempt {attempt}: direct: {direct}\nthrough Varnish: {through}");
        let stalled = |r: &serde_json::Value| r["hlsStalls"].as_u64() != Some(0);
        let again = attempt == 1 && (stalled(&direct) || stalled(&through));
        pair = Some((direct, through));
        if !again {
            break;
        }
    }
    let (direct, through) = pair.context("no run")?;
    let num = |r: &serde_json::Value, k: &str| r[k].as_f64().with_context(|| format!("{k}: {r}"));
    for (who, r) in [("direct", &direct), ("through Varnish", &through)] {
        ensure!(r["stalls"] == 0, "{who}: stalls: {r}");
        ensure!(num(r, "playedTo")? >= 10.0, "{who}: played only to {r}");
        ensure!(r["fatalErrors"] == 0, "{who}: {r}");
    }
    for (who, r, protocol) in [
        ("direct", &direct, "http/1.1"),
        ("through Varnish", &through, "h2"),
    ] {
        ensure!(
            r["liveProtocols"] == serde_json::json!([protocol]),
            "{who}: /live/ fetched over {}, not {protocol} alone",
            r["liveProtocols"]
        );
    }
    for key in ["pdtLatencyMedian", "latencyMedian"] {
        let (a, b) = (num(&direct, key)?, num(&through, key)?);
        ensure!(
            (b - a).abs() <= 0.2,
            "{key}: {b:.2} s through Varnish against {a:.2} s direct (limit ± 0.2 s)"
        );
    }
    drop(edge);
    d.shutdown().await
}

/// LL-DASH through `shield`: a DASH player asks for a segment as soon as its first chunk may exist
/// (`availabilityTimeOffset`), and the origin sends it part by part as each is published (chunked). 30 viewers ask
/// the shield for the next segment before it starts: they share one origin request and all get the origin's
/// bytes. Returns, per viewer (sorted), the time from its first byte to its last. The MPD and the clock pass
/// through too.
async fn ll_dash_through(shield: Shield) -> Result<Vec<Duration>> {
    let d = Daemon::start_default().await?;
    let (st, body) = d.put_stream("e", SPEC).await?;
    ensure!(st == 201, "PUT: {st} {body}");
    d.wait_for_segments("e", "v", 1).await?;
    let dir = tempfile::tempdir()?;
    let origin = d.base.trim_start_matches("http://").to_string();
    let edge = start_edge(shield, &origin, dir.path()).await?;
    let http = client().build()?;
    let e = &edge.base;
    let mpd = http.get(format!("{e}/live/e/manifest.mpd")).send().await?;
    ensure!(
        mpd.status() == 200,
        "MPD through the edge: {}",
        mpd.status()
    );
    let mpd = mpd.text().await?;
    ensure!(mpd.contains("availabilityTimeOffset"), "not LL-DASH: {mpd}");
    ensure!(http.get(format!("{e}/time")).send().await?.status() == 200);

    // the segment after the one being produced: every viewer asks before its first part exists
    let (_, text) = d.get_text("/live/e/v/index.m3u8").await?;
    let (m, p) = hint(&text).context("hint")?;
    let msn = if p == 0 { m } else { m + 1 };
    let url = format!("{e}/live/e/v/seg-{msn}.m4s");
    let segments = r#"kiln_http_requests_total{kind="segment",status="200"}"#;
    let before = series(&d, segments).await?;
    let viewers: Vec<_> = (0..30)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                let mut res = http.get(&url).send().await?;
                ensure!(res.status() == 200, "{url}: {}", res.status());
                let (mut body, mut first) = (Vec::new(), None);
                while let Some(chunk) = res.chunk().await? {
                    first.get_or_insert_with(Instant::now);
                    body.extend_from_slice(&chunk);
                }
                let first = first.context("an empty body")?;
                anyhow::Ok((body, Instant::now() - first))
            })
        })
        .collect();
    let (mut bodies, mut spans) = (Vec::new(), Vec::new());
    for v in viewers {
        let (body, span) = v.await??;
        bodies.push(body);
        spans.push(span);
    }
    let origin_requests = series(&d, segments).await? - before;
    let complete = d.get_bytes(&format!("/live/e/v/seg-{msn}.m4s")).await?;
    ensure!(
        bodies.iter().all(|b| b.as_slice() == complete.as_ref()),
        "{shield:?}: a viewer's segment differs from the origin's"
    );
    ensure!(
        origin_requests <= 2.0,
        "30 viewers through {shield:?} made {origin_requests} origin requests for one segment"
    );
    spans.sort();
    eprintln!("{shield:?}: first byte to last, per viewer: {spans:?}");
    drop(edge);
    d.shutdown().await?;
    Ok(spans)
}

/// Through Varnish every collapsed viewer gets the segment's parts as they are published (Varnish streams an
/// object still being fetched to every request waiting on it): 6 parts of 1/3 s, so the first part reaches each
/// viewer over a second before the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ll_dash_segments_stream_through_varnish_to_every_collapsed_viewer() -> Result<()> {
    let spans = ll_dash_through(Shield::Varnish).await?;
    ensure!(
        spans[0] >= Duration::from_millis(1000),
        "a viewer got the segment in one go ({:?} from its first byte to its last)",
        spans[0]
    );
    Ok(())
}

/// Through nginx only the viewer whose request went to the origin gets the segment part by part; the cache
/// lock holds the others until the segment is complete (then they get it at once): collapsed, correct, but not
/// low-latency. docs/cdn.md says so: LL-DASH wants Varnish, or a CDN that streams to collapsed requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ll_dash_segments_through_nginx_are_collapsed_but_reach_waiters_whole() -> Result<()> {
    let spans = ll_dash_through(Shield::Nginx).await?;
    ensure!(
        spans[spans.len() - 1] >= Duration::from_millis(1000),
        "even the first viewer got the segment in one go: {spans:?}"
    );
    // what docs/cdn.md says of nginx: if this fails, nginx streams to its lock's waiters and the docs must change
    ensure!(
        spans[spans.len() / 2] < Duration::from_millis(500),
        "most viewers got the segment part by part through nginx: {spans:?}"
    );
    Ok(())
}
