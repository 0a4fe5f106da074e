//! The page at `/`: the node's capacity (a bar per dimension, per GPU), its streams with their health (real-time
//! ratio, backend, fallbacks, input), its VOD jobs, and a low-latency hls.js player.
//!
//! hls.js comes from `--assets-dir` (`/assets/hls.min.js`) when given — the demo command installs it there —
//! and otherwise from the jsDelivr CDN. Safari plays natively.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The page and its assets (served from `assets_dir` when given).
pub fn router<S>(assets_dir: Option<PathBuf>) -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    OpenApiRouter::new()
        .routes(routes!(page))
        .routes(routes!(favicon))
        .routes(routes!(asset))
        .with_state(Arc::new(assets_dir))
}

/// `GET /`: the node's page for people.
#[utoipa::path(get, path = "/", tag = "page",
    responses((status = 200, description = "The page", content_type = "text/html", body = String)))]
async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// `GET /favicon.ico`: none (browsers ask on every page load; a 204 keeps that out of the 404 counts).
#[utoipa::path(get, path = "/favicon.ico", tag = "page", responses((status = 204, description = "No icon")))]
async fn favicon() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// Serves a file from the assets directory; names are restricted to a flat allowlist of characters, so no path
/// can leave the directory.
#[utoipa::path(get, path = "/assets/{file}", tag = "page",
    params(("file" = String, Path, description = "A file of `--assets-dir` (e.g. `hls.min.js`)")),
    responses(
        (status = 200, description = "The file", content(("text/javascript"), ("text/css"), ("application/octet-stream"))),
        (status = 404, description = "No such file, or no `--assets-dir`"),
    ))]
async fn asset(State(dir): State<Arc<Option<PathBuf>>>, Path(file): Path<String>) -> Response {
    let ok_name = !file.is_empty()
        && !file.starts_with('.')
        && file
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    let (Some(dir), true) = (dir.as_ref(), ok_name) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let ctype = match file.rsplit('.').next() {
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        _ => "application/octet-stream",
    };
    match tokio::fs::read(dir.join(&file)).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, ctype),
                (header::CACHE_CONTROL, "public, max-age=3600"),
            ],
            bytes,
        )
            .into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>kiln</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem; background: #111; color: #eee; }
  video { width: min(960px, 100%); background: #000; display: block; margin: 1rem 0; }
  table { border-collapse: collapse; } td, th { padding: .25rem .75rem; border-bottom: 1px solid #333; text-align: left; }
  a { color: #8cf; } #stats { font-family: monospace; }
  .bar { display: inline-block; width: 9rem; height: .8rem; background: #333; border-radius: 3px; overflow: hidden; vertical-align: middle; }
  .bar > span { display: block; height: 100%; background: #4a8; }
  .bar.warn > span { background: #db4; } .bar.full > span { background: #d54; }
  .dim { font-size: .8rem; color: #aaa; margin-left: .4rem; } .bad { color: #d54; } #error { color: #d54; }
</style>
</head>
<body>
<h1>kiln</h1>
<p id="error"></p>
<form id="login" hidden>This node's API needs the fleet token:
  <input id="token" type="password" size="40"> <button>use it</button></form>
<h2 id="node">Capacity</h2>
<div id="capacity"></div>
<p>Live streams on this node. Click one to play it in low-latency mode.</p>
<table id="streams"><thead><tr><th>stream</th><th>state</th><th>real time</th><th>encoder</th><th>fallbacks</th><th>input</th><th>renditions</th><th>playlist</th></tr></thead><tbody></tbody></table>
<p>VOD jobs on this node. A finished one plays from the start.</p>
<table id="jobs"><thead><tr><th>job</th><th>state</th><th>progress</th><th>renditions</th></tr></thead><tbody></tbody></table>
<video id="video" controls muted playsinline></video>
<div id="stats">no stream selected</div>
<script>
function loadScript(src) {
  return new Promise((ok, fail) => { const s = document.createElement('script'); s.src = src; s.onload = ok; s.onerror = fail; document.head.appendChild(s); });
}
const hlsReady = loadScript('/assets/hls.min.js').catch(() => loadScript('https://cdn.jsdelivr.net/npm/hls.js@1/dist/hls.min.js'));
let hls = null, current = null;
const esc = s => String(s ?? '').replace(/[&<>"']/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
function auth() { const t = sessionStorage.getItem('kilnToken'); return t ? { headers: { Authorization: 'Bearer ' + t } } : {}; }
document.getElementById('login').onsubmit = e => {
  e.preventDefault(); sessionStorage.setItem('kilnToken', document.getElementById('token').value);
  document.getElementById('login').hidden = true; refresh();
};
const units = { cpu_millicores: 'mc', memory_mib: 'MiB', nvenc_fps: 'fps', nvdec_fps: 'fps', encoder_sessions: '', vram_mib: 'MiB' };
function bar(name, used, cap) {
  if (!cap) return '';
  const f = Math.min(1, used / cap), cls = f >= 0.95 ? 'full' : f >= 0.8 ? 'warn' : '';
  return `<div data-dim="${name}" data-used="${used}" data-cap="${cap}"><span class="bar ${cls}"><span style="width:${(f * 100).toFixed(1)}%"></span></span>` +
    `<span class="dim">${esc(name)} ${used} / ${cap} ${units[name] ?? ''}</span></div>`;
}
async function capacity() {
  const r = await fetch('/v1/capacity', auth());
  if (r.status === 401) { document.getElementById('login').hidden = false; throw new Error('the fleet token is needed'); }
  const c = await r.json();
  document.getElementById('node').textContent = `Capacity of ${c.node_id}${c.draining ? ' (draining)' : ''}`;
  let html = `<div data-host>host` + bar('cpu_millicores', c.host.allocated.cpu_millicores, c.host.capacity.cpu_millicores) +
    bar('memory_mib', c.host.allocated.memory_mib, c.host.capacity.memory_mib) +
    `<span class="dim">serving viewers: ${c.host.serving?.millicores ?? 0} mc measured, ${c.host.serving?.reserved_millicores ?? 0} mc kept free${c.host.serving?.headroom_rps != null ? `, room for ${c.host.serving.headroom_rps} requests/s more` : ''}</span></div>`;
  for (const g of c.gpus) {
    html += `<div data-gpu="${g.index}">GPU ${g.index} ${esc(g.model)}` +
      ['nvenc_fps', 'nvdec_fps', 'encoder_sessions', 'vram_mib'].map(d => bar(d, g.allocated[d], g.capacity[d])).join('') + '</div>';
  }
  if (!c.gpus.length) html += `<div class="dim">no GPU: every stream encodes on the CPU</div>`;
  const fits = Object.entries(c.headroom).map(([p, n]) => `${esc(p)} ${n}`).join(', ');
  html += `<div class="dim">fits now: ${fits}</div>`;
  document.getElementById('capacity').innerHTML = html;
}
function input(s) {
  if (s.publisher) return `${esc(s.publisher.protocol)} publisher ${esc(s.publisher.address)}, ${s.publisher.input_bitrate_kbps} kb/s`;
  if (s.resilience) return `${esc(s.resilience.active_input)}`;
  return esc(s.source);
}
async function refresh() {
  try { await capacity(); document.getElementById('error').textContent = ''; }
  catch (e) { document.getElementById('error').textContent = e.message; }
  const res = await fetch('/v1/streams', auth()); if (!res.ok) return; const streams = await res.json();
  const body = document.querySelector('#streams tbody'); body.innerHTML = '';
  for (const s of streams) {
    const tr = document.createElement('tr');
    tr.dataset.stream = s.id; tr.dataset.state = s.state; tr.dataset.backend = s.backend.kind;
    const r = s.renditions.map(r => r.kind === 'video' ? `${r.name} ${r.width}x${r.height}` : r.name).join(', ');
    const ratio = s.recent_realtime_ratio == null ? '—' : s.recent_realtime_ratio.toFixed(2) + '×';
    const enc = s.backend.kind === 'nvenc' ? `NVENC GPU ${s.backend.gpu}` : 'x264 (CPU)';
    tr.innerHTML = `<td><a href="#${esc(s.id)}">${esc(s.id)}</a></td><td>${esc(s.state)}</td>` +
      `<td class="${s.behind_real_time ? 'bad' : ''}">${ratio}${s.behind_real_time ? ' behind' : ''}</td><td>${enc}</td>` +
      `<td>${s.fallbacks.length}</td><td>${input(s)}</td><td>${esc(r)}</td><td><code>${esc(s.playback)}</code></td>`;
    tr.querySelector('a').onclick = () => play(s.id);
    body.appendChild(tr);
  }
  document.body.dataset.loaded = Date.now();
  const jr = await fetch('/v1/jobs', auth());
  if (jr.ok) {
    const jbody = document.querySelector('#jobs tbody'); jbody.innerHTML = '';
    for (const j of (await jr.json()).slice(0, 20)) {
      const tr = document.createElement('tr');
      const r = (j.renditions || []).map(r => `${r.width}x${r.height}`).join(', ');
      const name = j.state === 'done' ? `<a href="#vod:${j.id}">${j.id}</a>` : j.id;
      tr.innerHTML = `<td>${name}</td><td>${j.state}</td><td>${(j.progress * 100).toFixed(0)} %</td><td>${r}</td>`;
      const a = tr.querySelector('a'); if (a) a.onclick = () => play('vod:' + j.id);
      jbody.appendChild(tr);
    }
  }
  if (!current && location.hash) play(location.hash.slice(1));
  else if (!current && streams.length) play((streams.find(s => s.state === 'running') || streams[0]).id);
}
// hls.js errors, for whoever drives this page (the browser tests read them)
window.kilnErrors = [];
async function play(id) {
  current = id; const video = document.getElementById('video');
  const vod = id.startsWith('vod:');
  const url = vod ? `/vod/${id.slice(4)}/master.m3u8` : `/live/${id}/master.m3u8`;
  await hlsReady.catch(() => {});
  if (hls) { hls.destroy(); hls = null; }
  if (window.Hls && Hls.isSupported()) {
    // maxLiveSyncPlaybackRate lets hls.js catch up to its target latency (PART-HOLD-BACK) after start-up or a stall.
    hls = vod ? new Hls() : new Hls({ lowLatencyMode: true, backBufferLength: 30, maxLiveSyncPlaybackRate: 1.5 });
    hls.loadSource(url); hls.attachMedia(video);
    hls.on(Hls.Events.MANIFEST_PARSED, () => video.play().catch(() => {}));
    hls.on(Hls.Events.ERROR, (_, d) => window.kilnErrors.push({ type: d.type, details: d.details, fatal: d.fatal }));
    // hls.js adds liveSyncOnStallIncrease (1 s by default) to its target latency for every buffer stall, for good.
    // On a low-latency stream the unit of lateness is a part: one stall (a slow start, a busy viewer machine) costs
    // one part of latency, not three.
    // A viewer more than one segment behind its target (a slow start, a long stall) jumps back to live; within
    // that, it catches up by playing faster. (hls.js never jumps by default: its limit is unset.)
    hls.on(Hls.Events.LEVEL_LOADED, (_, d) => {
      if (!d.details.live || !d.details.partTarget) return;
      hls.config.liveSyncOnStallIncrease = d.details.partTarget;
      hls.config.liveMaxLatencyDuration = (d.details.partHoldBack || 3 * d.details.partTarget) + d.details.targetduration;
    });
    window.kilnHls = hls;
  } else if (video.canPlayType('application/vnd.apple.mpegurl')) {
    video.src = url; video.play().catch(() => {});
  }
}
setInterval(() => {
  const v = document.getElementById('video');
  const lat = hls && hls.latency ? hls.latency.toFixed(2) + ' s' : 'n/a (VOD or not started)';
  document.getElementById('stats').textContent = current ? `${current}: time ${v.currentTime.toFixed(1)} s, live latency ${lat}` : 'no stream selected';
}, 500);
refresh(); setInterval(refresh, 5000);
</script>
</body>
</html>
"##;
