"""A hostile web page in a real browser (headless Chromium) tries to run a note through the API.

The page is served from another local port, as any site the user visits could be. Its
script tries a JSON fetch without a token, one with a guessed token, a `no-cors` text
POST, and a classic HTML form POST. Nothing may run: the note is unchanged, no kernel
starts, the server counts the refusals, and the page's DOM shows the fetches failed.

A second page, from an origin the server was told to allow (`--allow-origin`), reads
/status with the token: the control that shows the browser does reach the API, so the
hostile page's failures are the server's doing, not a broken harness.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import make_note_vault
from tests.frontends.api.test_server import TOKEN, serving

pytestmark = pytest.mark.kernel  # a real server and runner (no kernel should ever start)

CHROMIUM = next(
    (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None
)

HOSTILE = """<!doctype html>
<html><body>
<pre id="out">pending</pre>
<iframe name="sink" id="sink"></iframe>
<form id="form" method="POST" action="{api}/api/v1/run" enctype="text/plain" target="sink">
  <input name='{{"note": "victim.md", "pad": "' value='"}}'>
</form>
<script>
const api = "{api}";
const results = {{}};
async function attempt(name, init) {{
  try {{
    const response = await fetch(api + "/api/v1/run", init);
    results[name] = "answered " + response.status + " " + response.type;
  }} catch (error) {{
    results[name] = "blocked " + error.name;
  }}
}}
(async () => {{
  const body = JSON.stringify({{note: "victim.md"}});
  await attempt("json-no-token", {{method: "POST", headers: {{"Content-Type": "application/json"}}, body}});
  await attempt("json-guessed-token", {{method: "POST",
    headers: {{"Content-Type": "application/json", "Authorization": "Bearer guessed-" + "g".repeat(40)}}, body}});
  await attempt("no-cors-text", {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}}, body}});
  document.getElementById("form").submit();
  results["form"] = "submitted";
  document.getElementById("out").textContent = "RESULTS " + JSON.stringify(results);
}})();
</script>
</body></html>
"""

FRIENDLY = """<!doctype html>
<html><body><pre id="out">pending</pre>
<script>
fetch("{api}/api/v1/status", {{headers: {{"Authorization": "Bearer {token}"}}}})
  .then(r => r.json().then(data => "status " + r.status + " trusted=" + data.trusted))
  .catch(error => "blocked " + error.name)
  .then(text => {{ document.getElementById("out").textContent = "RESULTS " + text; }});
</script>
</body></html>
"""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def page_server(folder: Path) -> Iterator[str]:
    """A tiny static site on another local port: the 'other web page'."""
    handler = functools.partial(_Quiet, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=30)


def dump_dom(url: str, profile: Path) -> str:
    assert CHROMIUM is not None
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,  # a guard against a hung browser, not a speed requirement
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def results_of(dom: str) -> str:
    marker = dom.find("RESULTS ")
    assert marker >= 0, f"the page's script never finished:\n{dom[:2000]}"
    return dom[marker + len("RESULTS ") : dom.find("</pre>", marker)]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_a_web_page_on_another_port_cannot_run_a_note(tmp_path: Path) -> None:
    marker = tmp_path / "victim-ran.txt"
    root = make_note_vault(
        tmp_path / "vault",
        {
            "victim.md": f"""
                ---
                vault-runner: true
                ---
                ```python
                import pathlib
                pathlib.Path({str(marker)!r}).write_text("it ran")
                ```
                """
        },
    )
    before = (root / "victim.md").read_bytes()
    site = tmp_path / "site"
    site.mkdir()
    with page_server(site) as hostile_origin, page_server(site) as friendly_origin:
        with serving(root, allowed_origins=(friendly_origin,), spares=0) as (server, runner, app):
            (site / "hostile.html").write_text(HOSTILE.format(api=server.url), encoding="utf-8")
            (site / "friendly.html").write_text(FRIENDLY.format(api=server.url, token=TOKEN), encoding="utf-8")
            profile = tmp_path / "profile"

            hostile = json.loads(results_of(dump_dom(f"{hostile_origin}/hostile.html", profile)))
            friendly = results_of(dump_dom(f"{friendly_origin}/friendly.html", profile))
            runner.wait_idle(60)
            status = runner.status()
            refused = dict(app.security.refusals)

    # The CORS fetches never got a readable answer; the no-cors one got only an opaque one.
    assert hostile["json-no-token"] == "blocked TypeError", hostile
    assert hostile["json-guessed-token"] == "blocked TypeError", hostile
    assert hostile["no-cors-text"] in {"answered 0 opaque", "blocked TypeError"}, hostile
    assert hostile["form"] == "submitted", hostile
    # They did reach the server, and were refused for their origin.
    assert refused.get("forbidden_origin", 0) >= 3, refused
    # Nothing ran.
    assert (root / "victim.md").read_bytes() == before
    assert not marker.exists()
    assert status["pool"]["kernels"] == 0 and status["notes"] == [], status
    # The control: an allowed origin with the token reads the API from the same browser.
    assert friendly == "status 200 trusted=true", friendly
