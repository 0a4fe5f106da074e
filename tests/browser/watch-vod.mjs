// Plays a finished VOD job from a kilnd page in headless Chromium (hls.js) the way a viewer would: starts it,
// switches to every rendition in turn (waiting until the picture has that rendition's size), then seeks near the
// end and waits for `ended`. Prints one JSON line with what it saw.
//   node tests/browser/watch-vod.mjs 'http://127.0.0.1:8080/#vod:JOB' /tmp/kiln-vod.png
import { openPlaying } from './page.mjs';

const [url, shot = '/tmp/kiln-vod.png'] = process.argv.slice(2);
const { browser, page } = await openPlaying(url);
const levels = await page.evaluate(() => window.kilnHls.levels.map(l => ({ width: l.width, height: l.height, codecs: l.attrs.CODECS })));
const shown = [];
// What the player is doing, for a report when a picture does not come.
const snapshot = () => page.evaluate(() => {
  const v = document.querySelector('video'), h = window.kilnHls;
  const buffered = [...Array(v.buffered.length).keys()].map(k => [v.buffered.start(k), v.buffered.end(k)]);
  return { size: `${v.videoWidth}x${v.videoHeight}`, time: v.currentTime, paused: v.paused, readyState: v.readyState,
    seeking: v.seeking, buffered, currentLevel: h.currentLevel, loadLevel: h.loadLevel };
});
for (let i = 0; i < levels.length; i++) {
  // Pick the level first (hls.js flushes its buffer), then restart near the beginning so that the level has media
  // left to play. A viewer whose picture does not change scrubs again: the second try is recorded as such.
  const tries = [];
  for (let attempt = 1; attempt <= 2 && !tries.some(t => t.ok); attempt++) {
    await page.evaluate(i => { const v = document.querySelector('video'); window.kilnHls.currentLevel = i;
      v.currentTime = 0.5; v.play(); }, i);
    try {
      await page.waitForFunction(l => document.querySelector('video').videoWidth === l.width
        && document.querySelector('video').videoHeight === l.height, levels[i], { timeout: 15000 });
      tries.push({ ok: true });
    } catch (e) {
      tries.push({ ok: false, state: await snapshot() });
    }
  }
  const entry = { level: i, width: levels[i].width, height: levels[i].height, attempts: tries.length };
  if (!tries.at(-1).ok) entry.failed = tries.map(t => t.state);
  else if (tries.length > 1) entry.firstTry = tries[0].state;
  shown.push(entry);
}
const duration = await page.evaluate(() => document.querySelector('video').duration);
await page.evaluate(() => { const v = document.querySelector('video'); v.currentTime = Math.max(0, v.duration - 1.5); v.play(); });
let ended = false;
try {
  await page.waitForFunction(() => document.querySelector('video').ended, null, { timeout: 20000 });
  ended = true;
} catch (e) { /* reported below */ }
await page.screenshot({ path: shot });
const errors = await page.evaluate(() => window.kilnErrors);
console.log(JSON.stringify({ levels, shown, duration, ended, errors }));
await browser.close();
