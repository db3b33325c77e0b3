"""Open an HTML file in headless Chromium (offline) and return the DOM after scripts ran.

A small script put first in the page records errors (uncaught exceptions, failed loads,
``console.error``) into ``<pre id="tll-errors">``; ``--dump-dom`` then hands back the page
as the browser left it, so tests can check that circuitsvis mounted and grids have their
hover text. Every host name resolves to nothing, so a page that needs the network shows a
failed load instead of quietly fetching it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

CAPTURE = """<script>
window.__tllErrors = [];
const __tllNote = (m) => { window.__tllErrors.push(String(m)); };
addEventListener('error', (e) => __tllNote(e.message ||
  ('failed to load ' + ((e.target && (e.target.src || e.target.href)) || e.type))), true);
addEventListener('unhandledrejection', (e) => __tllNote('unhandled rejection: ' + e.reason));
const __tllConsoleError = console.error;
console.error = (...args) => { __tllNote('console.error: ' + args.join(' '));
                               __tllConsoleError.apply(console, args); };
addEventListener('load', () => setTimeout(() => {
  const pre = document.createElement('pre');
  pre.id = 'tll-errors';
  pre.textContent = JSON.stringify(window.__tllErrors);
  document.body.appendChild(pre);
}, 1500));
</script>"""


def chromium() -> str | None:
    """The Chromium executable (Debian's ``chromium``), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def rendered_dom(path: Path, *, budget_ms: int = 8000, timeout_s: int = 120) -> str:
    """The DOM of ``path`` after its scripts ran (a copy with the error recorder first)."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("no chromium")
    text = Path(path).read_text(encoding="utf-8")
    head = text.find("<head>")
    at = head + len("<head>") if head >= 0 else 0
    probe = Path(path).with_name(Path(path).stem + ".probe.html")
    probe.write_text(text[:at] + CAPTURE + text[at:], encoding="utf-8")
    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--virtual-time-budget={budget_ms}", "--dump-dom", probe.resolve().as_uri()]
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0 or "</html>" not in done.stdout:
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def page_errors(soup) -> list[str]:
    """The errors the recorder saw (raises if the recorder never ran)."""
    node = soup.find(id="tll-errors")
    if node is None:
        raise AssertionError("the error recorder did not run (page load never finished)")
    return json.loads(node.get_text())
