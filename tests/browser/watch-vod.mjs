// Plays a finished VOD job from a kilnd page in headless Chromium (hls.js) the way a viewer would: starts it,
// switches to every rendition in turn (waiting until the picture has that rendition's size), then seeks near the
// end and waits for `ended`. Prints one JSON line with what it saw.
//   node tests/browser/watch-vod.mjs 'http://127.0.0.1:8080/#vod:JOB' /tmp/kiln-vod.png
import { openPlaying } from './page.mjs';

const [url, shot = '/tmp/kiln-vod.png'] = process.argv.slice(2);
const { browser, page } = await openPlaying(url);
const levels = await page.evaluate(() => window.kilnHls.levels.map(l => ({ width: l.width, height: l.height, codecs: l.attrs.CODECS })));
const shown = [];
for (let i = 0; i < levels.length; i++) {
  // restart near the beginning so that every level has media left to play
  await page.evaluate(i => { const v = document.querySelector('video'); v.currentTime = 0.5; window.kilnHls.currentLevel = i; v.play(); }, i);
  try {
    await page.waitForFunction(l => document.querySelector('video').videoWidth === l.width
      && document.querySelector('video').videoHeight === l.height, levels[i], { timeout: 20000 });
    shown.push({ level: i, width: levels[i].width, height: levels[i].height });
  } catch (e) {
    const v = await page.evaluate(() => [document.querySelector('video').videoWidth, document.querySelector('video').videoHeight]);
    shown.push({ level: i, failed: `picture stayed ${v[0]}x${v[1]}` });
  }
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
