// Drives Debian's Chromium through the jitgate web console, in steps the Rust test
// (tests/tests/console.rs) checks from outside: it prints one line per step and, where the
// test must look at the database or psql, waits for a line on stdin before going on.
//
// Environment: URL (https://localhost:PORT), CERT and KEY (the approver's client
// certificate), REQUEST (a pending request id), MARKER (text of a statement to find, or with
// MODE=recording the text the shell recording shows), SHOTS (directory for screenshots).
import { chromium } from 'playwright-core';
import { createInterface } from 'node:readline';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

const { URL: base, CERT, KEY, REQUEST, MARKER, SHOTS } = process.env;
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const next = async () => (await lines.next()).value;
const say = (s) => process.stdout.write(`${s}\n`);
mkdirSync(SHOTS, { recursive: true });

// HOST_MAP names a host the browser reaches on 127.0.0.1 (the console's registered
// redirect URI cannot be localhost for the provider's native client).
const hostMap = process.env.HOST_MAP ? [`--host-resolver-rules=MAP ${process.env.HOST_MAP} 127.0.0.1`] : [];
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-quic', '--no-first-run', '--disable-component-update', '--disable-sync', ...hostMap],
});
const problems = [];
try {
  const context = await browser.newContext({
    ignoreHTTPSErrors: true,
    // MODE=sso: a browser without a certificate, signing in at the provider.
    clientCertificates: process.env.MODE === 'sso' ? [] : [{ origin: base, certPath: CERT, keyPath: KEY }],
    viewport: { width: 1400, height: 900 },
  });
  const page = await context.newPage();
  // Errors of the console's pages (not of the provider's, in MODE=sso).
  page.on('console', (m) => {
    if (m.type() === 'error' && page.url().startsWith(base)) problems.push(m.text());
  });
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  const shot = (name) => page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });
  const ready = (name) => page.waitForSelector(`body[data-ready="${name}"]`, { timeout: 15000 });
  const done = (what) => page.waitForFunction(
    (w) => document.getElementById('status').textContent === `${w}: done`
      || document.getElementById('status').className === 'error',
    what, { timeout: 15000 });
  const status = () => page.textContent('#status');

  // Sign in with the certificate; the cookie is HttpOnly, Secure, SameSite=Strict.
  const first = await page.goto(`${base}/ui/`);
  say(`CSP ${first.headers()['content-security-policy']}`);
  await page.waitForSelector('#sign-in-cert', { state: 'visible' });
  if (process.env.MODE === 'sso') {
    await ready('sign-in');
    await page.click('#sign-in-sso');
    // The provider's own pages: the login name (any password), then consent.
    await page.waitForSelector('input[name="login"]', { timeout: 15000 });
    await shot('sso-provider');
    await page.fill('input[name="login"]', process.env.LOGIN);
    await page.fill('input[name="password"]', 'any-password');
    await Promise.all([page.waitForNavigation(), page.click('button[type="submit"]')]);
    if (!page.url().startsWith(base)) {
      await page.waitForSelector('button[type="submit"]', { timeout: 15000 });
      await shot('sso-consent');
      await Promise.all([
        page.waitForURL((u) => u.href.startsWith(`${base}/ui/`), { timeout: 15000 }),
        page.click('button[type="submit"]'),
      ]);
    }
    await ready('overview');
    await shot('sso-overview');
    say(`WHO ${await page.textContent('#who')}`);
    const cookies = (await context.cookies()).map((c) => `${c.name}:${c.sameSite}`);
    say(`COOKIES ${JSON.stringify(cookies)}`);
    const forged = await page.evaluate(async (id) => {
      const r = await fetch(`/v1/requests/${id}/approve`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: '{}' });
      return r.status;
    }, REQUEST);
    say(`CSRF ${forged}`);
    await page.goto(`${base}/ui/#/requests`);
    await ready('requests');
    await page.click(`#approve-${REQUEST}`);
    await done(`Approve ${REQUEST}`);
    say(`APPROVED ${await status()}`);
    say(`PROBLEMS ${JSON.stringify(problems)}`);
    say('DONE');
    process.exit(0);
  }
  await shot('sign-in');
  await page.click('#sign-in-cert');
  await ready('overview');
  await page.waitForSelector('#chart svg');
  await shot('overview');
  const cookie = (await context.cookies()).find((c) => c.name === 'jitgate_console');
  say(`COOKIE ${JSON.stringify({ httpOnly: cookie.httpOnly, secure: cookie.secure, sameSite: cookie.sameSite })}`);
  const readable = await page.evaluate(() => document.cookie.includes('jitgate_console'));
  say(`SCRIPT_SEES_COOKIE ${readable}`);

  if (process.env.MODE === 'recording') {
    // Audit: alice's shell session, and its recording played in the page.
    await page.goto(`${base}/ui/#/audit?user=alice&event=session`);
    await ready('audit');
    const play = await page.waitForSelector('button[id^="play-"]');
    say(`RECORDING ${(await play.getAttribute('id')).slice('play-'.length)}`);
    await play.click();
    try {
      await page.waitForFunction((m) => document.getElementById('player-box').textContent.includes(m),
        MARKER, { timeout: 20000 });
    } catch (e) {
      say(`PLAYER_DOM ${(await page.innerHTML('#player')).slice(0, 3000).replace(/\n/g, ' ')}`);
      say(`STATUS ${await page.textContent('#status')}`);
      say(`PROBLEMS ${JSON.stringify(problems)}`);
      throw e;
    }
    await shot('recording');
    say(`PLAYED ${await page.textContent('#player-box')}`);
    say(`PROBLEMS ${JSON.stringify(problems)}`);
    say('DONE');
    process.exit(0);
  }

  // A POST from the page without the CSRF token, and with a wrong one: both refused.
  const forged = await page.evaluate(async (id) => {
    const post = async (headers) => {
      const r = await fetch(`/v1/requests/${id}/approve`, { method: 'POST', headers: { 'Content-Type': 'application/json', ...headers }, body: '{}' });
      return [r.status, (await r.json()).code];
    };
    return [await post({}), await post({ 'X-CSRF-Token': 'guessed' })];
  }, REQUEST);
  say(`CSRF ${JSON.stringify(forged)}`);

  // Requests: approve alice's from the inbox, reached by the link Slack's Review button has.
  await page.goto(`${base}/ui/#/requests/${REQUEST}`);
  await ready('requests');
  await page.waitForSelector(`#approve-${REQUEST}`);
  say(`FOCUS ${await page.getAttribute('tr.focus', 'id')}`);
  await shot('requests');
  await page.click(`#approve-${REQUEST}`);
  await done(`Approve ${REQUEST}`);
  say(`APPROVED ${await status()}`);
  if (process.env.DENY) {
    // Deny needs a reason: without one nothing is sent; with one, the request is denied.
    await page.click(`#deny-${process.env.DENY}`);
    say(`DENY_WITHOUT_REASON ${await status()}`);
    await page.fill(`#deny-reason-${process.env.DENY}`, 'not during the freeze');
    await page.click(`#deny-${process.env.DENY}`);
    await done(`Deny ${process.env.DENY}`);
    say(`DENIED ${await status()}`);
  }
  await next();

  // Sessions: alice's live psql is listed, with its statements.
  await page.goto(`${base}/ui/#/sessions`);
  await ready('sessions');
  await page.waitForSelector('tr[id^="session-"]');
  await shot('sessions');
  say(`SESSIONS ${await page.textContent('#sessions')}`);

  // Grants: revoke the grant the approval made.
  await page.goto(`${base}/ui/#/grants`);
  await ready('grants');
  const row = await page.waitForSelector('tr[id^="grant-"]');
  const grant = (await row.getAttribute('id')).slice('grant-'.length);
  await shot('grants');
  await page.click(`#revoke-${grant}`);
  await done(`Revoke ${grant}`);
  say(`REVOKED ${grant} ${await status()}`);
  await next();

  // Audit: find the statement by user, event and text, then the session's records in order.
  await page.goto(`${base}/ui/#/audit`);
  await ready('audit');
  await page.fill('#audit-user', 'alice');
  await page.selectOption('#audit-event', 'statement');
  await page.fill('#audit-text', MARKER);
  await page.click('#audit-search');
  await page.waitForFunction((m) => document.getElementById('audit-results').textContent.includes(m)
    && document.body.dataset.ready === 'audit', MARKER, { timeout: 15000 });
  await shot('audit');
  say(`FOUND ${await page.textContent('#audit-results')}`);
  await page.click('#audit-results a[href^="#/audit?session="]');
  await page.waitForFunction(() => /session\.end/.test(document.getElementById('audit-results').textContent),
    null, { timeout: 15000 });
  await shot('audit-session');
  const events = await page.$$eval('#audit-results tbody tr td:nth-child(3)', (tds) => tds.map((td) => td.textContent));
  say(`SESSION_EVENTS ${JSON.stringify(events)}`);

  // Signing out ends the session: the API no longer takes its cookie.
  await page.click('#sign-out');
  await ready('sign-in');
  const after = await page.evaluate(async () => (await fetch('/ui/session')).status);
  say(`SIGNED_OUT ${after}`);
  say(`PROBLEMS ${JSON.stringify(problems)}`);
  say('DONE');
} catch (e) {
  say(`FAIL ${e && e.stack ? e.stack.replace(/\n/g, ' | ') : e}`);
  say(`PROBLEMS ${JSON.stringify(problems)}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
process.exit(process.exitCode || 0);
