// The console's shell: sign-in, who is signed in, and hash routing to the pages
// (`#/`, `#/commands?owner=…`, `#/commands/<id>`, `#/kinds`, `#/flows/<kind>`, `#/dead-letters`, `#/messages`,
// `#/person/<owner>`).

import { api, clearToken, onUnauthorized, setToken, token } from './api.js';
import { add, errorBox, fill, h, timeZone } from './ui.js';
import overview from './overview.js';
import commands from './commands.js';
import command from './command.js';
import deadLetters from './dead_letters.js';
import kinds from './kinds.js';
import flows from './flows.js';
import messages from './messages.js';
import person from './person.js';

const ROUTES = [
  { pattern: /^\/$/, page: overview, nav: 'overview', title: 'Overview' },
  { pattern: /^\/commands$/, page: commands, nav: 'commands', title: 'Commands' },
  { pattern: /^\/commands\/([^/]+)$/, page: command, nav: 'commands', title: 'Command' },
  { pattern: /^\/kinds$/, page: kinds, nav: 'kinds', title: 'Kinds' },
  { pattern: /^\/flows(?:\/([^/]+))?$/, page: flows, nav: 'flows', title: 'Flows' },
  { pattern: /^\/dead-letters$/, page: deadLetters, nav: 'dead-letters', title: 'Dead letters' },
  { pattern: /^\/messages$/, page: messages, nav: 'messages', title: 'Messages' },
  { pattern: /^\/person(?:\/([^/]+))?$/, page: person, nav: 'person', title: 'Person' },
];

const WHO_KEY = 'cmdflow.console.whoami';
let me = null;
let cleanups = [];
let firstRender = true;

/** What the signed-in credential may do. */
function principal(who) {
  return {
    ...who,
    can: (scope) => who.scopes.includes(scope),
    /** Why an action that needs `scope` is not offered, or null when it is. */
    lacks: (scope) => (who.scopes.includes(scope)
      ? null
      : `This needs the \`${scope}\` scope; you signed in with ${who.id}, which has ${who.scopes.join(', ') || 'no scopes'}.`),
  };
}

function showWho() {
  const box = document.getElementById('who');
  if (!me) {
    fill(box);
    return;
  }
  fill(box, 
    h('span', { class: 'id', title: `Scopes: ${me.scopes.join(', ')}` }, `${me.id} · ${me.scopes.join(', ')}`),
    h('button', { type: 'button', on: { click: signOut } }, 'Sign out'));
}

function signOut() {
  clearToken();
  sessionStorage.removeItem(WHO_KEY);
  me = null;
  showWho();
  render();
}

function showSignIn(problem) {
  runCleanups();
  const main = document.getElementById('main');
  const input = h('input', { id: 'credential', name: 'credential', type: 'password', autocomplete: 'off', required: true, spellcheck: 'false' });
  const errors = h('div', {}, problem ? errorBox(problem, 'Signed out') : null);
  const form = h('form', {
    on: {
      submit: async (e) => {
        e.preventDefault();
        fill(errors);
        setToken(input.value.trim());
        try {
          const who = await api('/v1/whoami');
          sessionStorage.setItem(WHO_KEY, JSON.stringify(who));
          me = principal(who);
          showWho();
          render();
        } catch (error) {
          clearToken();
          fill(errors, errorBox(error, 'Could not sign in'));
          input.focus();
        }
      },
    },
  },
  h('label', { for: 'credential' }, 'API key or token', input),
  h('p', { class: 'muted' }, 'The key is kept in this tab only (session storage) and sent to this gateway\'s API. `cmdflow up` prints a development key when it starts.'),
  h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary' }, 'Sign in')),
  errors);
  fill(main, h('section', { class: 'signin panel', 'aria-labelledby': 'signin-title' },
    h('h1', { id: 'signin-title' }, 'Sign in to the cmdflow console'), form));
  markNav(null);
  input.focus();
}

onUnauthorized((error) => {
  clearToken();
  sessionStorage.removeItem(WHO_KEY);
  me = null;
  showWho();
  showSignIn(error);
});

function markNav(current) {
  for (const link of document.querySelectorAll('#nav a')) {
    if (link.dataset.page === current) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
}

function runCleanups() {
  for (const fn of cleanups) fn();
  cleanups = [];
}

/** Goes to `path` (`/commands`) with `params` (empty ones left out). */
export function navigate(path, params = {}) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && String(v) !== '') query.set(k, v);
  }
  const qs = query.toString();
  const target = `#${path}${qs ? `?${qs}` : ''}`;
  if (window.location.hash === target) render();
  else window.location.hash = target;
}

async function render() {
  const hash = window.location.hash || '#/';
  // `#main` and other in-page anchors are not routes.
  if (!hash.startsWith('#/') && !firstRender) return;
  const route = hash.startsWith('#/') ? hash.slice(1) : '/';
  const [path, qs] = route.split('?');
  runCleanups();
  if (!token() || !me) {
    showSignIn(null);
    return;
  }
  const found = ROUTES.map((r) => ({ r, m: path.match(r.pattern) })).find((x) => x.m);
  const main = document.getElementById('main');
  const view = h('div', { class: 'view' });
  fill(main, view);
  if (!found) {
    markNav(null);
    add(view, h('h1', { tabindex: -1 }, 'No such page'), h('p', {}, h('a', { href: '#/' }, 'Back to the overview')));
    return;
  }
  markNav(found.r.nav);
  document.title = `${found.r.title} · cmdflow console`;
  const ctx = {
    view,
    me,
    params: new URLSearchParams(qs || ''),
    match: found.m.slice(1).map((p) => (p === undefined ? undefined : decodeURIComponent(p))),
    navigate,
    onCleanup: (fn) => cleanups.push(fn),
  };
  const focusHeading = !firstRender;
  firstRender = false;
  try {
    await found.r.page(ctx);
  } catch (error) {
    add(view, errorBox(error));
  }
  // After a navigation, focus goes to the new page's heading, as a page load would.
  if (focusHeading && view.isConnected) {
    const heading = view.querySelector('h1');
    if (heading && !view.contains(document.activeElement)) {
      heading.setAttribute('tabindex', '-1');
      heading.focus({ preventScroll: false });
    }
  }
}

async function start() {
  document.getElementById('tz').textContent = timeZone();
  const saved = sessionStorage.getItem(WHO_KEY);
  if (token() && saved) {
    try {
      me = principal(JSON.parse(saved));
    } catch {
      me = null;
    }
  }
  window.addEventListener('hashchange', render);
  if (token()) {
    // The scopes may have changed since this tab signed in: ask again. A 401 shows the
    // sign-in form (see onUnauthorized).
    try {
      const who = await api('/v1/whoami');
      sessionStorage.setItem(WHO_KEY, JSON.stringify(who));
      me = principal(who);
    } catch (error) {
      if (error.status !== 401) {
        document.getElementById('main').replaceChildren(errorBox(error, 'Could not ask who you are'));
      }
      return;
    }
  }
  showWho();
  render();
}

start();
