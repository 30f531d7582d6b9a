// Drives the relay's dashboard in headless Chromium: log in, find the dead letter, redrive it.
// Run by outbox-relay/tests/dashboard_browser.rs, which starts the relay and checks that the
// message reaches its consumer. Input (environment): DASHBOARD_URL, DASHBOARD_TOKEN, DEAD_ID,
// optionally SCREENSHOT (a PNG path). Exits non-zero, with the reason, when a step fails.
import { chromium } from 'playwright-core';

const url = process.env.DASHBOARD_URL;
const token = process.env.DASHBOARD_TOKEN;
const deadId = process.env.DEAD_ID;
if (!url || !token || !deadId) {
  console.error('DASHBOARD_URL, DASHBOARD_TOKEN and DEAD_ID are required');
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run'],
  timeout: 20000,
});
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  page.setDefaultTimeout(10000);
  // Nothing but the dashboard itself may be fetched.
  const foreign = [];
  page.on('request', (req) => {
    if (!req.url().startsWith(url)) foreign.push(req.url());
  });

  const first = await page.goto(`${url}/dashboard`);
  if (first.status() !== 401) throw new Error(`expected 401 before login, got ${first.status()}`);
  await page.fill('input[name=token]', token);
  await Promise.all([page.waitForURL(`${url}/dashboard`), page.click('button[type=submit]')]);

  const row = page.locator('#relay-dead tr', { has: page.locator(`a:text-is("${deadId}")`) });
  await row.waitFor();
  const rowText = await row.innerText();
  if (!rowText.includes('NO_ROUTE')) throw new Error(`dead letter row lacks its reason: ${rowText}`);

  // The dead letter's own page shows its payload.
  await page.click(`#relay-dead a:text-is("${deadId}")`);
  await page.locator('pre').nth(1).waitFor();
  const payload = await page.locator('pre').nth(1).innerText();
  await page.goBack();

  if (process.env.SCREENSHOT) {
    await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
  }

  await Promise.all([
    page.waitForURL(/done=redriven/),
    row.locator('button', { hasText: 'Redrive' }).click(),
  ]);
  const flash = await page.locator('.flash').innerText();
  if (!flash.includes(`Relay dead letter ${deadId} redriven`)) throw new Error(`flash: ${flash}`);
  if (await page.locator(`#relay-dead a:text-is("${deadId}")`).count() !== 0) {
    throw new Error('the dead letter is still listed after its redrive');
  }
  if (foreign.length) throw new Error(`the page fetched other origins: ${foreign.join(', ')}`);
  console.log(JSON.stringify({ redriven: deadId, payload }));
} finally {
  await browser.close();
}
