// The jitgate console: plain JavaScript, no build step. Every call goes to the JSON API
// (docs/openapi.json) on this origin; state-changing calls carry the session's CSRF token.
// Text from the server is only ever set as text (never as HTML).
'use strict';

const state = { me: null, csrf: null, timers: [] };

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function svg(tag, attrs, ...children) {
  const e = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function say(text, error) {
  const s = document.getElementById('status');
  s.textContent = text || '';
  s.className = error ? 'error' : '';
}

async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (method !== 'GET' && state.csrf) headers['X-CSRF-Token'] = state.csrf;
  const r = await fetch(path, {
    method,
    headers,
    credentials: 'same-origin',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = text; }
  if (!r.ok) {
    const err = new Error((data && data.detail) || `${method} ${path}: HTTP ${r.status}`);
    err.status = r.status;
    throw err;
  }
  return data;
}

function left(until) {
  const ms = new Date(until).getTime() - Date.now();
  if (ms <= 0) return 'ended';
  return human(ms / 1000);
}

function human(secs) {
  secs = Math.max(0, Math.round(secs));
  if (secs < 60) return `${secs}s`;
  const m = Math.floor(secs / 60);
  if (m < 60) return `${m}m ${secs % 60}s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h}h ${m % 60}m`;
  return `${Math.floor(h / 24)}d ${h % 24}h`;
}

function ago(ts) { return human((Date.now() - new Date(ts).getTime()) / 1000); }

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function table(headers, rows, empty) {
  if (!rows.length) return el('p', { class: 'empty' }, empty || 'Nothing here.');
  return el('table', {},
    el('thead', {}, el('tr', {}, headers.map((h) => el('th', { scope: 'col' }, h)))),
    el('tbody', {}, rows));
}

function every(ms, f) {
  state.timers.push(setInterval(f, ms));
}

function stopTimers() {
  state.timers.forEach(clearInterval);
  state.timers = [];
}

function hasRole(r) { return state.me && state.me.roles.includes(r); }

async function act(what, f) {
  try {
    say(`${what}...`);
    await f();
    await route();
    say(`${what}: done`);
  } catch (e) {
    say(`${what}: ${e.message}`, true);
  }
}

// ---- Overview ---------------------------------------------------------------------------

async function overview(page) {
  page.append(el('h1', {}, 'Overview'));
  const cards = el('div', { class: 'cards' });
  page.append(cards);
  const card = (label, n, id) => el('div', { class: 'card', id }, el('div', { class: 'n' }, n), label);
  const [requests, grants] = await Promise.all([
    api('GET', '/v1/requests?pending=true'),
    api('GET', '/v1/grants'),
  ]);
  cards.append(card('pending requests', requests.length, 'count-pending'));
  cards.append(card(hasRole('admin') ? 'active grants' : 'your active grants', grants.length, 'count-grants'));
  if (hasRole('admin')) {
    const sessions = await api('GET', '/v1/sessions').catch(() => []);
    cards.append(card('live sessions', sessions.length, 'count-sessions'));
  }
  if (!(hasRole('admin') || hasRole('auditor'))) return;
  // The last 24 hours, by hour, from the audit log.
  const since = '24h';
  const [starts, created] = await Promise.all([
    api('GET', `/v1/audit?event=session.start&since=${since}&limit=1000`),
    api('GET', `/v1/audit?event=request.created&since=${since}&limit=1000`),
  ]);
  const now = Date.now();
  const buckets = Array.from({ length: 24 }, () => ({ s: 0, r: 0 }));
  const put = (recs, key) => recs.forEach((r) => {
    const h = Math.floor((now - new Date(r.ts).getTime()) / 3600e3);
    if (h >= 0 && h < 24) buckets[23 - h][key] += 1;
  });
  put(starts.records, 's');
  put(created.records, 'r');
  const partial = starts.truncated || created.truncated;
  const max = Math.max(1, ...buckets.map((b) => Math.max(b.s, b.r)));
  const W = 24 * 22, H = 120;
  const chart = svg('svg', { width: W + 30, height: H + 30, role: 'img', 'aria-label': 'Sessions and requests per hour, last 24 hours' });
  buckets.forEach((b, i) => {
    const x = 24 + i * 22;
    const hs = (b.s / max) * H, hr = (b.r / max) * H;
    chart.append(svg('rect', { class: 'bar-sessions', x, y: H - hs, width: 9, height: hs }, svg('title', {}, `${b.s} sessions`)));
    chart.append(svg('rect', { class: 'bar-requests', x: x + 10, y: H - hr, width: 9, height: hr }, svg('title', {}, `${b.r} requests`)));
  });
  chart.append(svg('text', { x: 0, y: 10 }, String(max)));
  chart.append(svg('text', { x: 0, y: H }, '0'));
  chart.append(svg('text', { x: 24, y: H + 20 }, '24h ago'));
  chart.append(svg('text', { x: W - 10, y: H + 20 }, 'now'));
  page.append(el('h2', {}, 'Last 24 hours'),
    el('p', {}, el('span', { class: 'legend-sessions' }, '■ sessions started'), '  ',
      el('span', { class: 'legend-requests' }, '■ requests filed')),
    el('div', { class: 'chart', id: 'chart' }, chart),
    partial ? el('p', { class: 'empty' }, 'More than 1000 in the window: the chart shows the latest 1000 of each.') : null);
}

// ---- Requests ---------------------------------------------------------------------------

async function requests(page) {
  page.append(el('h1', {}, 'Requests'));
  const all = await api('GET', '/v1/requests');
  const pending = all.filter((r) => r.state === 'pending')
    .sort((a, b) => new Date(a.created_at) - new Date(b.created_at));
  page.append(el('h2', {}, `Inbox (${pending.length} pending)`));
  const rows = pending.map((r) => {
    const own = state.me && r.user === state.me.user;
    const lapseMs = new Date(r.lapses_at) - Date.now();
    const waitedMs = Date.now() - new Date(r.created_at);
    const stale = waitedMs > (waitedMs + lapseMs) / 2;
    const reason = el('input', { type: 'text', placeholder: 'reason to deny', 'aria-label': `Reason to deny ${r.id}`, id: `deny-reason-${r.id}` });
    return el('tr', { id: `request-${r.id}` },
      el('td', {}, r.id),
      el('td', {}, r.user),
      el('td', {}, r.target),
      el('td', {}, r.access),
      el('td', {}, human(r.duration_secs)),
      el('td', { class: 'text' }, r.reason),
      el('td', {}, `${(r.approvals || []).length} of ${r.approvals_needed}`),
      el('td', { class: stale ? 'stale' : '' }, `waiting ${ago(r.created_at)}`, el('br'), `lapses in ${left(r.lapses_at)}`),
      el('td', {}, el('div', { class: 'actions' },
        el('button', {
          type: 'button', class: 'primary', id: `approve-${r.id}`, disabled: own,
          title: own ? 'You cannot approve your own request' : undefined,
          onclick: () => act(`Approve ${r.id}`, () => api('POST', `/v1/requests/${r.id}/approve`, { comment: 'in the console' })),
        }, 'Approve'),
        reason,
        el('button', {
          type: 'button', class: 'danger', id: `deny-${r.id}`,
          onclick: () => {
            if (!reason.value.trim()) { say('Give a reason to deny', true); reason.focus(); return; }
            act(`Deny ${r.id}`, () => api('POST', `/v1/requests/${r.id}/deny`, { reason: reason.value.trim() }));
          },
        }, 'Deny'))));
  });
  page.append(table(['Request', 'User', 'Target', 'Access', 'For', 'Reason', 'Approvals', 'Age', ''], rows, 'No pending requests.'));

  page.append(el('h2', {}, 'History'));
  const f = el('form', { class: 'filters', id: 'history-filters' });
  const st = el('select', { name: 'state', id: 'history-state' },
    ['', 'approved', 'denied', 'withdrawn', 'lapsed'].map((s) => el('option', { value: s }, s || 'any state')));
  const user = el('input', { name: 'user', id: 'history-user', type: 'text' });
  const target = el('input', { name: 'target', id: 'history-target', type: 'text' });
  f.append(el('label', {}, 'State', st), el('label', {}, 'User', user), el('label', {}, 'Target', target));
  const body = el('div', { id: 'history' });
  const draw = () => {
    const done = all.filter((r) => r.state !== 'pending')
      .filter((r) => !st.value || r.state === st.value)
      .filter((r) => !user.value || r.user === user.value.trim())
      .filter((r) => !target.value || r.target === target.value.trim())
      .sort((a, b) => new Date(b.created_at) - new Date(a.created_at));
    body.replaceChildren(table(['Request', 'State', 'User', 'Target', 'Access', 'Reason', 'Decided by', 'Note', 'Filed'],
      done.map((r) => el('tr', {},
        el('td', {}, r.id), el('td', {}, r.state), el('td', {}, r.user), el('td', {}, r.target),
        el('td', {}, r.access), el('td', { class: 'text' }, r.reason), el('td', {}, r.decided_by || '-'),
        el('td', {}, r.note || ''), el('td', {}, new Date(r.created_at).toLocaleString()))),
      'No decided requests match.'));
  };
  f.addEventListener('input', draw);
  f.addEventListener('submit', (e) => e.preventDefault());
  page.append(f, body);
  draw();
}

// ---- Grants -----------------------------------------------------------------------------

async function grants(page) {
  page.append(el('h1', {}, 'Grants'));
  const list = (await api('GET', '/v1/grants')).sort((a, b) => new Date(a.expires_at) - new Date(b.expires_at));
  const admin = hasRole('admin');
  const cells = [];
  const rows = list.map((g) => {
    const remaining = el('td', { class: 'num' }, left(g.expires_at));
    cells.push([remaining, g.expires_at]);
    const by = el('select', { 'aria-label': `Extend ${g.id} by`, id: `extend-by-${g.id}` },
      [['15m', 900], ['30m', 1800], ['1h', 3600], ['4h', 14400]].map(([t, s]) => el('option', { value: s }, t)));
    return el('tr', { id: `grant-${g.id}` },
      el('td', {}, g.id), el('td', {}, g.user), el('td', {}, g.target), el('td', {}, g.access),
      el('td', { class: 'text' }, g.reason), el('td', {}, g.created_by), remaining,
      el('td', {}, admin ? el('div', { class: 'actions' },
        el('button', {
          type: 'button', class: 'danger', id: `revoke-${g.id}`,
          onclick: () => act(`Revoke ${g.id}`, () => api('POST', `/v1/grants/${g.id}/revoke`, {})),
        }, 'Revoke'),
        by,
        el('button', {
          type: 'button', id: `extend-${g.id}`,
          onclick: () => act(`Extend ${g.id}`, () => api('POST', `/v1/grants/${g.id}/extend`, { duration_secs: Number(by.value) })),
        }, 'Extend')) : ''));
  });
  page.append(table(['Grant', 'User', 'Target', 'Access', 'Reason', 'By', 'Time left', ''], rows, 'No active grants.'));
  every(1000, () => cells.forEach(([td, until]) => { td.textContent = left(until); }));
}

// ---- Sessions ---------------------------------------------------------------------------

async function sessions(page) {
  page.append(el('h1', {}, 'Sessions'));
  const body = el('div', { id: 'sessions' });
  page.append(body, el('p', { class: 'empty' }, 'Updated every 2 seconds.'));
  const draw = async () => {
    let list;
    try { list = await api('GET', '/v1/sessions'); } catch (e) { say(e.message, true); return; }
    body.replaceChildren(table(['Session', 'User', 'Target', 'Database', 'Access', 'From', 'Started', 'In', 'Out', 'Statements', ''],
      list.map((s) => el('tr', { id: `session-${s.id}` },
        el('td', {}, s.id), el('td', {}, s.user), el('td', {}, s.target), el('td', {}, s.database),
        el('td', {}, s.access), el('td', {}, s.client_addr), el('td', {}, `${ago(s.started_at)} ago`),
        el('td', { class: 'num' }, bytes(s.bytes_from_client)), el('td', { class: 'num' }, bytes(s.bytes_to_client)),
        el('td', { class: 'num', id: `statements-${s.id}` }, s.statements || 0),
        el('td', {}, el('button', {
          type: 'button', class: 'danger', id: `kill-${s.id}`,
          onclick: () => act(`Kill ${s.id}`, () => api('POST', `/v1/sessions/${s.id}/kill`, {})),
        }, 'Kill')))),
      'No live sessions.'));
  };
  await draw();
  every(2000, draw);
}

// ---- Audit ------------------------------------------------------------------------------

function summary(r) {
  switch (r.event) {
    case 'statement': return `#${r.statement} ${r.class}${r.denied_by ? ` denied by ${r.denied_by}` : ''}: ${r.text}`;
    case 'statement.end': return `#${r.statement} ${r.outcome || r.status || ''} ${r.command_tag || r.tag || ''} ${r.rows !== undefined ? `${r.rows} rows` : ''}`;
    case 'session.start': return `grant ${r.grant_id} from ${r.client_addr}`;
    case 'session.end': return `${r.reason}, in ${r.bytes_from_client} B, out ${r.bytes_to_client} B`;
    case 'ssh.exec': return r.command;
    default: {
      const g = r.grant || r.request;
      if (g) return `${g.id || ''} ${g.access || ''} ${g.state || ''} ${g.reason || ''}`;
      return r.reason || '';
    }
  }
}

function who(r) {
  const g = r.grant || r.request || {};
  return [r.user || g.user || (r.session && r.session.user) || '', r.target || g.target || ''];
}

async function audit(page, params) {
  page.append(el('h1', {}, 'Audit'));
  const f = el('form', { class: 'filters', id: 'audit-form' });
  const field = (name, label, type) => {
    const i = el('input', { name, id: `audit-${name}`, type: type || 'text', value: params.get(name) || '' });
    f.append(el('label', {}, label, i));
    return i;
  };
  field('user', 'User');
  field('target', 'Target');
  const ev = el('select', { name: 'event', id: 'audit-event' },
    [['', 'any event'], ['statement', 'statements'], ['session', 'sessions'], ['grant', 'grants'],
      ['request', 'requests'], ['ssh', 'SSH'], ['login', 'logins'], ['slack', 'Slack'], ['credential', 'credentials']]
      .map(([v, t]) => el('option', { value: v, selected: params.get('event') === v }, t)));
  f.append(el('label', {}, 'Event', ev));
  field('session', 'Session');
  field('since', 'Since (15m, 2h or a time)');
  field('until', 'Until');
  field('text', 'Text');
  f.append(el('button', { type: 'submit', id: 'audit-search' }, 'Search'));
  f.addEventListener('submit', (e) => {
    e.preventDefault();
    const q = new URLSearchParams();
    new FormData(f).forEach((v, k) => { if (String(v).trim()) q.set(k, String(v).trim()); });
    location.hash = `#/audit?${q}`;
  });
  page.append(f);
  const out = el('div', { id: 'audit-results' });
  const player = el('div', { class: 'player', id: 'player' });
  page.append(player, out);
  if (![...params.keys()].length) {
    out.append(el('p', { class: 'empty' }, 'Search by user, target, event, session, time or text.'));
    return;
  }
  const q = new URLSearchParams(params);
  q.set('limit', '500');
  const found = await api('GET', `/v1/audit?${q}`);
  const rows = found.records.map((r) => {
    const [user, target] = who(r);
    const sid = r.session_id || (r.session && r.session.id) || '';
    const recs = (r.recordings || []).map((rec) => {
      const id = String(rec.file).split('/').pop().replace(/\.cast$/, '');
      return el('button', {
        type: 'button', id: `play-${id}`,
        onclick: () => play(player, id),
      }, `Play ${id}`);
    });
    return el('tr', { class: r.decision === 'denied' ? 'denied' : '' },
      el('td', {}, r.seq), el('td', {}, new Date(r.ts).toLocaleString()), el('td', {}, r.event),
      el('td', {}, user), el('td', {}, target),
      el('td', {}, sid ? el('a', { href: `#/audit?session=${encodeURIComponent(sid)}` }, sid) : ''),
      el('td', { class: 'text' }, summary(r), recs));
  });
  out.append(el('p', {}, `${found.records.length} record(s)${found.truncated ? ', the latest only' : ''}`));
  out.append(table(['Seq', 'Time', 'Event', 'User', 'Target', 'Session', 'What'], rows, 'No records match.'));
}

function play(container, id) {
  container.replaceChildren(el('h2', {}, `Recording ${id}`));
  const box = el('div', { id: 'player-box' });
  container.append(box);
  if (!window.AsciinemaPlayer) { say('the player did not load', true); return; }
  window.AsciinemaPlayer.create(`/v1/recordings/${encodeURIComponent(id)}`, box, { autoPlay: true, fit: 'width' });
}

// ---- Shell ------------------------------------------------------------------------------

const pages = { overview, requests, grants, sessions, audit };

async function route() {
  stopTimers();
  if (!state.me) return;
  // #/PAGE, #/PAGE?QUERY, or #/PAGE/ITEM (a link to one request: #/requests/r-...).
  const [path, query] = (location.hash.replace(/^#\/?/, '') || 'overview').split('?');
  const [first, item] = path.split('/');
  const name = pages[first] ? first : 'overview';
  document.querySelectorAll('#nav a').forEach((a) => {
    if (a.id === `nav-${name}`) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  });
  const page = el('section', { id: `page-${name}` });
  document.getElementById('page').replaceChildren(page);
  document.title = `jitgate: ${name}`;
  try {
    await pages[name](page, new URLSearchParams(query || ''));
    const focus = item && document.getElementById(`${name.replace(/s$/, '')}-${item}`);
    if (focus) {
      focus.classList.add('focus');
      focus.scrollIntoView({ block: 'center' });
    } else if (item) {
      say(`${item} is not listed here (decided, or not yours to see)`);
    }
    document.body.dataset.ready = name;
  } catch (e) {
    say(e.message, true);
  }
}

function signedIn(me) {
  state.me = me;
  state.csrf = me.csrf;
  document.getElementById('sign-in').hidden = true;
  document.getElementById('nav').hidden = false;
  document.getElementById('sign-out').hidden = false;
  document.getElementById('who').textContent = `${me.user} (${me.roles.join(', ') || 'no roles'})`;
  route();
}

function signedOut() {
  state.me = null;
  state.csrf = null;
  stopTimers();
  document.getElementById('page').replaceChildren();
  document.getElementById('nav').hidden = true;
  document.getElementById('sign-out').hidden = true;
  document.getElementById('who').textContent = '';
  document.getElementById('sign-in').hidden = false;
  api('GET', '/v1/login')
    .then((m) => { document.getElementById('sso').hidden = !m.console_oidc; })
    .catch(() => {})
    .finally(() => { document.body.dataset.ready = 'sign-in'; });
}

async function start() {
  document.getElementById('sign-in-cert').addEventListener('click', async () => {
    try { signedIn(await api('POST', '/ui/session')); say(''); } catch (e) { say(e.message, true); }
  });
  document.getElementById('sign-out').addEventListener('click', async () => {
    try { await api('POST', '/ui/logout'); } catch (_) { /* gone anyway */ }
    signedOut();
  });
  window.addEventListener('hashchange', route);
  // A single sign-on that failed comes back as /ui/?error=...
  const error = new URLSearchParams(location.search).get('error');
  if (error) {
    say(`Sign-in failed: ${error}`, true);
    history.replaceState(null, '', `/ui/${location.hash}`);
  }
  try { signedIn(await api('GET', '/ui/session')); } catch (_) { signedOut(); }
}

start();
