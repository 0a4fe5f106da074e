// What watch.mjs and watch-vod.mjs share: Debian's headless Chromium (autoplay allowed) on a kilnd page, returned
// once hls.js plays (the page's `window.kilnHls` exists and the video's time has advanced).
import { chromium } from 'playwright-core';

// `via`: a base URL (`http(s)://host:port`) of a CDN shield in front of kilnd. The page is then opened on the
// shield's origin, so hls.js's /live/ requests go to the shield through Chromium's own network stack (HTTP/2
// where the shield offers it over TLS; its test certificate is self-signed). Everything else the page loads (the
// page, hls.js, the API) is not the shield's: Playwright fetches it from kilnd and hands it to the page.
export async function openPlaying(url, via) {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--autoplay-policy=no-user-gesture-required',
           '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  page.on('console', m => { if (m.type() === 'error') console.error('page:', m.text()); });
  const daemon = new URL(url);
  if (via && new URL(via).origin !== daemon.origin) {
    url = via + daemon.pathname + daemon.search + daemon.hash;
    await page.route(u => !u.pathname.startsWith('/live/'), async route => {
      const u = new URL(route.request().url());
      const response = await route.fetch({ url: daemon.origin + u.pathname + u.search });
      return route.fulfill({ response });
    });
  }
  await page.goto(url);
  await page.waitForFunction(() => window.kilnHls && document.querySelector('video').currentTime > 0, null,
    { timeout: 30000 });
  return { browser, page };
}
