// The operators' pages in Debian's headless Chromium: opens URL, waits until the page has rendered its data
// (`document.body.dataset.loaded`), prints what it shows (rows with data-* attributes) as one JSON line, and
// saves a screenshot to SHOT.  Usage: node pages.mjs URL SHOT
import { chromium } from 'playwright-core';

const [url, shot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
         '--disable-sync', '--no-first-run'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const errors = [];
  page.on('pageerror', e => errors.push(String(e)));
  page.on('console', m => { if (m.type() === 'error') errors.push(m.text()); });
  await page.goto(url);
  await page.waitForFunction(() => document.body.dataset.loaded, null, { timeout: 20000 });
  const shown = await page.evaluate(() => {
    const rows = sel => [...document.querySelectorAll(sel)].map(e => ({ ...e.dataset }));
    const bars = [...document.querySelectorAll('[data-dim]')].map(e => ({
      dim: e.dataset.dim, used: Number(e.dataset.used), cap: Number(e.dataset.cap),
      width: parseFloat(e.querySelector('.bar > span').style.width),
    }));
    const leader = document.querySelector('[data-leader]');
    return {
      title: document.title,
      nodes: rows('tr[data-node]').filter(r => r.state),
      streams: rows('tr[data-stream]'),
      presets: rows('tr[data-preset]'),
      gpus: rows('[data-gpu]'),
      bars,
      leader: leader ? { id: leader.dataset.leader, epoch: Number(leader.dataset.epoch) } : null,
      error: document.getElementById('error')?.textContent ?? '',
    };
  });
  if (shot) await page.screenshot({ path: shot, fullPage: true });
  console.log(JSON.stringify({ ...shown, errors }));
} finally {
  await browser.close();
}
