// USER_DEBUG=1 in the environment prints each step on stderr.
// The person at the browser, for jitgate's login tests: walks the provider's sign-in pages
// over HTTP with a cookie jar, submitting each page's form (the login name, any password, the
// consent) until the flow ends.
//   node user.mjs device VERIFICATION_URI USER_CODE LOGIN
//   node user.mjs device-abort VERIFICATION_URI USER_CODE LOGIN   (clicks [ Abort ])
//   node user.mjs authorize AUTHORIZATION_URL LOGIN
// For `authorize`, the final redirect (to jitgate's loopback listener) is followed too, so the
// CLI receives its code; with PRINT_REDIRECT=1 in the environment it is printed instead
// (`REDIRECT URL`). Prints `DONE` and exits 0 when the provider says the sign-in
// finished; prints the page and exits 1 otherwise.
const [mode, url, ...rest] = process.argv.slice(2);
const device = mode.startsWith('device');
const login = device ? rest[1] : rest[0];
const userCode = device ? rest[0] : undefined;
const jar = new Map();

function remember(res) {
  for (const c of res.headers.getSetCookie()) {
    const [pair] = c.split(';');
    const i = pair.indexOf('=');
    jar.set(pair.slice(0, i), pair.slice(i + 1));
  }
}

async function go(target, body) {
  const headers = { cookie: [...jar].map(([k, v]) => `${k}=${v}`).join('; ') };
  const init = { redirect: 'manual', headers };
  if (body) {
    init.method = 'POST';
    headers['content-type'] = 'application/x-www-form-urlencoded';
    init.body = new URLSearchParams(body).toString();
  }
  const res = await fetch(target, init);
  remember(res);
  return res;
}

function attr(tag, name) {
  const m = tag.match(new RegExp(`\\b${name}="([^"]*)"`));
  return m ? m[1].replace(/&amp;/g, '&').replace(/&#x2F;/g, '/').replace(/&quot;/g, '"') : undefined;
}

// The first form of the page: its action and fields, filled in.
function form(html, base) {
  const open = html.match(/<form\b[^>]*>/);
  if (!open) return undefined;
  const end = html.indexOf('</form>', open.index);
  const inner = html.slice(open.index, end === -1 ? undefined : end);
  const fields = {};
  for (const input of inner.match(/<input\b[^>]*>/g) ?? []) {
    const name = attr(input, 'name');
    if (!name) continue;
    let value = attr(input, 'value') ?? '';
    if (name === 'login') value = login;
    if (name === 'password') value = 'any-password';
    if (name === 'user_code' && !value) value = userCode;
    fields[name] = value;
  }
  if (mode === 'device-abort' && fields.confirm) fields.abort = 'yes';
  return { action: new URL(attr(open[0], 'action') ?? base, base).toString(), fields };
}

const issuer = new URL(url).origin;
let res = await go(device ? `${url}?user_code=${encodeURIComponent(userCode)}` : url);
for (let step = 0; step < 30; step += 1) {
  if (res.status >= 300 && res.status < 400) {
    const next = new URL(res.headers.get('location'), res.url || url).toString();
    if (new URL(next).origin !== issuer && process.env.PRINT_REDIRECT) {
      // The test delivers the redirect itself.
      console.log(`REDIRECT ${next}`);
      process.exit(0);
    }
    if (new URL(next).origin !== issuer) {
      // The redirect back to jitgate's loopback listener: deliver it, as a browser would.
      const back = await fetch(next);
      const text = await back.text();
      console.log(back.ok ? 'DONE' : text);
      process.exit(back.ok ? 0 : 1);
    }
    if (process.env.USER_DEBUG) console.error(res.status, "->", next);
    res = await go(next);
    continue;
  }
  const html = await res.text();
  if (process.env.USER_DEBUG) console.error(res.status, res.url);
  const next = form(html, res.url);
  if (!next) {
    const ok = res.ok && /Sign-in Success|success/i.test(html);
    console.log(ok ? 'DONE' : html);
    process.exit(ok ? 0 : 1);
  }
  res = await go(next.action, next.fields);
}
console.log('too many steps');
process.exit(1);
