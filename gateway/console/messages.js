// Messages: the e-mails that failed for good (with the reason they were given up), and those
// still pending or sent, from `GET /v1/messages` (scope `ops`).

import { api } from './api.js';
import { add, commandLink, errorBox, h, ownerLink, table, time } from './ui.js';

const STATES = ['failed', 'pending', 'sent'];

export default async function messages(ctx) {
  const state = STATES.includes(ctx.params.get('state')) ? ctx.params.get('state') : 'failed';
  add(ctx.view, h('h1', {}, 'Messages'),
    h('p', { class: 'muted' }, 'A failed message was given up: its template did not render, the SMTP server refused its address, or its last attempt failed. It is not shown to the person as unread.'),
    h('p', {}, ...STATES.map((s) => h('a', {
      href: `#/messages?state=${s}`, class: 'tab', 'aria-current': s === state ? 'page' : null,
    }, s, ' '))));
  if (ctx.me.lacks('ops')) {
    add(ctx.view, h('p', { class: 'muted' }, ctx.me.lacks('ops')));
    return;
  }
  let answer;
  try {
    answer = await api(`/v1/messages?state=${state}`);
  } catch (error) {
    add(ctx.view, errorBox(error, 'Could not read the messages'));
    return;
  }
  add(ctx.view, table(`Messages ${state}`, [
    { label: 'When', cell: (m) => time(m.failed_at || m.sent_at || m.created_at) },
    { label: 'To', cell: (m) => h('span', {}, ownerLink(m.owner), ' ', h('span', { class: 'mono' }, m.email_to || '')) },
    { label: 'Template', cell: (m) => h('span', { class: 'mono' }, m.template) },
    { label: 'Attempts', cell: (m) => String(m.attempts) },
    { label: 'Reason', cell: (m) => h('span', { class: 'mono', 'data-role': 'reason' }, m.reason || '') },
    { label: 'Command', cell: (m) => commandLink(m.command_id) },
  ], answer.messages, { empty: `No ${state} messages.` }));
}
