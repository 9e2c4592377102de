"""The dashboard's smoke test in Firefox: Debian's firefox-esr, driven over WebDriver
BiDi by puppeteer-core (playwright cannot drive a stock Firefox).

tools/browser/install-firefox.sh installs both; the browser part is
``firefox/smoke.mjs``, run with node against a real standalone server, and
prints what it saw, which this test checks: the one-time link logs in and leaves
a clean URL; a job submitted with the CLI appears and turns RUNNING without a
reload, its name shown as text; a job's page shows its script and follows its
output; cancel, confirmed, works; no script error and no request off the server.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from tests.browser.test_standalone import XSS, login_link, submit
from tests.support.servers import KbatchServer
from tests.support.tools import installed

SMOKE = Path(__file__).with_name("firefox") / "smoke.mjs"


def test_dashboard_smoke_in_firefox(server: KbatchServer) -> None:
    module = installed("browser/install-firefox.sh", timeout=900)
    firefox = shutil.which("firefox-esr")
    node = shutil.which("node")
    assert firefox and node
    job_id = submit(server, "-J", XSS, "--wrap", "sleep 30")
    slow = submit(
        server,
        "-J",
        "counter",
        "--wrap",
        "for i in 1 2 3; do echo tick-$i; sleep 1; done; sleep 60",
    )
    link = login_link(server)
    done = subprocess.run(
        [node, str(SMOKE), str(module), firefox, link, server.url, job_id, slow],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["ok"], seen.get("error")
    assert seen["version"].startswith("firefox/")
    assert seen["url"] == server.url + "/"  # no code left in the address bar
    assert seen["who"].endswith("(admin)")
    assert seen["name"] == XSS and seen["images"] == 0  # text, never markup
    assert "echo tick-$i" in seen["script"]
    assert seen["running"] and seen["cancelled"]
    job = server.client().get(slow)
    assert job.state.value == "CANCELLED" and job.cancelled_by is not None
    assert seen["problems"] == [] and seen["outside"] == []
    server.client().cancel(job_id)
