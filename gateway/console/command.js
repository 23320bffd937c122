// One command: what it is, what it waits for (its pending conditions, waits, timers, open
// children), its tree, the timeline of its history, its data, and an abort with confirmation.

import { api } from './api.js';
import { add, ago, badge, commandLink, dialog, errorBox, facts, fill, flash, h, json, ownerLink, table, time } from './ui.js';

const ENTRY = {
  received: 'Received',
  emitted: 'Emitted',
  state_changed: 'State changed',
  ignored: 'Ignored',
};
const HISTORY_PAGE = 500;

function treeNode(node, selfId) {
  return h('li', { class: node.id === selfId ? 'self' : null, 'data-state': node.state },
    commandLink(node.id, node.kind), ' ', badge(node.state),
    node.group ? h('span', { class: 'muted' }, ` group ${node.group}`) : null,
    node.reason ? h('span', { class: 'muted' }, ` — ${node.reason}`) : null,
    node.children.length ? h('ul', {}, node.children.map((c) => treeNode(c, selfId))) : null);
}

function timelineEntry(e) {
  const states = e.from_state || e.to_state
    ? [' ', e.from_state ? badge(e.from_state) : null, e.from_state && e.to_state ? ' → ' : null, e.to_state ? badge(e.to_state) : null]
    : null;
  return h('li', { class: e.entry, 'data-entry': e.entry },
    h('span', { class: 'when' }, time(e.at)),
    h('span', { class: 'what' }, ENTRY[e.entry] || e.entry),
    e.event_type ? h('code', {}, e.event_type) : null,
    states,
    h('span', { class: 'muted' }, ` v${e.version}`),
    e.detail ? h('details', {}, h('summary', {}, 'Detail'), json(e.detail)) : null);
}

async function loadHistory(id, list, more, after = 0) {
  const page = await api(`/v1/commands/${id}/history`, { query: { after, limit: HISTORY_PAGE } });
  add(list, ...page.entries.map(timelineEntry));
  fill(more);
  if (page.next_after) {
    add(more, h('button', {
      type: 'button',
      on: {
        click: async () => {
          try {
            await loadHistory(id, list, more, page.next_after);
          } catch (error) {
            fill(more, errorBox(error, 'Could not read more history'));
          }
        },
      },
    }, 'Show more history'));
  }
}

function pending(c) {
  const parts = [];
  if (c.ui) {
    parts.push(h('div', { class: 'pending-card' }, h('p', {}, c.ui.text || c.ui.code), h('small', {}, c.ui.code)));
  }
  const open = c.children && c.children.open;
  if (c.children && c.children.total) {
    parts.push(h('p', {}, `${c.children.total} children, ${open} still open.`));
    parts.push(table('Fan-in groups', [
      { label: 'Group', cell: (g) => g.name },
      { label: 'Policy', cell: (g) => (g.quorum ? `${g.policy} ${g.quorum}` : g.policy) },
      // `each`: every child's end reaches the parent as an event; `settled`: children count
      // themselves in, and the parent hears only the verdict.
      { label: 'Reports', cell: (g) => g.reports },
      { label: 'Total', num: true, cell: (g) => g.total },
      { label: 'Completed', num: true, cell: (g) => g.completed },
      { label: 'Failed', num: true, cell: (g) => g.failed },
      { label: 'Aborted', num: true, cell: (g) => g.aborted },
      { label: 'State', cell: (g) => badge(g.state, { open: 'waiting', succeeded: 'completed', closed: 'aborted' }[g.state] || 'failed') },
      { label: 'Deadline', cell: (g) => time(g.deadline_at) },
    ], c.children.groups, { empty: '' }));
  }
  parts.push(h('h3', {}, 'Waits'));
  parts.push(table('Waits', [
    { label: 'Event type', cell: (w) => h('code', {}, w.event_type) },
    { label: 'Correlation key', cell: (w) => h('span', { class: 'mono' }, w.correlation_key) },
    { label: 'Times out', cell: (w) => (w.timeout_at ? [time(w.timeout_at), ` (${ago(w.timeout_at)})`] : 'never') },
    { label: 'Since', cell: (w) => time(w.created_at) },
  ], c.waits || [], { empty: 'It waits for no event.' }));
  parts.push(h('h3', {}, 'Timers'));
  parts.push(table('Timers', [
    { label: 'Name', cell: (t) => h('code', {}, t.name) },
    { label: 'Kind', cell: (t) => t.kind },
    { label: 'Due', cell: (t) => [time(t.due_at), ` (${ago(t.due_at)})`] },
    { label: 'Schedule', cell: (t) => (t.cron ? `${t.cron} (${t.tz || 'UTC'})` : '') },
    { label: 'Fired', num: true, cell: (t) => t.fired },
  ], c.timers || [], { empty: 'It has no timer.' }));
  return parts;
}

function abortButton(ctx, c, onDone) {
  const why = ctx.me.lacks('ops')
    || (['completed', 'failed', 'aborted'].includes(c.state) ? `It has ended (${c.state}); there is nothing to abort.` : null);
  const button = h('button', {
    type: 'button',
    class: 'danger',
    'data-role': 'abort',
    disabled: Boolean(why),
    'aria-describedby': why ? 'abort-why' : null,
    on: {
      click: () => {
        const reason = h('textarea', { name: 'reason', maxlength: 1000, placeholder: 'customer cancelled' });
        const open = c.children ? c.children.open : 0;
        dialog({
          title: 'Abort this command?',
          danger: true,
          confirmLabel: 'Abort command',
          body: [
            h('p', {}, `${c.kind} `, h('code', {}, c.id), ` (owner ${c.owner}) will be aborted`,
              open ? `, and with it its ${open} open ${open === 1 ? 'child' : 'children'} and their descendants.` : '.'),
            h('p', {}, 'This cannot be undone.'),
          ],
          fields: [h('label', {}, 'Reason (recorded in the history of every aborted command)', reason)],
          onConfirm: async () => {
            const accepted = await api(`/v1/commands/${c.id}/abort`, {
              method: 'POST',
              body: reason.value.trim() ? { reason: reason.value.trim() } : {},
            });
            flash(`Abort accepted (event ${accepted.event_id}); the command ends once a worker applies it.`);
            onDone();
          },
        });
      },
    },
  }, 'Abort…');
  return h('div', { class: 'actions' }, button, why ? h('span', { id: 'abort-why', class: 'why' }, why) : null);
}

export default async function command(ctx) {
  const id = ctx.match[0];
  const c = await api(`/v1/commands/${encodeURIComponent(id)}`);
  const header = h('div', {},
    h('h1', {}, `${c.kind} `, badge(c.state)),
    facts([
      ['Command', h('code', { 'data-role': 'id' }, c.id)],
      ['Owner', ownerLink(c.owner)],
      ['Created', time(c.created_at)],
      ['Updated', time(c.updated_at)],
      c.ended_at ? ['Ended', time(c.ended_at)] : null,
      c.parent_id ? ['Parent', commandLink(c.parent_id)] : null,
      c.root_id !== c.id ? ['Root', commandLink(c.root_id)] : null,
      c.group ? ['Group', c.group] : null,
      c.reason ? ['Reason', c.reason] : null,
      ['Version', String(c.version)],
    ]));
  let poll = null;
  ctx.onCleanup(() => clearInterval(poll));
  const actions = abortButton(ctx, c, () => {
    // Show the outcome once the worker has applied the abort.
    const started = Date.now();
    poll = setInterval(async () => {
      try {
        const now = await api(`/v1/commands/${encodeURIComponent(id)}`);
        if (now.state !== c.state || Date.now() - started > 30000) {
          clearInterval(poll);
          ctx.navigate(`/commands/${id}`);
        }
      } catch (error) {
        clearInterval(poll);
        add(ctx.view, errorBox(error, 'Could not follow the abort'));
      }
    }, 500);
  });

  const treeBox = h('div', { 'data-role': 'tree' }, h('p', { class: 'muted' }, 'Reading the tree…'));
  const timeline = h('ol', { class: 'timeline', 'data-role': 'timeline' });
  const more = h('div', {});
  add(ctx.view, 
    header,
    actions,
    h('section', { class: 'panel', 'aria-labelledby': 'tree-title' },
      h('h2', { id: 'tree-title' }, 'Tree'), treeBox),
    h('section', { class: 'panel', 'aria-labelledby': 'pending-title', 'data-role': 'pending' },
      h('h2', { id: 'pending-title' }, 'Pending conditions, waits and timers'), pending(c)),
    h('section', { class: 'panel', 'aria-labelledby': 'timeline-title' },
      h('h2', { id: 'timeline-title' }, 'Timeline'),
      h('p', { class: 'muted' }, 'What came in, what went out and how the state moved, oldest first.'),
      timeline, more),
    h('section', { class: 'panel', 'aria-labelledby': 'data-title', 'data-role': 'data' },
      h('h2', { id: 'data-title' }, 'Data'), json(c.data),
      c.result ? [h('h3', {}, 'Result'), json(c.result)] : null));

  // The whole tree it belongs to, from its root, with this command in bold.
  const tree = api(`/v1/commands/${encodeURIComponent(c.root_id)}/tree`).then((t) => {
    fill(treeBox, 
      h('ul', { class: 'tree' }, treeNode(t.root, c.id)),
      t.truncated ? h('p', { class: 'muted' }, `Cut at ${t.nodes} nodes.`) : null);
  }, (error) => fill(treeBox, errorBox(error, 'Could not read the tree')));
  const history = loadHistory(encodeURIComponent(id), timeline, more)
    .catch((error) => fill(more, errorBox(error, 'Could not read the history')));
  await Promise.all([tree, history]);
}
