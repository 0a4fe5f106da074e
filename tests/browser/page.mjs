// What watch.mjs and watch-vod.mjs share: Debian's headless Chromium (autoplay allowed) on a kilnd page, returned
// once hls.js plays (the page's `window.kilnHls` exists and the video's time has advanced).
import { chromium } from 'playwright-core';

// `via`: a base URL (`http://host:port`) that every /live/ request goes to instead of the page's own origin: a
// CDN shield in front of kilnd, while the page and hls.js still come from kilnd.
export async function openPlaying(url, via) {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--autoplay-policy=no-user-gesture-required',
           '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
  const page = await browser.newPage();
  page.on('console', m => { if (m.type() === 'error') console.error('page:', m.text()); });
  if (via) {
    await page.route(/\/live\//, route => {
      const u = new URL(route.request().url());
      return route.continue({ url: via + u.pathname + u.search });
    });
  }
  await page.goto(url);
  await page.waitForFunction(() => window.kilnHls && document.querySelector('video').currentTime > 0, null,
    { timeout: 30000 });
  return { browser, page };
}
