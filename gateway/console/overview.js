// Overview: throughput, failures, backlogs, dead letters, timers and people per funnel stage,
// refreshed every few seconds.

import { api } from './api.js';
import { add, errorBox, fill, formatNumber, formatRate, h, stageChart, table, throughputChart, time } from './ui.js';

const REFRESH_MS = 5000;

const people = (n) => `${formatNumber(n)} ${n === 1 ? 'person' : 'people'}`;

function card(metric, label, value, note, { alert = false, href = null } = {}) {
  const shown = href ? h('a', { href }, value) : value;
  return h('div', { class: `card${alert ? ' alert' : ''}`, 'data-metric': metric },
    h('div', { class: 'label' }, label),
    h('div', { class: 'value' }, shown),
    note ? h('div', { class: 'note' }, note) : null);
}

function draw(o) {
  const depth = o.work_queue.depth === null || o.work_queue.depth === undefined
    ? card('queue', 'Work queue depth', 'unknown', `${o.work_queue.queue}: ${o.work_queue.error}`, { alert: true })
    : card('queue', 'Work queue depth', formatNumber(o.work_queue.depth), `ready in ${o.work_queue.queue}`);
  const funnels = new Map();
  for (const row of o.funnels) {
    if (!funnels.has(row.funnel)) funnels.set(row.funnel, []);
    funnels.get(row.funnel).push(row);
  }
  return [
    h('div', { class: 'cards' },
      card('processed', 'Events processed', `${formatRate(o.processed.per_second)}/s`,
        `${formatNumber(o.processed.total)} in the last ${o.window_seconds} s`),
      card('failed', 'Events failed', `${formatRate(o.failed.per_second)}/s`,
        `${formatNumber(o.failed.retried)} retried, ${formatNumber(o.failed.dead_lettered)} dead at once, in the last ${o.window_seconds} s`,
        { alert: o.failed.total > 0 }),
      depth,
      card('outbox', 'Outbox backlog', formatNumber(o.outbox_backlog), 'events decided, not yet confirmed by the broker',
        { alert: o.outbox_backlog > 1000 }),
      card('dead', 'Dead letters', formatNumber(o.dead_letters_open), 'waiting for replay or discard',
        { alert: o.dead_letters_open > 0, href: '#/dead-letters' }),
      card('waiting', 'Waiting for a flow version', formatNumber(o.waiting_for_definition),
        'events of commands whose flow version no worker runs', { alert: o.waiting_for_definition > 0, href: '#/flows' }),
      card('timers', 'Timers due in the next hour', formatNumber(o.timers.due_next_hour),
        `${formatNumber(o.timers.overdue)} overdue`, { alert: o.timers.overdue > 100 })),
    h('div', { class: 'grid2' },
      h('section', { class: 'panel', 'aria-labelledby': 'throughput-title' },
        h('h2', { id: 'throughput-title' }, 'Throughput'),
        throughputChart(o.series, o.bucket_seconds),
        h('div', { class: 'legend' },
          h('span', {}, h('span', { class: 'swatch processed' }), 'processed'),
          h('span', {}, h('span', { class: 'swatch failed' }), 'failed'),
          h('span', {}, `per ${o.bucket_seconds} s`))),
      h('section', { class: 'panel', 'aria-labelledby': 'funnels-title', 'data-section': 'funnels' },
        h('h2', { id: 'funnels-title' }, 'People per funnel stage'),
        funnels.size === 0
          ? h('p', { class: 'muted' }, 'Nobody is in a funnel right now.')
          : [...funnels.entries()].map(([name, stages]) => h('figure', { class: 'funnel' },
            h('figcaption', {}, h('strong', {}, name), ` — ${people(stages.reduce((s, x) => s + x.people, 0))}`),
            stageChart(name, stages))),
        funnels.size === 0 ? null : h('details', {},
          h('summary', {}, 'The same as a table'),
          table('People per funnel stage', [
            { label: 'Funnel', cell: (r) => r.funnel },
            { label: 'Stage', cell: (r) => r.stage },
            { label: 'People', num: true, cell: (r) => formatNumber(r.people) },
          ], o.funnels)))),
  ];
}

export default async function overview(ctx) {
  const updated = h('span', {}, '…');
  const problem = h('div', {});
  const body = h('div', { 'data-role': 'overview' });
  add(ctx.view, 
    h('h1', {}, 'Overview'),
    h('p', { class: 'lede' }, `Refreshed every ${REFRESH_MS / 1000} seconds. Last update: `, updated),
    problem,
    body);
  let busy = false;
  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      const o = await api('/v1/overview');
      fill(problem);
      // Keep the open/closed state of the table across refreshes.
      const open = body.querySelector('details')?.open;
      fill(body, ...draw(o));
      if (open) body.querySelector('details').open = true;
      fill(updated, time(o.at));
    } catch (error) {
      // The last numbers stay on screen, under the error.
      fill(problem, errorBox(error, 'Could not refresh the overview'));
    } finally {
      busy = false;
    }
  }
  await refresh();
  const timer = setInterval(refresh, REFRESH_MS);
  ctx.onCleanup(() => clearInterval(timer));
}
