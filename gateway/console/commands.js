// Commands: search by owner, kind, state and creation time, newest first, a page at a time
// (the API's keyset cursor, so a deep page costs what the first does).

import { api } from './api.js';
import { add, badge, commandLink, errorBox, fill, fromLocalInput, h, ownerLink, table, time, toLocalInput } from './ui.js';

const STATES = ['', 'open', 'pending', 'running', 'waiting', 'ended', 'completed', 'failed', 'aborted'];
const PAGE = 50;

export default async function commands(ctx) {
  const p = ctx.params;
  const field = (name, label, attrs = {}) => h('label', {}, label,
    h('input', { name, value: p.get(name) || '', autocomplete: 'off', ...attrs }));
  const state = h('select', { name: 'state' }, STATES.map((s) => h('option', { value: s, selected: (p.get('state') || '') === s }, s || 'any')));
  const since = h('input', { name: 'since', type: 'datetime-local', value: toLocalInput(p.get('since')) });
  const until = h('input', { name: 'until', type: 'datetime-local', value: toLocalInput(p.get('until')) });
  const form = h('form', {
    class: 'filters panel',
    role: 'search',
    'aria-label': 'Search commands',
    on: {
      submit: (e) => {
        e.preventDefault();
        const data = new FormData(form);
        ctx.navigate('/commands', {
          owner: data.get('owner'),
          kind: data.get('kind'),
          state: data.get('state'),
          since: fromLocalInput(data.get('since')),
          until: fromLocalInput(data.get('until')),
        });
      },
    },
  },
  field('owner', 'Owner', { placeholder: 'member:42' }),
  field('kind', 'Kind', { placeholder: 'quote' }),
  h('label', {}, 'State', state),
  h('label', {}, 'Created from', since),
  h('label', {}, 'Created before', until),
  h('div', { class: 'actions' },
    h('button', { type: 'submit', class: 'primary' }, 'Search'),
    h('a', { href: '#/commands', class: 'button' }, 'Clear')));

  add(ctx.view, h('h1', {}, 'Commands'), form);
  const results = h('section', { 'aria-label': 'Results', 'data-role': 'results' }, h('p', { class: 'muted' }, 'Searching…'));
  add(ctx.view, results);

  const filters = {
    owner: p.get('owner'),
    kind: p.get('kind'),
    state: p.get('state'),
    since: p.get('since'),
    until: p.get('until'),
  };
  let page;
  try {
    page = await api('/v1/commands', { query: { ...filters, after: p.get('after'), limit: PAGE } });
  } catch (error) {
    fill(results, errorBox(error, 'Search failed'));
    return;
  }
  const number = Number(p.get('page') || '1');
  const rows = page.commands;
  fill(results, 
    h('p', { class: 'muted' }, rows.length
      ? `Page ${number}: ${rows.length} command${rows.length === 1 ? '' : 's'}, newest first.`
      : 'No command matches.'),
    table('Commands', [
      { label: 'Created', cell: (c) => time(c.created_at) },
      { label: 'Command', cell: (c) => commandLink(c.id) },
      { label: 'Kind', cell: (c) => h('span', { class: 'mono' }, c.kind) },
      { label: 'Owner', cell: (c) => ownerLink(c.owner) },
      { label: 'State', cell: (c) => badge(c.state) },
      { label: 'Says', cell: (c) => (c.ui && c.ui.text) || c.reason || '' },
    ], rows, { empty: '' }),
    h('div', { class: 'actions', 'data-role': 'pages' },
      number > 1 ? h('a', { class: 'button', href: '#/commands', on: { click: (e) => { e.preventDefault(); ctx.navigate('/commands', filters); } } }, 'First page') : null,
      number > 1 ? h('button', { type: 'button', on: { click: () => window.history.back() } }, 'Previous page') : null,
      page.next ? h('button', {
        type: 'button',
        class: 'primary',
        'data-role': 'next',
        on: { click: () => ctx.navigate('/commands', { ...filters, after: page.next, page: number + 1 }) },
      }, 'Next page') : null));
}
