// Dead letters: grouped by failure signature with counts, filtered by type, kind, owner and
// funnel; replay (dry-run count, confirmation, progress) and discard (with a reason). A letter
// shows the first KiB of its event; the whole stored body is a download, one letter at a time.

import { api, ApiError, token } from './api.js';
import { add, commandLink, dialog, errorBox, fill, flash, formatNumber, h, ownerLink, table, time } from './ui.js';

const FILTERS = ['type', 'kind', 'owner', 'funnel'];
/** How much of a body the API lists (`body_prefix`). */
const PREFIX_BYTES = 1024;

/**
 * Downloads a letter's stored body. The API needs the bearer credential, which a plain link
 * would not send: the body is fetched, then saved from memory under the letter's name.
 */
async function downloadBody(l, problem) {
  const headers = {};
  const credential = token();
  if (credential) headers.Authorization = `Bearer ${credential}`;
  try {
    let response;
    try {
      response = await fetch(new URL(l.body_url, window.location.origin), { headers, cache: 'no-store' });
    } catch (e) {
      throw new ApiError(0, 'network', `the gateway did not answer (${e.message})`);
    }
    if (!response.ok) {
      let json = null;
      try {
        json = await response.json();
      } catch {
        json = null;
      }
      throw new ApiError(response.status, (json && json.code) || 'error', (json && json.detail) || response.statusText);
    }
    const url = URL.createObjectURL(await response.blob());
    const link = h('a', { href: url, download: `dead-letter-${l.id}.bin`, hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    fill(problem);
  } catch (error) {
    fill(problem, errorBox(error, 'Could not download the body'));
  }
}

/** A letter's event as listed: pretty JSON when the prefix is all of it, else the prefix as text. */
function eventOf(l) {
  const whole = !l.body_truncated && l.body_size <= PREFIX_BYTES;
  let text = l.body_prefix;
  if (whole) {
    try {
      text = JSON.stringify(JSON.parse(l.body_prefix), null, 2);
    } catch {
      // Not JSON: shown as it is.
    }
  }
  let note = null;
  if (l.body_truncated) {
    note = `Kept truncated: only the first bytes of its ${formatNumber(l.body_size)} were kept, so it cannot be replayed. The first KiB:`;
  } else if (!whole) {
    note = `The first KiB of ${formatNumber(l.body_size)} bytes:`;
  }
  const problem = h('div', {});
  return [
    note ? h('p', { class: 'muted' }, note) : null,
    h('pre', { class: 'json', 'data-role': 'body-prefix' }, text),
    h('p', { class: 'mono muted' }, `SHA-256 ${l.body_sha256}`),
    h('div', { class: 'actions' }, h('button', { type: 'button', 'data-role': 'download-body', on: { click: () => downloadBody(l, problem) } },
      `Download the body (${formatNumber(l.body_size)} bytes${l.body_truncated ? ', as kept' : ''})`)),
    problem,
  ];
}
const STATES = ['dead', 'replayed', 'discarded'];

function filterOf(params) {
  const f = {};
  for (const k of [...FILTERS, 'state', 'signature']) {
    const v = params.get(k);
    if (v) f[k] = v;
  }
  return f;
}

/** Shows a replay job's progress until it finishes or is interrupted. */
function followReplay(ctx, job, box, onFinished) {
  const bar = h('progress', { max: Math.max(1, job.total), value: job.replayed });
  const text = h('p', {});
  const buttons = h('div', { class: 'actions' });
  const problem = h('div', {});
  fill(box, h('section', { class: 'panel', 'data-role': 'replay', 'aria-labelledby': 'replay-title' },
    h('h2', { id: 'replay-title' }, 'Replay'), h('p', { class: 'mono muted' }, `job ${job.id}`),
    bar, h('div', { role: 'status', 'aria-live': 'polite' }, text), buttons, problem));
  let timer = null;
  const show = (j) => {
    bar.max = Math.max(1, j.total);
    bar.value = j.replayed;
    const skipped = j.skipped ? ` (${formatNumber(j.skipped)} skipped: kept truncated)` : '';
    const error = j.error ? `: ${j.error}` : '';
    text.textContent = `Replayed ${j.replayed} of ${j.total}${skipped} — ${j.state}${error}`;
    text.dataset.state = j.state;
    fill(buttons, 
      j.state === 'running' ? h('button', { type: 'button', on: { click: () => act('interrupt') } }, 'Interrupt') : null,
      j.state === 'interrupted' ? h('button', { type: 'button', on: { click: () => act('resume') } }, 'Resume') : null);
  };
  const poll = async () => {
    try {
      const j = await api(`/v1/dead-letters/replays/${job.id}`);
      show(j);
      fill(problem);
      if (j.state !== 'running') {
        clearInterval(timer);
        timer = null;
        if (j.state === 'finished') onFinished(j);
      }
    } catch (error) {
      fill(problem, errorBox(error, 'Could not read the replay'));
    }
  };
  const act = async (what) => {
    try {
      show(await api(`/v1/dead-letters/replays/${job.id}/${what}`, { method: 'POST' }));
      if (!timer) timer = setInterval(poll, 700);
    } catch (error) {
      fill(problem, errorBox(error, `Could not ${what} the replay`));
    }
  };
  show(job);
  timer = setInterval(poll, 700);
  ctx.onCleanup(() => clearInterval(timer));
}

function replayDialog(ctx, filter, label, progress, refresh) {
  const rate = h('input', { name: 'rate', type: 'number', min: 1, max: 100000, placeholder: 'unthrottled', inputmode: 'numeric' });
  const count = h('p', { 'data-role': 'dry-run' }, 'Counting what would be replayed (dry run)…');
  const d = dialog({
    title: `Replay ${label}?`,
    confirmLabel: 'Replay',
    body: [count, h('p', { class: 'muted' }, 'Each event is published again; commands recognise an event they already applied, so nothing is applied twice.')],
    fields: [h('label', {}, 'At most this many per second (optional)', rate)],
    onConfirm: async () => {
      const body = { ...filter };
      if (rate.value) body.rate = Number(rate.value);
      const started = await api('/v1/dead-letters/replay', { method: 'POST', body });
      flash(`Replay started: ${started.count} dead letters.`);
      followReplay(ctx, started.job, progress, (j) => {
        flash(`Replay finished: ${j.replayed} of ${j.total} published again.`);
        refresh();
      });
    },
  });
  d.confirm.disabled = true;
  api('/v1/dead-letters/replay', { method: 'POST', body: { ...filter, dry_run: true } }).then((dry) => {
    const skipped = dry.skipped ? ` ${formatNumber(dry.skipped)} of them ${dry.skipped === 1 ? 'was' : 'were'} kept truncated and will be skipped (left dead).` : '';
    count.textContent = `${formatNumber(dry.count)} dead letter${dry.count === 1 ? '' : 's'} would be replayed.${skipped}`;
    count.dataset.count = String(dry.count);
    d.confirm.textContent = `Replay ${formatNumber(dry.count - (dry.skipped || 0))}`;
    d.confirm.disabled = dry.count - (dry.skipped || 0) === 0;
  }, (error) => fill(count, errorBox(error, 'Dry run failed')));
}

function discardDialog(filter, label, refresh) {
  const reason = h('textarea', { name: 'reason', required: true, maxlength: 1000, placeholder: 'why these are discarded' });
  const count = h('p', { 'data-role': 'dry-run' }, 'Counting…');
  const d = dialog({
    title: `Discard ${label}?`,
    danger: true,
    confirmLabel: 'Discard',
    body: [count, h('p', {}, 'Discarded dead letters are kept, with the reason, but are never replayed.')],
    fields: [h('label', {}, 'Reason (required, audited)', reason)],
    onConfirm: async () => {
      const done = await api('/v1/dead-letters/discard', { method: 'POST', body: { ...filter, reason: reason.value } });
      flash(`Discarded ${done.count} dead letters.`);
      refresh();
    },
  });
  d.confirm.disabled = true;
  // The same filter counts the same rows for either operation; a replay's dry run needs no reason.
  api('/v1/dead-letters/replay', { method: 'POST', body: { ...filter, dry_run: true } }).then((dry) => {
    count.textContent = `${formatNumber(dry.count)} dead letter${dry.count === 1 ? '' : 's'} would be discarded.`;
    d.confirm.disabled = dry.count === 0;
  }, (error) => fill(count, errorBox(error, 'Dry run failed')));
}

export default async function deadLetters(ctx) {
  const p = ctx.params;
  const filter = filterOf(p);
  const why = ctx.me.lacks('ops');
  const form = h('form', {
    class: 'filters panel',
    role: 'search',
    'aria-label': 'Filter dead letters',
    on: {
      submit: (e) => {
        e.preventDefault();
        const data = new FormData(form);
        const next = {};
        for (const k of [...FILTERS, 'state']) next[k] = data.get(k);
        if (next.state === 'dead') next.state = '';
        ctx.navigate('/dead-letters', next);
      },
    },
  },
  FILTERS.map((k) => h('label', {}, { type: 'Event type', kind: 'Kind', owner: 'Owner', funnel: 'Funnel' }[k],
    h('input', { name: k, value: p.get(k) || '', autocomplete: 'off' }))),
  h('label', {}, 'State', h('select', { name: 'state' }, STATES.map((s) => h('option', { value: s, selected: (p.get('state') || 'dead') === s }, s)))),
  h('div', { class: 'actions' },
    h('button', { type: 'submit', class: 'primary' }, 'Filter'),
    h('a', { href: '#/dead-letters', class: 'button' }, 'Clear')));
  const progress = h('div', {});
  const groupsBox = h('section', { 'aria-labelledby': 'groups-title', 'data-role': 'groups' });
  const lettersBox = h('section', { 'data-role': 'letters' });
  add(ctx.view, 
    h('h1', {}, 'Dead letters'),
    h('p', { class: 'lede' }, 'Events that could not be processed after their retries, grouped by failure signature (error class and failing handler).'),
    why ? h('p', { class: 'why', id: 'ops-why' }, `Replay and discard are off: ${why}`) : null,
    form, progress, groupsBox, lettersBox);

  const opsButton = (label, attrs, onClick) => h('button', {
    type: 'button', disabled: Boolean(why), 'aria-describedby': why ? 'ops-why' : null, ...attrs, on: { click: onClick },
  }, label);

  const refresh = async () => {
    const groupFilter = { ...filter };
    delete groupFilter.signature;
    let groups;
    try {
      groups = await api('/v1/dead-letters/groups', { query: groupFilter });
    } catch (error) {
      fill(groupsBox, errorBox(error, 'Could not read the dead letters'));
      return;
    }
    const open = (filter.state || 'dead') === 'dead';
    fill(groupsBox, 
      h('h2', { id: 'groups-title' }, 'By failure signature'),
      table('Dead letters by failure signature', [
        { label: 'Signature', cell: (g) => h('code', {}, g.signature) },
        { label: 'Count', num: true, cell: (g) => h('span', { 'data-role': 'count' }, formatNumber(g.count)) },
        { label: 'First failed', cell: (g) => time(g.first_failed_at) },
        { label: 'Last failed', cell: (g) => time(g.last_failed_at) },
        { label: 'Latest reason', cell: (g) => g.reason },
        {
          label: 'Actions',
          cell: (g) => h('div', { class: 'actions' },
            h('a', { class: 'button', href: `#/dead-letters?${new URLSearchParams({ ...groupFilter, signature: g.signature })}` }, 'Show'),
            open ? opsButton('Replay…', { 'data-role': 'replay', 'data-signature': g.signature },
              () => replayDialog(ctx, { ...groupFilter, signature: g.signature }, `the group ${g.signature}`, progress, refresh)) : null,
            open ? opsButton('Discard…', { 'data-role': 'discard', 'data-signature': g.signature },
              () => discardDialog({ ...groupFilter, signature: g.signature }, `the group ${g.signature}`, refresh)) : null),
        },
      ], groups.groups, { empty: 'No dead letters match.' }));
    if (filter.signature) await letters(filter.after);
  };

  const letters = async (after) => {
    let page;
    try {
      page = await api('/v1/dead-letters', { query: { ...filter, after, limit: 50 } });
    } catch (error) {
      fill(lettersBox, errorBox(error, 'Could not list the dead letters'));
      return;
    }
    fill(lettersBox, 
      h('h2', {}, 'Dead letters of ', h('code', {}, filter.signature)),
      table('Dead letters', [
        { label: 'Id', num: true, cell: (l) => String(l.id) },
        { label: 'Event type', cell: (l) => h('code', {}, l.event_type || l.routing_key) },
        { label: 'Command', cell: (l) => (l.command_id ? commandLink(l.command_id, l.kind || undefined) : '—') },
        { label: 'Owner', cell: (l) => (l.owner ? ownerLink(l.owner) : '—') },
        { label: 'Attempts', num: true, cell: (l) => String(l.attempts) },
        { label: 'Last failed', cell: (l) => time(l.last_failed_at) },
        { label: 'Reason', cell: (l) => [l.reason, h('details', {}, h('summary', {}, 'Event'), eventOf(l))] },
        {
          label: '',
          cell: (l) => (l.state === 'dead' ? opsButton('Replay…', { 'data-role': 'replay-one' },
            () => replayDialog(ctx, { ids: [l.id], state: 'dead' }, `dead letter ${l.id}`, progress, refresh)) : l.state),
        },
      ], page.dead_letters, { empty: 'None.' }),
      page.next_after ? h('div', { class: 'actions' }, h('button', { type: 'button', on: { click: () => letters(page.next_after) } }, 'Next page')) : null);
  };

  await refresh();
}
