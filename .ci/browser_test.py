#!/usr/bin/env python3
"""Browser test of the widgets: JupyterLab on localhost, the widgets notebook run in Debian's chromium by Playwright.

Starts JupyterLab (random free port, random token, no browser) on a copy of nbs/19_widgets.ipynb in a temporary
folder (so nothing is saved into the repository), runs the code cells one by one as a reader does, checks that no
cell raised and that each of the seven explorers draws its figure (plotly traces in the page) before the next cell
runs, moves the seed slider of the mask explorer, checks that its figure changed, checks the page logged no error,
and saves screenshots under ci-artifacts/.
JupyterLab is killed at the end, whatever happens. Exit status 0 on success.
Usage: python .ci/browser_test.py [--chromium /usr/bin/chromium] [--out ci-artifacts] [--timeout 900]
"""
import argparse, json, os, secrets, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NB = '19_widgets.ipynb'

def log(*a): print('[browser]', *a, flush=True)

def free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def start_lab(work:Path, logf, tries:int=3, wait:float=120.):
    "Start JupyterLab on a free port; retry on another port if it does not answer within `wait` s. -> (proc, url, token)."
    for attempt in range(1, tries + 1):
        port, token = free_port(), secrets.token_hex(16)
        env = dict(os.environ, JUPYTER_CONFIG_DIR=str(work/'cfg'), JUPYTER_RUNTIME_DIR=str(work/'rt'), JUPYTER_DATA_DIR=str(work/'data'),
                   JUPYTERLAB_SETTINGS_DIR=str(work/'settings'), JUPYTERLAB_WORKSPACES_DIR=str(work/'ws'))
        cmd = [sys.executable, '-m', 'jupyterlab', '--no-browser', '--ip=127.0.0.1', f'--port={port}',
               f'--ServerApp.token={token}', '--ServerApp.port_retries=0', f'--ServerApp.root_dir={work/"nb"}',
               '--LabApp.expose_app_in_browser=True', '--allow-root']
        (work/'cfg').mkdir(exist_ok=True)                              # no websocket pings: a busy browser must not be cut off
        (work/'cfg'/'jupyter_server_config.py').write_text("c.ServerApp.tornado_settings = {'ws_ping_interval': 0}\n")
        for ext, plugin, value in (('notebook-extension', 'tracker', {'windowingMode': 'none'}),   # every cell in the DOM
                                   ('apputils-extension', 'notification', {'fetchNews': 'false', 'checkForUpdates': False})):
            f = work/'settings'/'@jupyterlab'/ext/f'{plugin}.jupyterlab-settings'
            f.parent.mkdir(parents=True, exist_ok=True); f.write_text(json.dumps(value))
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        url = f'http://127.0.0.1:{port}'
        t0 = time.time()
        while time.time() - t0 < wait and proc.poll() is None:
            try:
                with urllib.request.urlopen(f'{url}/api/status?token={token}', timeout=5) as r:
                    if r.status == 200: log(f'JupyterLab up on port {port} after {time.time() - t0:.0f} s (try {attempt})'); return proc, url, token
            except OSError: pass
            time.sleep(1)
        log(f'JupyterLab did not answer on port {port} (try {attempt}, exit {proc.poll()})'); stop_lab(proc)
    raise RuntimeError('JupyterLab did not start')

def stop_lab(proc):
    "Kill JupyterLab and its kernels (its whole process group)."
    if proc is None or proc.poll() is not None: return
    try: os.killpg(proc.pid, signal.SIGTERM); proc.wait(15)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try: os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError: pass
        proc.wait(10)

STATE_JS = """() => {
  const app = window.jupyterapp; if (!app) return null;
  const w = app.shell.currentWidget;
  if (!w || !w.content || !w.sessionContext || !w.context || w.context.path !== '%s') return null;
  const k = w.sessionContext.session && w.sessionContext.session.kernel;
  return {kernel: k ? k.status : null, types: w.content.model.toJSON().cells.map(c => c.cell_type)};
}""" % NB

RUN_JS = """i => { const w = window.jupyterapp.shell.currentWidget; w.content.activeCellIndex = i;
                 window.jupyterapp.commands.execute('notebook:run-cell'); return true; }"""

CELL_JS = """i => { const w = window.jupyterapp.shell.currentWidget, c = w.content.model.toJSON().cells[i];
                  const k = w.sessionContext.session && w.sessionContext.session.kernel;
                  return {n: c.execution_count, kernel: k ? k.status : null, src: [].concat(c.source).join('').slice(0, 60),
                          errors: c.outputs.filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue)}; }"""

PANELS_JS = """() => Array.from(document.querySelectorAll('[class*="echofm-"].widget-vbox')).map(p => {
  const e = p.querySelector('.js-plotly-plot');
  return {name: Array.from(p.classList).find(c => c.startsWith('echofm-')).slice(7), traces: e && e.data ? e.data.length : 0}; })"""

EXPLORERS = ('mask-explorer', 'reconstruction-viewer', 'similarity-explorer', 'ecg-viewer', 'trajectory-viewer',
             'training-dashboard', 'segmentation-viewer')

def wait_for(page, pred, what:str, timeout:float, every:float=1., report:float=30.):
    "Poll the notebook's state until `pred(state)`; log it every `report` s; TimeoutError after `timeout` s."
    t0 = last = time.time(); st = None
    while time.time() - t0 < timeout:
        st = page.evaluate(STATE_JS)
        if st is not None and pred(st): return st
        if time.time() - last > report: log(f'{what}: waiting, {time.time() - t0:.0f} s, kernel {(st or {}).get("kernel")}'); last = time.time()
        time.sleep(every)
    raise TimeoutError(f'{what}: not after {timeout:.0f} s (kernel {(st or {}).get("kernel")})')

def run_cell(page, i:int, timeout:float) -> dict:
    """Run code cell `i` alone and wait for its reply. One cell at a time, as a reader does: a kernel handed the whole
    notebook at once (run all) was seen to leave queued cells unrun; and the browser gets each displayed figure alone."""
    for attempt in (1, 2):
        t0 = time.time(); page.evaluate(RUN_JS, i); idle = 0
        while time.time() - t0 < timeout:
            c = page.evaluate(CELL_JS, i)
            if c['n'] is not None: return dict(c, seconds=time.time() - t0)
            idle = idle + 1 if c['kernel'] == 'idle' else 0
            if idle > 40: break                                      # ~10 s idle, no reply: the request was lost, send it again
            time.sleep(0.25)
        else: raise TimeoutError(f"cell {i} ({c['src']!r}) not done after {timeout:.0f} s")
        log(f"cell {i} ({c['src']!r}): no reply and the kernel idle; running it again")
    raise AssertionError(f"cell {i} ({c['src']!r}) never ran")

def wait_rendered(page, timeout:float) -> list:
    "Wait until every explorer on the page draws its figure (a plotly plot with traces); -> the panels."
    t0 = time.time()
    while True:
        panels = page.evaluate(PANELS_JS)
        if all(p['traces'] > 0 for p in panels): return panels
        if time.time() - t0 > timeout:
            raise AssertionError(f"explorers with an empty figure after {timeout:.0f} s: {[p['name'] for p in panels if not p['traces']]}")
        time.sleep(0.5)

def image_href(page, sel:str):
    "The href of the first image a plotly figure under `sel` draws (a PNG data URI), or None."
    return page.evaluate("""s => { const e = document.querySelector(s + ' .js-plotly-plot image');
                                   return e ? (e.getAttribute('href') || e.getAttribute('xlink:href')) : null; }""", sel)

def check_page(browser, url:str, token:str, out:Path, timeout:float):
    "Open the notebook, run it cell by cell, check every explorer draws, move a slider, check the figure, take screenshots."
    log(f'chromium {browser.version} launched')
    page = browser.new_page(viewport={'width': 1300, 'height': 1000})
    page.set_default_timeout(60_000)
    problems = []                     # uncaught page errors fail the test (anywidget's missed deadlines are retried above)
    page.on('pageerror', lambda e: (log('page error:', e), problems.append(str(e))))
    console = open(out/'console.log', 'w')                     # the browser's console, kept as an artefact
    def on_console(m):
        console.write(f'{time.strftime("%H:%M:%S")} {m.type}: {m.text}\n'); console.flush()
        if m.type == 'error' and 'anywidget' in m.text: log('console error:', m.text)
    page.on('console', on_console)
    for attempt in range(3):
        try:
            page.goto(f'{url}/lab/tree/{NB}?token={token}', wait_until='domcontentloaded', timeout=90_000)
            log('JupyterLab page loaded')
            st = wait_for(page, lambda s: s['kernel'] == 'idle', 'notebook open, kernel idle', 180)
            break
        except Exception as e:
            log(f'opening the notebook failed (try {attempt + 1}): {e}')
            if attempt == 2: raise
    code = [i for i, t in enumerate(st['types']) if t == 'code']
    log(f'kernel idle: running the {len(code)} code cells one by one')
    t0 = time.time(); shown = 0; retries = []
    for i in code:
        for attempt in (1, 2, 3):
            c = run_cell(page, i, max(60., timeout - (time.time() - t0)))
            if c['seconds'] > 10: log(f"cell {i} ({c['src']!r}) took {c['seconds']:.0f} s")
            if c['errors']: raise AssertionError(f"cell {i} ({c['src']!r}) raised: {c['errors']}")
            try: panels = wait_rendered(page, 60); break         # a displayed explorer draws before the next cell runs
            except AssertionError as e:                          # anywidget gives a new figure 2 s to load plotly's 5 MB
                if attempt == 3: raise                           # bundle, else drops its data: a loaded browser can miss it
                log(f'cell {i}: {e}; running it again ({attempt + 1}/3)'); retries.append(i)
        if len(panels) > shown: log(f"cell {i}: {panels[-1]['name']} drawn ({panels[-1]['traces']} traces)"); shown = len(panels)
    log(f'ran {len(code)} code cells in {time.time() - t0:.0f} s' + (f', display cells run again: {retries}' if retries else ''))
    missing = set(EXPLORERS) - {p['name'] for p in panels}
    assert not missing, f'explorers not on the page: {sorted(missing)}'
    sel = '.echofm-mask-explorer'
    panel = page.locator(sel).first
    panel.wait_for(state='attached', timeout=60_000)
    panel.scroll_into_view_if_needed()
    plot = page.locator(f'{sel} .js-plotly-plot').first
    plot.wait_for(state='visible', timeout=120_000)
    time.sleep(2)
    before, shot0 = image_href(page, sel), plot.screenshot()
    panel.screenshot(path=str(out/'mask_explorer_before.png'))
    readout = page.locator(f'{sel} .echofm-seed .widget-readout').first
    seed0 = readout.inner_text().strip()
    handle = page.locator(f'{sel} .echofm-seed .noUi-handle').first
    handle.click()
    for _ in range(3): handle.press('ArrowRight'); time.sleep(0.2)
    if readout.inner_text().strip() == seed0:                   # keyboard did nothing: drag the handle
        box = page.locator(f'{sel} .echofm-seed .noUi-target').first.bounding_box()
        hb = handle.bounding_box()
        page.mouse.move(hb['x'] + hb['width'] / 2, hb['y'] + hb['height'] / 2); page.mouse.down()
        page.mouse.move(box['x'] + box['width'] * 0.3, hb['y'] + hb['height'] / 2, steps=10); page.mouse.up()
    seed1 = readout.inner_text().strip()
    log(f'seed slider moved: {seed0} -> {seed1}')
    assert seed1 != seed0, 'the slider did not move'
    t1 = time.time(); changed = False
    while time.time() - t1 < 90 and not changed:                # the image the figure draws, or at least its pixels, change
        time.sleep(1); changed = image_href(page, sel) != before or plot.screenshot() != shot0
    assert changed, 'the figure did not change after the slider moved'
    log(f'figure changed {time.time() - t1:.1f} s after the slider moved')
    time.sleep(1)
    panel.screenshot(path=str(out/'mask_explorer_after.png'))
    sim = page.locator('.echofm-similarity-explorer').first
    sim.scroll_into_view_if_needed(); sim.screenshot(path=str(out/'similarity_explorer.png'))
    log(f'screenshots in {out}')
    problems = [p for p in problems if '[anywidget] Failed to initialize' not in p]
    assert not problems, f'errors in the page: {problems}'

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--chromium', default='/usr/bin/chromium')
    ap.add_argument('--out', default=str(ROOT/'ci-artifacts'))
    ap.add_argument('--timeout', type=float, default=900., help='seconds for running the whole notebook')
    a = ap.parse_args()
    def _stop(signum, frame): raise SystemExit(f'stopped by signal {signum}')
    signal.signal(signal.SIGTERM, _stop)                                  # `timeout` and CI cancels still clean up
    from playwright.sync_api import sync_playwright
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix='echofm-browser-'))
    (work/'nb').mkdir(); shutil.copy(ROOT/'nbs'/NB, work/'nb'/NB)
    logf = open(out/'jupyterlab.log', 'w')
    proc = None
    try:
        proc, url, token = start_lab(work, logf)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=a.chromium, headless=True,
                                         args=['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu'])
            try: check_page(browser, url, token, out, a.timeout)
            except BaseException:
                for pg in browser.contexts[0].pages if browser.contexts else []:
                    try: pg.screenshot(path=str(out/'failure.png')); log(f'failure screenshot: {out/"failure.png"}')
                    except Exception: pass
                raise
            finally: browser.close()
        log('PASSED')
        return 0
    finally:
        stop_lab(proc); logf.close()
        shutil.rmtree(work, ignore_errors=True)

if __name__ == '__main__': sys.exit(main())
