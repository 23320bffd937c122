// Person: what the owner feed holds for one owner, laid out as the person's own app would show
// it: what waits for them, their messages, and what they did.

import { api, ownerPath } from './api.js';
import { add, ago, errorBox, fill, h, time } from './ui.js';

const DOING = {
  pending: 'starting',
  running: 'in progress',
  waiting: 'waiting',
  completed: 'done',
  failed: 'did not go through',
  aborted: 'cancelled',
};

/** A quote item as text: a string as it is, an object by its name (or title, or SKU). */
function itemText(item) {
  if (item === null || typeof item !== 'object') return String(item);
  const label = item.name ?? item.title ?? item.sku ?? item.id;
  return label !== undefined && label !== null ? String(label) : JSON.stringify(item);
}

/** A sentence for one of the person's commands, in their words rather than ours. */
function activity(c) {
  const data = c.data || {};
  if (c.kind === 'query') return `You searched for “${data.q || ''}”`;
  if (c.kind === 'quote') return `Your quote${data.items ? ` for ${[].concat(data.items).map(itemText).join(', ')}` : ''}`;
  if (c.kind === 'membership') return 'Your membership application';
  if (c.kind.startsWith('funnel.')) return `Your journey: ${c.kind.slice(7).replaceAll('_', ' ')}${data.stage ? ` (${data.stage})` : ''}`;
  return c.kind;
}

export default async function person(ctx) {
  const owner = ctx.match[0] || ctx.params.get('owner') || '';
  const input = h('input', { name: 'owner', value: owner, placeholder: 'visitor:cookie-7f3a', autocomplete: 'off', required: true });
  const form = h('form', {
    class: 'filters panel',
    role: 'search',
    'aria-label': 'Show a person',
    on: {
      submit: (e) => {
        e.preventDefault();
        ctx.navigate(`/person/${encodeURIComponent(input.value.trim())}`);
      },
    },
  }, h('label', {}, 'Owner', input), h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary' }, 'Show')));
  add(ctx.view, h('h1', {}, owner ? `Person ${owner}` : 'Person'),
    h('p', { class: 'lede' }, 'What this person sees in their own app: the owner feed, across every identity linked to them.'),
    form);
  if (!owner) return;

  const app = h('article', { class: 'phone', 'aria-label': `The app as ${owner} sees it`, 'data-role': 'person' });
  add(ctx.view, app);
  let feed;
  try {
    feed = await api(ownerPath(owner, '/feed'), { query: { limit: 20 } });
  } catch (error) {
    fill(app, errorBox(error, 'Could not read the feed'));
    return;
  }
  const history = h('ul', { class: 'activity', 'data-role': 'activity' });
  const more = h('div', { class: 'actions' });
  const addHistory = (page) => {
    add(history, ...page.history.map((c) => h('li', {},
      h('span', {}, activity(c), ' — ', h('strong', {}, DOING[c.state] || c.state)),
      h('span', { class: 'muted' }, time(c.created_at)))));
    fill(more, page.next_cursor ? h('button', {
      type: 'button',
      on: {
        click: async () => {
          try {
            addHistory(await api(ownerPath(owner, '/feed'), { query: { limit: 20, cursor: page.next_cursor } }));
          } catch (error) {
            fill(more, errorBox(error, 'Could not read more'));
          }
        },
      },
    }, 'Show older') : null);
  };
  // Greet by the person's name when the feed knows it, else by the id part of the owner.
  const name = feed.name || owner.split(':').slice(1).join(':');
  add(app, 
    h('p', { class: 'hello' }, `Hello, ${name}`),
    feed.identities.length > 1 ? h('p', { class: 'muted' }, `Also known as ${feed.identities.filter((i) => i !== owner).join(', ')}`) : null,
    h('h2', {}, 'Waiting for you'),
    feed.pending.length
      ? h('div', { 'data-role': 'pending' }, feed.pending.map((p) => h('div', { class: `pending-card ${p.code.replace('.', '_')}`, 'data-code': p.code },
        h('p', {}, p.text),
        h('small', {}, p.code, ' · ', h('a', { href: `#/commands/${p.command_id}` }, 'see the command')))))
      : h('p', { class: 'muted', 'data-role': 'pending' }, 'Nothing is waiting for you.'),
    h('h2', {}, 'Messages'),
    feed.messages.length
      ? h('ul', { class: 'inbox', 'data-role': 'messages' }, feed.messages.map((m) => h('li', { class: m.read ? 'read' : 'unread' },
        h('div', { class: 'subject' }, m.subject),
        h('div', { class: 'body' }, m.body),
        h('small', { class: 'muted' }, m.channel === 'email' ? 'E-mail' : 'In the app', ' · ', time(m.created_at), ` (${ago(m.created_at)})`,
          m.read ? ' · read' : ' · unread'))))
      : h('p', { class: 'muted' }, 'No messages.'),
    h('h2', {}, 'What you did'),
    history, more);
  addHistory(feed);
  if (!feed.history.length) history.replaceWith(h('p', { class: 'muted' }, 'Nothing yet.'));
  // The console's view of the same commands, for whoever operates them.
  app.after(h('p', { class: 'muted' }, 'Operator view: ',
    h('a', { href: `#/commands?${new URLSearchParams({ owner })}` }, `all commands of ${owner}`), '.'));
}
