#!/usr/bin/env python
"""Check whether notebooks open clean in JupyterLab, and what a save writes.

For each notebook this does what a new user does in a real browser: it opens
the notebook in JupyterLab, waits for its kernel to start and go idle (plus a
few seconds), records whether the document is dirty (unsaved-changes dot on
its tab), saves it, and compares the file JupyterLab wrote with the original.

The notebooks are copied to a temporary folder first: the originals are never
touched. JupyterLab runs with fresh, temporary config, settings, workspace and
data folders (kernels still come from the environment `jupyter` runs in), and
Chromium runs headless with a fresh profile, driven over the Chrome DevTools
Protocol. Both are stopped on exit.

Usage:
    python jupyterlab_check.py NOTEBOOK [NOTEBOOK ...] [--settle S] [--timeout S]
                               [--jupyter PATH] [--chromium PATH]

Needs `jupyter lab` (jupyterlab), Chromium or Chrome, and websocket-client.
Prints one table (notebook, dirty on open, what changed on save) followed by
the details of each change. Exit status: 0 if every notebook opened clean,
1 if any opened dirty, 2 on an error (missing tool, timeout, failed save).
"""
import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import ExitStack
from pathlib import Path

try:
    import websocket  # websocket-client
except ImportError:
    websocket = None

CHROMIUM_NAMES = ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')
MISSING = object()  # marks a key absent on one side of a diff

# Runs in the page: find the notebook opened by the URL, wait until its kernel is
# started and idle, then `settle_ms` more, and report dirtiness. Everything the
# model does meanwhile (metadata keys set, dirty flag flips) is logged.
OPEN_JS = r"""
async (path, settleMs, timeoutMs) => {
  const t0 = Date.now(), deadline = t0 + timeoutMs;
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const until = async (what, fn) => {
    for (;;) {
      const value = fn();
      if (value) return value;
      if (Date.now() > deadline) {
        const dialog = document.querySelector('.jp-Dialog');
        throw new Error('timed out waiting for ' + what +
                        (dialog ? '; dialog shown: ' + dialog.innerText.replace(/\s+/g, ' ') : ''));
      }
      await sleep(100);
    }
  };
  const app = await until('window.jupyterapp', () => window.jupyterapp);
  const panel = await until('the notebook to open', () =>
    Array.from(app.shell.widgets('main')).find(w => w.context && w.context.path === path && w.sessionContext));
  await panel.context.ready;
  const model = panel.context.model, log = [];
  const stamp = what => log.push(((Date.now() - t0) / 1000).toFixed(1) + 's ' + what);
  stamp('loaded, dirty=' + model.dirty);
  model.stateChanged.connect((_, change) => { if (change.name === 'dirty') stamp('dirty=' + change.newValue); });
  model.metadataChanged.connect((_, change) => stamp(change.type + ' metadata.' + change.key));
  model.cells.changed.connect((_, change) => stamp('cells ' + change.type));
  await panel.sessionContext.ready;
  const kernel = await until('a kernel', () => panel.sessionContext.session && panel.sessionContext.session.kernel);
  await kernel.info;
  await until('the kernel to be idle', () => kernel.connectionStatus === 'connected' && kernel.status === 'idle');
  stamp('kernel ' + kernel.name + ' idle');
  await sleep(settleMs);
  window.__checkedPanel = panel;
  return {
    dirty_model: model.dirty,
    dirty_tab: !!document.querySelector('#jp-main-dock-panel .lm-TabBar-tab.jp-mod-current.jp-mod-dirty'),
    log,
  };
}
"""

SAVE_JS = r"""
async () => {
  const panel = window.__checkedPanel, app = window.jupyterapp;
  app.shell.activateById(panel.id);
  if (app.shell.currentWidget !== panel) throw new Error('could not make the notebook the current widget');
  await app.commands.execute('docmanager:save');
  return {dirty_after_save: panel.context.model.dirty};
}
"""


class CheckError(Exception):
    """A failure that ends the run with a one-line message."""


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_for(what, fn, timeout, proc=None, log=None):
    """Poll `fn` until it returns a truthy value; fail if `proc` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise CheckError(f'{what}: process exited with {proc.returncode}{log_tail(log)}')
        try:
            value = fn()
            if value:
                return value
        except OSError:
            pass
        time.sleep(0.3)
    raise CheckError(f'timed out after {timeout}s waiting for {what}{log_tail(log)}')


def log_tail(log, lines=15):
    if log is None or not log.exists():
        return ''
    return '\n--- last lines of ' + str(log) + ' ---\n' + '\n'.join(log.read_text(errors='replace').splitlines()[-lines:])


def start(stack, cmd, log, env=None):
    """Start `cmd` in its own process group, logging to `log`; stop the group on exit."""
    out = stack.enter_context(open(log, 'w'))
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def stop():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftover children of the group
        except ProcessLookupError:
            pass
        proc.wait()

    stack.callback(stop)
    return proc


class JupyterLab:
    """A `jupyter lab` server over `root`, with throwaway user folders under `tmp`."""

    def __init__(self, stack, jupyter, root, tmp, timeout):
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.base = f'http://127.0.0.1:{self.port}'
        env = dict(os.environ)
        for var in ('JUPYTER_CONFIG_DIR', 'JUPYTER_DATA_DIR', 'JUPYTER_RUNTIME_DIR',
                    'JUPYTERLAB_SETTINGS_DIR', 'JUPYTERLAB_WORKSPACES_DIR', 'IPYTHONDIR'):
            env[var] = str(tmp / var.lower())
        cmd = [jupyter, 'lab', '--no-browser', f'--ServerApp.root_dir={root}', '--ServerApp.ip=127.0.0.1',
               f'--ServerApp.port={self.port}', '--ServerApp.port_retries=0',
               f'--IdentityProvider.token={self.token}', '--LabApp.expose_app_in_browser=True']
        if os.geteuid() == 0:
            cmd.append('--allow-root')
        log = tmp / 'jupyter.log'
        self.proc = start(stack, cmd, log, env)
        stack.callback(self.shutdown_kernels)  # runs before the server is stopped
        wait_for('the JupyterLab server', lambda: self.api('status'), timeout, self.proc, log)

    def api(self, path, method='GET'):
        req = urllib.request.Request(f'{self.base}/api/{path}', method=method,
                                     headers={'Authorization': f'token {self.token}'})
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if body else True

    def shutdown_kernels(self):
        try:
            for session in self.api('sessions'):
                self.api(f"sessions/{session['id']}", method='DELETE')
        except OSError:
            pass  # server gone: its kernels exit with it (ipykernel polls its parent)

    def url(self, workspace, path):
        return f'{self.base}/lab/workspaces/{workspace}/tree/{urllib.parse.quote(path)}?token={self.token}'


class Browser:
    """Headless Chromium with one page, driven over the Chrome DevTools Protocol."""

    def __init__(self, stack, chromium, tmp, timeout):
        port = free_port()
        log = tmp / 'chromium.log'
        cmd = [chromium, '--headless=new', f'--remote-debugging-port={port}', f'--user-data-dir={tmp / "chrome"}',
               '--no-first-run', '--no-default-browser-check', '--disable-gpu', '--disable-dev-shm-usage',
               '--disable-extensions', '--window-size=1280,900', 'about:blank']
        if os.geteuid() == 0:
            cmd.insert(1, '--no-sandbox')  # Chromium refuses to run as root with its sandbox
        proc = start(stack, cmd, log)

        def page_ws_url():
            with urllib.request.urlopen(f'http://127.0.0.1:{port}/json/list', timeout=5) as resp:
                pages = [t for t in json.load(resp) if t['type'] == 'page']
            return pages[0]['webSocketDebuggerUrl'] if pages else None

        ws_url = wait_for('Chromium', page_ws_url, timeout, proc, log)
        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        stack.callback(self.ws.close)
        self.next_id, self.events = 0, []
        self.call('Page.enable')
        self.call('Emulation.setFocusEmulationEnabled', enabled=True)  # headless pages lack focus otherwise

    def call(self, method, timeout=30, **params):
        self.next_id += 1
        self.ws.settimeout(timeout)
        self.ws.send(json.dumps({'id': self.next_id, 'method': method, 'params': params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get('id') == self.next_id:
                if 'error' in msg:
                    raise CheckError(f"{method} failed: {msg['error'].get('message')}")
                return msg['result']
            self.events.append(msg)

    def navigate(self, url, timeout):
        self.events.clear()
        self.call('Page.navigate', url=url)
        deadline = time.monotonic() + timeout
        while not any(e.get('method') == 'Page.loadEventFired' for e in self.events):
            if time.monotonic() > deadline:
                raise CheckError(f'timed out after {timeout}s loading {url}')
            self.ws.settimeout(max(deadline - time.monotonic(), 0.1))
            try:
                self.events.append(json.loads(self.ws.recv()))
            except websocket.WebSocketTimeoutException:
                pass

    def run_js(self, function, *args, timeout=30):
        """Call the JS `function` source with `args`, await it, and return its JSON result."""
        expr = f'({function})({", ".join(json.dumps(a) for a in args)})'
        res = self.call('Runtime.evaluate', timeout=timeout + 10, expression=expr,
                        awaitPromise=True, returnByValue=True)
        if 'exceptionDetails' in res:
            details = res['exceptionDetails']
            raise CheckError(details.get('exception', {}).get('description', details.get('text')).splitlines()[0])
        return res['result'].get('value')


def diff(path, old, new):
    """Lines describing how JSON value `new` differs from `old`; `path` names the value."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for k in sorted(old.keys() | new.keys())
                for line in diff(f'{path}.{k}', old.get(k, MISSING), new.get(k, MISSING))]
    if old == new:
        return []
    if old is MISSING:
        return [f'+ {path} = {json.dumps(new, ensure_ascii=False)}']
    if new is MISSING:
        return [f'- {path} (was {json.dumps(old, ensure_ascii=False)})']
    return [f'~ {path}: {json.dumps(old, ensure_ascii=False)} -> {json.dumps(new, ensure_ascii=False)}']


def describe_changes(old_text, new_text):
    """(summary, detail lines) for the change from notebook text `old_text` to `new_text`."""
    if old_text == new_text:
        return 'nothing (byte-identical)', []
    old, new = json.loads(old_text), json.loads(new_text)
    lines = [line for k in sorted((old.keys() | new.keys()) - {'cells'})
             for line in diff(k, old.get(k, MISSING), new.get(k, MISSING))]
    summary = [line.split()[0] + line.split()[1].rstrip(':') for line in lines]
    old_cells, new_cells = old.get('cells', []), new.get('cells', [])
    if len(old_cells) != len(new_cells):
        summary.append(f'cells: {len(old_cells)} -> {len(new_cells)}')
    else:
        changed_fields = {}
        for i, (a, b) in enumerate(zip(old_cells, new_cells)):
            for line in diff(f'cells[{i}]', a, b):
                lines.append(line)
                field = line.split()[1].split('.')[1].rstrip(':')
                changed_fields.setdefault(field, set()).add(i)
        summary += [f'cells.{f} ({len(ix)}/{len(old_cells)} cells)' for f, ix in sorted(changed_fields.items())]
    if not summary:
        return 'formatting only (same JSON)', []
    return ', '.join(summary), lines


def check(browser, lab, root, rel, settle, timeout):
    """Open, inspect and save the notebook at `root/rel`; return a result dict."""
    nb_file = root / rel
    original, mtime = nb_file.read_text(encoding='utf-8'), nb_file.stat().st_mtime_ns
    t0 = time.monotonic()
    browser.navigate(lab.url(f'check{rel.parent.name}', rel.as_posix()), timeout)
    opened = browser.run_js(OPEN_JS, rel.as_posix(), int(settle * 1000), int(timeout * 1000), timeout=timeout)
    saved = browser.run_js(SAVE_JS, timeout=timeout)
    if saved['dirty_after_save']:
        raise CheckError(f'{rel.name}: still dirty after docmanager:save')
    lab.shutdown_kernels()
    if nb_file.stat().st_mtime_ns == mtime:
        raise CheckError(f'{rel.name}: docmanager:save did not write the file')
    summary, lines = describe_changes(original, nb_file.read_text(encoding='utf-8'))
    return dict(opened, dirty=opened['dirty_model'] or opened['dirty_tab'],
                summary=summary, lines=lines, seconds=time.monotonic() - t0)


def find_tool(given, names, what):
    for name in ([given] if given else names):
        found = shutil.which(name)
        if found:
            return found
    raise CheckError(f'{what} not found (looked for {given or ", ".join(names)} on PATH); '
                     f'install it or pass its path')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('notebooks', nargs='+', type=Path, help='notebooks to check (copied, never modified)')
    parser.add_argument('--settle', type=float, default=3, help='seconds to wait after the kernel is idle')
    parser.add_argument('--timeout', type=float, default=180, help='seconds allowed per step')
    parser.add_argument('--jupyter', help='the jupyter executable (default: jupyter on PATH)')
    parser.add_argument('--chromium', help='the Chromium/Chrome executable (default: found on PATH)')
    args = parser.parse_args(argv)
    if websocket is None:
        print('jupyterlab_check: error: websocket-client is not installed (pip install websocket-client)',
              file=sys.stderr)
        return 2
    try:
        jupyter = find_tool(args.jupyter, ['jupyter'], 'jupyter')
        chromium = find_tool(args.chromium, CHROMIUM_NAMES, 'Chromium')
        for nb in args.notebooks:
            if not nb.is_file():
                raise CheckError(f'no such notebook: {nb}')
        with ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix='jupyterlab_check_')))
            root = tmp / 'root'
            rels = []
            for i, nb in enumerate(args.notebooks):  # one folder each: names may repeat
                rel = Path(str(i)) / nb.name
                (root / rel).parent.mkdir(parents=True)
                shutil.copyfile(nb, root / rel)
                rels.append(rel)
            lab = JupyterLab(stack, jupyter, root, tmp, args.timeout)
            browser = Browser(stack, chromium, tmp, args.timeout)
            results = [check(browser, lab, root, rel, args.settle, args.timeout) for rel in rels]
    except (CheckError, websocket.WebSocketException) as e:
        print(f'jupyterlab_check: error: {e}', file=sys.stderr)
        return 2

    names = [str(nb) for nb in args.notebooks]
    width = max(len('notebook'), *map(len, names))
    print(f'{"notebook":<{width}}  dirty on open  changed on save')
    for name, r in zip(names, results):
        print(f'{name:<{width}}  {"yes" if r["dirty"] else "no":<13}  {r["summary"]}')
    for name, r in zip(names, results):
        print(f'\n{name} ({r["seconds"]:.1f}s; model dirty={r["dirty_model"]}, tab dirty={r["dirty_tab"]})')
        print('  while opening: ' + '; '.join(r['log']))
        for line in r['lines']:
            print('  ' + line)
    return 1 if any(r['dirty'] for r in results) else 0


if __name__ == '__main__':
    sys.exit(main())
