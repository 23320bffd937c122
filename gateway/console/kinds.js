// Kinds: the catalogue the workers publish. What each kind is, its version, whether it is a
// handler in a binary or a funnel file, what starts it, and the JSON Schema its start data
// must meet (the gateway checks every start against it).

import { api } from './api.js';
import { add, errorBox, h, json, table, time } from './ui.js';

export default async function kinds(ctx) {
  add(ctx.view, h('h1', {}, 'Kinds'),
    h('p', { class: 'muted' }, 'What the workers of this fleet run. A start whose data breaks its kind\'s schema is refused with the field it is about.'));
  let catalogue;
  try {
    catalogue = await api('/v1/kinds');
  } catch (error) {
    add(ctx.view, errorBox(error, 'Could not read the kinds'));
    return;
  }
  const list = (items) => (items && items.length ? items.join(', ') : '');
  add(ctx.view, table('Kinds', [
    { label: 'Kind', cell: (k) => h('a', { class: 'mono', href: `#/commands?kind=${encodeURIComponent(k.name)}` }, k.name) },
    { label: 'Version', cell: (k) => k.version },
    { label: 'Defined by', cell: (k) => k.source },
    { label: 'Started by', cell: (k) => h('span', { class: 'mono' }, list(k.starts_on)) },
    { label: 'Requires', cell: (k) => h('span', { class: 'mono' }, list(k.schema && k.schema.required)) },
    { label: 'What it is for', cell: (k) => k.description || '' },
    { label: 'Published', cell: (k) => time(k.published_at) },
    { label: 'Start data', cell: (k) => h('details', {}, h('summary', {}, 'Schema'), json(k.schema)) },
  ], catalogue.kinds, { empty: 'No worker has published its kinds yet.' }));
}
