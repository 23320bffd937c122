// Flows: the command kinds defined as data files, every version the workers have run, and how
// many open commands run on each. A flow's page draws its states and transitions (the picture
// the workers laid out), with its Mermaid source and the file itself.

import { api } from './api.js';
import { add, errorBox, facts, h, table, time } from './ui.js';

async function list(ctx) {
  add(ctx.view, h('h1', {}, 'Flows'),
    h('p', { class: 'muted' }, 'Kinds defined by flow files. A command keeps the version it started on; a changed file applies to new commands only.'));
  let flows;
  try {
    flows = await api('/v1/flows');
  } catch (error) {
    add(ctx.view, errorBox(error, 'Could not read the flows'));
    return;
  }
  add(ctx.view, table('Flows', [
    { label: 'Kind', cell: (f) => h('a', { class: 'mono', href: `#/flows/${encodeURIComponent(f.kind)}` }, f.kind) },
    { label: 'Current version', cell: (f) => h('span', { class: 'mono' }, f.current) },
    { label: 'Versions kept', num: true, cell: (f) => String(f.versions.length) },
  ], flows.flows, { empty: 'No worker runs a flow yet.' }));
}

async function one(ctx, kind) {
  add(ctx.view, h('p', {}, h('a', { href: '#/flows' }, '← Flows')), h('h1', { class: 'mono' }, kind));
  let flow;
  try {
    flow = await api(`/v1/flows/${encodeURIComponent(kind)}`);
  } catch (error) {
    add(ctx.view, errorBox(error, `Could not read the flow ${kind}`));
    return;
  }
  flow.versions.forEach((v, i) => {
    const picture = v.svg
      ? h('figure', { class: 'flow-diagram' },
        h('figcaption', { class: 'muted' }, `States and transitions of version ${v.version}`),
        h('img', { src: `data:image/svg+xml;charset=utf-8,${encodeURIComponent(v.svg)}`, alt: `State diagram of ${kind}, version ${v.version}` }))
      : h('p', { class: 'muted' }, 'No picture of this version: see its Mermaid source.');
    add(ctx.view, h('section', { class: 'panel' },
      h('h2', {}, `Version ${v.version}${i === 0 ? ' (current)' : ''}`),
      facts([
        ['Open commands', h('a', { href: `#/commands?kind=${encodeURIComponent(kind)}` }, String(v.open_commands))],
        ['File', h('span', { class: 'mono' }, v.file)],
        ['SHA-256', h('span', { class: 'mono' }, v.hash)],
        ['First run', time(v.registered_at)],
        ['Last started as current', time(v.current_at)],
      ]),
      picture,
      h('details', {}, h('summary', {}, 'Mermaid state diagram'), h('pre', { class: 'json' }, v.mermaid)),
      h('details', {}, h('summary', {}, 'Definition'), h('pre', { class: 'json' }, v.definition))));
  });
}

export default async function flows(ctx) {
  const [kind] = ctx.match;
  if (kind) return one(ctx, kind);
  return list(ctx);
}
