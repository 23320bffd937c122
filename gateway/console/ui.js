// Small DOM helpers: elements built from data with textContent (never HTML strings), times in
// the viewer's time zone, state badges, error boxes, dialogs with focus handling, SVG charts.

const SVG = 'http://www.w3.org/2000/svg';

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function apply(node, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'on') {
      for (const [event, handler] of Object.entries(value)) node.addEventListener(event, handler);
    } else if (key === 'class') {
      node.setAttribute('class', value);
    } else if (key === 'text') {
      node.textContent = value;
    } else if (key in node && typeof value !== 'string' && typeof node[key] !== 'function') {
      node[key] = value;
    } else {
      node.setAttribute(key, value === true ? '' : String(value));
    }
  }
  return node;
}

/** Appends to `node`; null, undefined and false children are left out. */
export function add(node, ...children) {
  return append(node, children);
}

/** Replaces the children of `node`; null, undefined and false children are left out. */
export function fill(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

/** `h('a', {href: '#/'}, 'Overview')` */
export function h(tag, attrs = {}, ...children) {
  return append(apply(document.createElement(tag), attrs), children);
}

export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return append(node, children);
}

const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
const timeOnly = new Intl.DateTimeFormat(undefined, { timeStyle: 'medium' });
const relative = new Intl.RelativeTimeFormat(undefined, { numeric: 'auto' });
const number = new Intl.NumberFormat();
const decimal = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });

export function timeZone() {
  return Intl.DateTimeFormat().resolvedOptions().timeZone || 'UTC';
}

export function formatNumber(n) {
  return number.format(n);
}

export function formatRate(n) {
  return decimal.format(n);
}

/** A `<time>` in the viewer's zone; the exact instant (UTC) in its title. */
export function time(iso, { short = false } = {}) {
  if (!iso) return h('span', { class: 'muted' }, '—');
  const at = new Date(iso);
  if (Number.isNaN(at.getTime())) return h('span', {}, iso);
  return h('time', { datetime: iso, title: `${iso} (UTC)` }, (short ? timeOnly : dateTime).format(at));
}

/** "in 5 minutes", "3 hours ago". */
export function ago(iso) {
  const seconds = (new Date(iso).getTime() - Date.now()) / 1000;
  const steps = [[60, 'second'], [60, 'minute'], [24, 'hour'], [7, 'day'], [4.35, 'week'], [12, 'month'], [Infinity, 'year']];
  let value = seconds;
  for (const [size, unit] of steps) {
    if (Math.abs(value) < size) return relative.format(Math.round(value), unit);
    value /= size;
  }
  return '';
}

/** `2026-01-02T10:00:00Z` → the value of a datetime-local input in the viewer's zone. */
export function toLocalInput(iso) {
  if (!iso) return '';
  const at = new Date(iso);
  if (Number.isNaN(at.getTime())) return '';
  const pad = (n) => String(n).padStart(2, '0');
  return `${at.getFullYear()}-${pad(at.getMonth() + 1)}-${pad(at.getDate())}T${pad(at.getHours())}:${pad(at.getMinutes())}`;
}

/** A datetime-local value (the viewer's zone) → RFC 3339 in UTC. */
export function fromLocalInput(value) {
  if (!value) return '';
  const at = new Date(value);
  return Number.isNaN(at.getTime()) ? '' : at.toISOString();
}

/** A state as a coloured label; `look` borrows another state's colours. */
export function badge(state, look = state) {
  return h('span', { class: `badge ${look}` }, state);
}

export function shortId(id) {
  return id ? `${String(id).slice(0, 8)}…${String(id).slice(-4)}` : '';
}

export function commandLink(id, text) {
  return h('a', { href: `#/commands/${id}`, class: 'mono', 'aria-label': text ? null : `command ${id}` }, text || shortId(id));
}

export function ownerLink(owner) {
  return h('a', { href: `#/person/${encodeURIComponent(owner)}`, class: 'mono' }, owner);
}

/** The box that shows an API error as it came: status, code and the API's detail. */
export function errorBox(error, context = '') {
  const status = error && error.status !== undefined
    ? (error.status === 0 ? 'No answer' : `HTTP ${error.status}`)
    : 'Error';
  const code = error && error.code ? ` ${error.code}` : '';
  const detail = (error && (error.detail || error.message)) || String(error);
  return h('div', { class: 'error', role: 'alert' },
    h('strong', {}, `${context ? `${context}: ` : ''}${status}${code}`), detail);
}

let flashTimer = null;

/** A short note at the top of the page, read out by screen readers. */
export function flash(message) {
  const box = document.getElementById('flash');
  box.textContent = message;
  clearTimeout(flashTimer);
  flashTimer = setTimeout(() => { box.textContent = ''; }, 8000);
}

export function json(value) {
  return h('pre', { class: 'json' }, JSON.stringify(value, null, 2));
}

/** A table in a scrolling wrapper, so a wide table never widens the page. */
export function table(caption, columns, rows, { empty = 'Nothing to show.' } = {}) {
  if (!rows.length) return h('p', { class: 'muted' }, empty);
  return h('div', { class: 'table-wrap', tabindex: 0, role: 'region', 'aria-label': caption },
    h('table', {},
      h('caption', { class: 'sr-only' }, caption),
      h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col', class: c.num ? 'num' : null }, c.label)))),
      h('tbody', {}, rows.map((row) => h('tr', {},
        columns.map((c) => h('td', { class: c.num ? 'num' : null }, c.cell(row))))))));
}

export function facts(pairs) {
  return h('dl', { class: 'facts' }, pairs.filter(Boolean).map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
}

/**
 * A modal dialog. `fields` are extra nodes (inputs); `onConfirm(dialog)` may throw an ApiError,
 * shown inside the dialog, which stays open. Focus goes to the first field (or Cancel) and
 * back to what had it when the dialog closes. Esc cancels.
 */
export function dialog({ title, body = [], fields = [], confirmLabel = 'Confirm', danger = false, onConfirm }) {
  const opener = document.activeElement;
  const errors = h('div', { 'aria-live': 'assertive' });
  const confirm = h('button', { type: 'submit', class: danger ? 'danger' : 'primary', 'data-role': 'confirm' }, confirmLabel);
  const cancel = h('button', { type: 'button', 'data-role': 'cancel' }, 'Cancel');
  const titleId = `dialog-${Math.random().toString(36).slice(2)}`;
  const form = h('form', { method: 'dialog' },
    h('h2', { id: titleId }, title), body, fields, errors, h('div', { class: 'actions' }, cancel, confirm));
  const box = h('dialog', { 'aria-labelledby': titleId }, form);
  const close = () => {
    box.close();
    box.remove();
    if (opener && document.contains(opener)) opener.focus();
  };
  cancel.addEventListener('click', close);
  box.addEventListener('cancel', (e) => { e.preventDefault(); close(); });
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    fill(errors);
    confirm.disabled = true;
    try {
      await onConfirm(box);
      close();
    } catch (error) {
      fill(errors, errorBox(error));
      confirm.disabled = false;
    }
  });
  document.body.append(box);
  box.showModal();
  const first = form.querySelector('input, textarea, select') || cancel;
  first.focus();
  return { box, confirm, body: form, close, errors };
}

/** Bars of processed and failed events per bucket, oldest on the left. */
export function throughputChart(series, bucketSeconds) {
  const width = 600;
  const height = 160;
  const pad = { left: 40, right: 8, top: 10, bottom: 22 };
  const max = Math.max(1, ...series.map((b) => b.processed + b.failed));
  const slot = (width - pad.left - pad.right) / Math.max(1, series.length);
  const scale = (v) => (v / max) * (height - pad.top - pad.bottom);
  const bars = series.map((b, i) => {
    const x = pad.left + i * slot + 2;
    const w = Math.max(1, slot - 4);
    const hp = scale(b.processed);
    const hf = scale(b.failed);
    const base = height - pad.bottom;
    return svg('g', {},
      svg('title', {}, `${timeOnly.format(new Date(b.at))}: ${b.processed} processed, ${b.failed} failed`),
      svg('rect', { x, y: base - hp, width: w, height: hp, fill: '#2563eb' }),
      svg('rect', { x, y: base - hp - hf, width: w, height: hf, fill: '#dc2626' }));
  });
  const total = series.reduce((s, b) => s + b.processed, 0);
  const failed = series.reduce((s, b) => s + b.failed, 0);
  return svg('svg', {
    class: 'chart', viewBox: `0 0 ${width} ${height}`, role: 'img',
    'aria-label': `Events per ${bucketSeconds} seconds over the last ${series.length * bucketSeconds} seconds: ${total} processed, ${failed} failed`,
  },
  svg('line', { class: 'axis', x1: pad.left, x2: width - pad.right, y1: height - pad.bottom, y2: height - pad.bottom }),
  svg('text', { x: pad.left - 6, y: pad.top + 10, 'text-anchor': 'end' }, String(max)),
  svg('text', { x: pad.left - 6, y: height - pad.bottom, 'text-anchor': 'end' }, '0'),
  svg('text', { x: pad.left, y: height - 6 }, `${series.length * bucketSeconds} s ago`),
  svg('text', { x: width - pad.right, y: height - 6, 'text-anchor': 'end' }, 'now'),
  bars);
}

/** Horizontal bars: people in each stage of one funnel. */
export function stageChart(funnel, stages) {
  const rowHeight = 28;
  const labelWidth = 150;
  const width = 600;
  const height = stages.length * rowHeight + 8;
  const max = Math.max(1, ...stages.map((s) => s.people));
  const room = width - labelWidth - 60;
  const rows = stages.map((s, i) => {
    const y = 4 + i * rowHeight;
    const w = Math.max(2, (s.people / max) * room);
    return svg('g', {},
      svg('title', {}, `${s.stage}: ${s.people} people`),
      svg('text', { x: labelWidth - 8, y: y + 18, 'text-anchor': 'end' }, s.stage),
      svg('rect', { x: labelWidth, y: y + 4, width: w, height: rowHeight - 8, rx: 3, fill: '#0d9488' }),
      svg('text', { x: labelWidth + w + 6, y: y + 18 }, formatNumber(s.people)));
  });
  return svg('svg', {
    class: 'chart', viewBox: `0 0 ${width} ${height}`, role: 'img',
    'aria-label': `People per stage of ${funnel}: ${stages.map((s) => `${s.stage} ${s.people}`).join(', ')}`,
  }, rows);
}
