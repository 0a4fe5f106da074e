// Plays a kilnd page in headless Chromium (hls.js, low-latency mode) and reports what a viewer would see:
// playback time advancing, stalls, hls.js live latency, and a screenshot.
//   node tests/browser/watch.mjs http://127.0.0.1:8080/ 30 /tmp/kiln.png [https://edge:port]
// (the optional last argument: a shield in front of the daemon that the /live/ requests go to; page.mjs)
// Needs: Debian's chromium, and playwright-core installed next to this script (npm ci --prefix tests/browser).
import { openPlaying } from './page.mjs';

const [url = 'http://127.0.0.1:8080/', seconds = '30', shot = '/tmp/kiln-page.png', via] = process.argv.slice(2);
const { browser, page } = await openPlaying(url, via);
let stalls = 0, last = -1, samples = [];
for (let i = 0; i < Number(seconds); i++) {
  await page.waitForTimeout(1000);
  const s = await page.evaluate(() => ({ t: document.querySelector('video').currentTime, lat: window.kilnHls.latency,
    level: window.kilnHls.currentLevel, target: window.kilnHls.targetLatency,
    // wall clock minus the PROGRAM-DATE-TIME of the frame on screen: for a publish stream, publish-to-screen
    pdtLag: window.kilnHls.playingDate ? (Date.now() - window.kilnHls.playingDate.getTime()) / 1000 : null,
    waiting: document.querySelector('video').readyState < 3,
    ahead: (v => { const b = v.buffered; return b.length ? b.end(b.length - 1) - v.currentTime : 0; })(document.querySelector('video')),
    rate: document.querySelector('video').playbackRate }));
  if (s.t <= last) stalls++;
  last = s.t; samples.push(s);
}
await page.screenshot({ path: shot });
const lats = samples.map(s => s.lat).filter(x => x > 0);
// hls.js's own stall events (bufferStalledError): each one raises its target latency (liveSyncOnStallIncrease).
const hlsStalls = await page.evaluate(() => window.kilnErrors.filter(e => e.details === 'bufferStalledError').length);
const pdt = samples.map(s => s.pdtLag).filter(x => x !== null && x > 0);
const median = xs => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const result = { seconds: Number(seconds), playedTo: last, stalls, hlsStalls, targetLatency: samples.at(-1).target,
  latencySamples: lats.length, latencyLast: lats.at(-1), latencyMedian: median(lats),
  pdtSamples: pdt.length, pdtLatencyMedian: median(pdt), pdtLatencyMax: Math.max(...pdt),
  // the series, for whoever reads a failure: latency and buffer ahead each second, and every hls.js error
  latencies: samples.map(s => s.lat && +s.lat.toFixed(2)), ahead: samples.map(s => +s.ahead.toFixed(2)), rates: samples.map(s => s.rate),
  errors: await page.evaluate(() => window.kilnErrors.map(e => e.details)),
  // the protocols the browser fetched /live/ over (ALPN's choice: "h2", "http/1.1"; an answer from the browser's
  // own cache, which a viewer with a `via` does not use, has none)
  liveProtocols: await page.evaluate(() => [...new Set(performance.getEntriesByType('resource')
    .filter(e => new URL(e.name).pathname.startsWith('/live/')).map(e => e.nextHopProtocol).filter(p => p))]),
  fatalErrors: await page.evaluate(() => window.kilnErrors.filter(e => e.fatal).length) };
console.log(JSON.stringify(result));
await browser.close();
process.exit(stalls === 0 && last > Number(seconds) - 5 ? 0 : 1);
