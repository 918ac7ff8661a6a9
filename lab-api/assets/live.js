// The live page of lab-api: the fleet's sync health and one worker's labs, kept current from
// GET /api/events/stream. Everything shown is set as text (never as HTML): titles, notes and
// errors come from CML users and servers.
'use strict';

const MAX_FLEET_PAGES = 20;
const MAX_LOG = 40;

const state = {
  workers: new Map(), // worker_id -> sync-status item
  selected: new URLSearchParams(location.search).get('worker'),
  labs: new Map(), // lab_id -> list entry
  flash: new Set(), // lab ids to highlight on the next render
  source: null,
  refreshing: false, // a refresh of the selected worker is waiting for its outcome
  throttledUntil: new Map(), // worker_id -> Date.now() before which a refresh is refused
};

function el(tag, className, ...children) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  for (const c of children) e.append(c == null ? '' : c instanceof Node ? c : String(c));
  return e;
}

function ago(iso) {
  if (!iso) return 'never';
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

async function getJson(url) {
  const r = await fetch(url, { credentials: 'same-origin', headers: { accept: 'application/json' } });
  if (!r.ok) {
    let detail = `${r.status} ${r.statusText}`;
    try {
      const p = await r.json();
      detail = [p.title, p.detail].filter(Boolean).join(': ') || detail;
    } catch (_) { /* not a problem document */ }
    throw new Error(detail);
  }
  return r.json();
}

function showError(id, error) {
  const p = document.getElementById(id);
  p.hidden = !error;
  p.textContent = error ? String(error.message || error) : '';
}

// ---- the fleet ----

// How a worker's changes arrive: its CML event stream's watch (null: no watch kept).
function watchBadge(w) {
  const s = w.watch_state;
  if (!s) return el('td', 'watch none', '—');
  const td = el('td', `watch ${s}`, s === 'failing' && w.watch_failure ? `failing (${w.watch_failure})` : s);
  td.title = {
    live: 'Changes arrive from the CML event stream as they happen',
    connecting: 'Opening the CML event stream',
    polling: 'No CML event stream: synced by the periodic cycle',
    failing: 'The CML event stream keeps failing: synced by the periodic cycle until it is back',
  }[s] || s;
  if (w.last_activity_at) td.title += ` · last activity ${ago(w.last_activity_at)}`;
  return td;
}

function health(w) {
  if (w.failing) return 'failing';
  if (w.stale) return 'stale';
  return 'ok';
}

async function loadFleet() {
  try {
    const workers = new Map();
    let cursor = null;
    for (let page = 0; page < MAX_FLEET_PAGES; page++) {
      const q = new URLSearchParams({ limit: '1000' });
      if (cursor) q.set('cursor', cursor);
      const body = await getJson(`/api/sync-status?${q}`);
      for (const w of body.items) workers.set(w.worker_id, w);
      cursor = body.next_cursor;
      if (!cursor) break;
    }
    state.workers = workers;
    showError('fleet-error', null);
  } catch (e) {
    showError('fleet-error', e);
  }
  renderFleet();
  if (!state.selected && state.workers.size > 0) select(state.workers.keys().next().value);
}

function renderFleet() {
  const rows = [];
  let failing = 0;
  let stale = 0;
  for (const w of state.workers.values()) {
    const h = health(w);
    if (h === 'failing') failing++;
    if (h === 'stale') stale++;
    const tr = el('tr', w.worker_id === state.selected ? 'selected' : '',
      el('td', 'worker', w.name || w.worker_id),
      el('td', '', w.aws_region || ''),
      el('td', '', w.registry_status || '—'),
      el('td', `health ${h}`, h),
      watchBadge(w),
      el('td', 'count', w.lab_count ?? ''),
      el('td', '', ago(w.last_success_at)),
      el('td', 'count', w.consecutive_failures ?? 0),
      el('td', 'error-text', w.last_error || ''));
    tr.dataset.workerId = w.worker_id;
    tr.title = w.worker_id;
    tr.addEventListener('click', () => select(w.worker_id));
    rows.push(tr);
  }
  document.querySelector('#fleet tbody').replaceChildren(...rows);
  document.getElementById('summary').textContent =
    `${state.workers.size} workers · ${failing} failing · ${stale} stale`;
}

// ---- one worker's labs ----

function select(workerId) {
  state.selected = workerId;
  setRefreshStatus('');
  const q = new URLSearchParams(location.search);
  q.set('worker', workerId);
  history.replaceState(null, '', `?${q}`);
  renderFleet();
  loadLabs();
}

async function loadLabs() {
  const id = state.selected;
  if (!id) return;
  renderRefresh();
  const w = state.workers.get(id);
  document.getElementById('labs-worker').textContent = `— ${(w && w.name) || id}`;
  try {
    const labs = await getJson(`/api/workers/${encodeURIComponent(id)}/labs`);
    if (id !== state.selected) return;
    state.labs = new Map(labs.map((l) => [l.id, l]));
    showError('labs-error', null);
  } catch (e) {
    showError('labs-error', e);
  }
  renderLabs();
}

function renderLabs() {
  const labs = [...state.labs.values()].sort((a, b) =>
    a.title < b.title ? -1 : a.title > b.title ? 1 : a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
  const rows = labs.map((l) => {
    const tr = el('tr', state.flash.has(l.id) ? 'flash' : '',
      el('td', 'title', l.title),
      el('td', `state ${/^[A-Z_]+$/.test(l.state) ? l.state : ''}`, l.state),
      el('td', 'count', l.node_count),
      el('td', 'count', l.link_count),
      el('td', 'owner', l.owner_username || ''),
      el('td', '', l.modified ? ago(l.modified) : ''));
    tr.dataset.labId = l.id;
    return tr;
  });
  state.flash.clear();
  document.querySelector('#labs tbody').replaceChildren(...rows);
}

// ---- refresh on demand ----

function setRefreshStatus(text) {
  document.getElementById('refresh-status').textContent = text;
}

// The button: shown once a worker is chosen; disabled while its refresh runs or is throttled.
function renderRefresh() {
  const button = document.getElementById('refresh');
  button.hidden = !state.selected;
  const left = Math.ceil(((state.throttledUntil.get(state.selected) || 0) - Date.now()) / 1000);
  button.disabled = state.refreshing || left > 0;
  if (left > 0) setRefreshStatus(`Refresh rate limited. Please wait ${left} s.`);
}

// A refresh of `workerId` was refused for `seconds`: count down (here, or for whoever watches).
function throttled(workerId, seconds) {
  const until = Date.now() + Math.max(1, Number(seconds) || 1) * 1000;
  state.throttledUntil.set(workerId, Math.max(until, state.throttledUntil.get(workerId) || 0));
  if (workerId !== state.selected) return;
  renderRefresh();
  const tick = setInterval(() => {
    renderRefresh();
    if ((state.throttledUntil.get(workerId) || 0) <= Date.now()) {
      clearInterval(tick);
      if (workerId === state.selected && !state.refreshing) setRefreshStatus('');
    }
  }, 1000);
}

async function refreshNow() {
  const id = state.selected;
  if (!id || state.refreshing) return;
  state.refreshing = true;
  renderRefresh();
  setRefreshStatus('refreshing…');
  let text = '';
  try {
    const r = await fetch(`/api/workers/${encodeURIComponent(id)}/labs/refresh?wait=30`, {
      method: 'POST', credentials: 'same-origin', headers: { Accept: 'application/json' },
    });
    const body = await r.json().catch(() => ({}));
    if (r.status === 429) {
      state.refreshing = false;
      throttled(id, r.headers.get('Retry-After') || body.retry_after_seconds);
      return;
    }
    if (!r.ok) text = `refresh refused: ${body.detail || r.status}`;
    else if (body.status === 'done') {
      text = `refreshed: ${body.labs_synced} labs, ${body.labs_created} new, ` +
        `${body.labs_updated} changed, ${body.labs_removed} removed`;
    } else if (body.status === 'failed') text = `refresh failed: ${body.error_kind || 'error'}`;
    else text = `refresh ${body.status}: no outcome yet`;
  } catch (e) {
    text = `refresh failed: ${e}`;
  }
  state.refreshing = false;
  if (id === state.selected) {
    setRefreshStatus(text);
    renderRefresh();
  }
}

// ---- events ----

function logEvent(type, text) {
  const li = el('li', '', el('span', 'time', new Date().toLocaleTimeString()), ' ',
    el('span', 'type', type), ' ', text);
  const list = document.getElementById('events');
  list.prepend(li);
  while (list.children.length > MAX_LOG) list.lastChild.remove();
}

function onLab(d) {
  const w = state.workers.get(d.worker_id);
  logEvent('worker.labs.updated',
    `${(w && w.name) || d.worker_id}: ${d.title || d.lab_id} ${d.action}` +
    (d.reason === 'access' ? ' (no longer shared with you)' : '') +
    (d.action === 'state_changed' ? ` (${d.previous_state} → ${d.new_state})` : ''));
  if (d.worker_id !== state.selected) return;
  if (d.action === 'removed') {
    state.labs.delete(d.lab_id);
  } else {
    const entry = {};
    for (const k of ['id', 'title', 'description', 'notes', 'state', 'owner', 'owner_username',
      'node_count', 'link_count', 'created', 'modified', 'groups', 'last_synced']) entry[k] = d[k];
    entry.id = d.lab_id;
    state.labs.set(d.lab_id, entry);
    state.flash.add(d.lab_id);
  }
  renderLabs();
}

function onSync(d, ok) {
  const w = state.workers.get(d.worker_id);
  logEvent(ok ? 'worker.data.refreshed' : 'worker.sync.failed', ok
    ? `${(w && w.name) || d.worker_id}: ${d.labs_synced} labs` + (d.labs_created == null ? ''
      : `, ${d.labs_created} new, ${d.labs_updated} changed, ${d.labs_removed} removed`)
    : `${(w && w.name) || d.worker_id}: ${d.error_kind || 'failed'} (${d.consecutive_failures} in a row)`);
  if (!w) {
    loadFleet();
    return;
  }
  if (ok) {
    Object.assign(w, {
      last_success_at: d.last_success_at, last_attempt_at: d.last_success_at,
      lab_count: d.lab_count, last_duration_ms: d.duration_ms, consecutive_failures: 0,
      last_error: null, failing: false, stale: false,
    });
  } else {
    Object.assign(w, {
      last_attempt_at: d.last_attempt_at, consecutive_failures: d.consecutive_failures,
      last_error: d.error, failing: true,
    });
  }
  renderFleet();
}

function setConnection(s, text) {
  document.body.dataset.stream = s;
  document.getElementById('conn-text').textContent = text;
}

function parse(e) {
  try {
    return JSON.parse(e.data).data || {};
  } catch (_) {
    return null;
  }
}

function connect() {
  // The browser reconnects by itself, sending Last-Event-ID: the server resumes after it.
  const source = new EventSource('/api/events/stream', { withCredentials: true });
  state.source = source;
  source.addEventListener('connected', () => setConnection('live', 'live'));
  source.addEventListener('worker.labs.updated', (e) => { const d = parse(e); if (d) onLab(d); });
  source.addEventListener('worker.data.refreshed', (e) => { const d = parse(e); if (d) onSync(d, true); });
  source.addEventListener('worker.sync.failed', (e) => { const d = parse(e); if (d) onSync(d, false); });
  source.addEventListener('worker.refresh.throttled', (e) => {
    const d = parse(e);
    if (!d) return;
    const w = state.workers.get(d.worker_id);
    logEvent('worker.refresh.throttled', `${(w && w.name) || d.worker_id}: wait ${d.retry_after_seconds} s`);
    throttled(d.worker_id, d.retry_after_seconds);
  });
  source.addEventListener('reset', () => {
    logEvent('reset', 'events were missed: reloading');
    loadFleet().then(loadLabs);
  });
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) {
      // Refused (503, 401): the browser gives up; try again, then reload what may be missed.
      setConnection('closed', 'disconnected — retrying');
      setTimeout(() => { connect(); loadFleet().then(loadLabs); }, 5000);
    } else {
      setConnection('connecting', 'reconnecting…');
    }
  };
}

document.addEventListener('DOMContentLoaded', () => {
  document.getElementById('refresh').addEventListener('click', refreshNow);
  connect();
  loadFleet().then(loadLabs);
  // Watch states change without an event: the fleet is read again now and then.
  setInterval(() => { loadFleet(); renderLabs(); }, 30000);
});
