// What watch.mjs and watch-vod.mjs share: Debian's headless Chromium (autoplay allowed) on a kilnd page, returned
// once hls.js plays (the page's `window.kilnHls` exists and the video's time has advanced).
import { chromium } from 'playwright-core';

// `via`: a base URL (`http(s)://host:port`) that the page's /live/ requests go to: a CDN shield in front of
// kilnd, or kilnd itself for a reference viewer. The page is opened on that origin, so hls.js's /live/ requests
// reach it through Chromium's own network stack (HTTP/2 where a shield offers it over TLS; a test shield's
// certificate is self-signed). Everything else the page loads (the page, hls.js, the API) is fetched from kilnd
// by Playwright and handed to the page. Viewers given a `via` are intercepted alike, whichever it is (an
// intercepted page also has its HTTP cache off), so two of them differ only in where /live/ goes.
export async function openPlaying(url, via) {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--autoplay-policy=no-user-gesture-required',
           '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  page.on('console', m => { if (m.type() === 'error') console.error('page:', m.text()); });
  // every fetch stays in the resource timing buffer (watch.mjs reads the protocols; the default keeps 250)
  await page.addInitScript(() => performance.setResourceTimingBufferSize(100000));
  const daemon = new URL(url);
  if (via) {
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
