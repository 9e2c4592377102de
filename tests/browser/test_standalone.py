"""The dashboard of a standalone server, in a real browser (Debian's Chromium).

Proves: the one-time link logs in once and never again, and leaves a clean URL;
jobs appear and change state without a reload; output is followed live;
cancel and resubmit work through confirmed buttons; a job's name is shown as
text, never markup; actions without the CSRF token or from another origin are
refused; every page has a strict CSP and no request leaves the server; the
first view of 10,000 jobs renders within a second; the list is usable by
keyboard and readable on a phone.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Route, expect

from kbatch.models import JobState
from tests.support.browser import screenshot, watch_page
from tests.support.servers import KbatchServer

XSS = "<img src=x onerror=alert(1)>"


def login_link(server: KbatchServer) -> str:
    result = server.cli("dashboard", "--no-browser")
    assert result.returncode == 0, result.stderr
    link = result.stdout.strip().splitlines()[-1].strip()
    assert link.startswith(server.url + "/login?code=")
    assert server.token not in result.stdout
    return link


def submit(server: KbatchServer, *args: str) -> str:
    workdir = server.state_dir.parent / "work"
    workdir.mkdir(exist_ok=True)
    result = server.cli("submit", "--parsable", *args, cwd=workdir)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    yield ctx
    ctx.close()


def outside_requests(page: Page, server: KbatchServer) -> list[str]:
    seen: list[str] = []
    page.on(
        "request",
        lambda request: (
            seen.append(request.url) if not request.url.startswith(server.url + "/") else None
        ),
    )
    return seen


def logged_in(context: BrowserContext, server: KbatchServer) -> tuple[Page, list[str]]:
    page = context.new_page()
    problems = watch_page(page)
    page.goto(login_link(server))
    expect(page.locator("#who")).to_have_text(re.compile(r".+ \(admin\)"))
    assert "code=" not in page.url and page.url == server.url + "/"
    return page, problems


def test_the_one_time_link_logs_in_once(
    server: KbatchServer, browser: Browser, context: BrowserContext
) -> None:
    link = login_link(server)
    page = context.new_page()
    response = page.goto(link)
    assert response is not None
    expect(page.locator("#live")).to_have_text("live")
    assert page.url == server.url + "/"  # redirected to a clean URL: no code in history
    cookie = next(c for c in context.cookies() if c["name"] == "kbatch-session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    assert cookie["value"] != server.token

    # The same link, in another browser: refused, not logged in.
    other = browser.new_context()
    try:
        again = other.new_page()
        answer = again.goto(link)
        assert answer is not None and answer.status == 403
        expect(again.locator("h1")).to_contain_text("expired")
        assert not [c for c in other.cookies() if c["name"] == "kbatch-session"]
        # Without a session the root asks for a link; it shows no data.
        home = again.goto(server.url + "/")
        assert home is not None and home.status == 401
        assert "kbatch dashboard" in again.locator("p").inner_text()
    finally:
        other.close()


def test_headers_and_csrf(server: KbatchServer, context: BrowserContext) -> None:
    page, problems = logged_in(context, server)
    response = httpx.get(server.url + "/", cookies=_cookies(context))
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert response.headers["x-frame-options"] == "DENY"
    job_id = submit(server, "--wrap", "sleep 60")
    cookies = _cookies(context)
    url = f"{server.url}/api/v1/jobs/{job_id}/cancel"
    origin = {"Origin": server.url.rsplit(":", 1)[0] + ":" + server.url.rsplit(":", 1)[1]}
    # No CSRF token; a wrong one; the right one from another origin: all refused.
    no_token = httpx.post(url, cookies=cookies, headers=origin)
    assert no_token.status_code == 403 and no_token.json()["error"]["code"] == "bad_csrf"
    wrong = httpx.post(url, cookies=cookies, headers={**origin, "X-Kbatch-CSRF": "x"})
    assert wrong.status_code == 403
    csrf = page.evaluate("fetch('dashboard/session').then(r => r.json()).then(b => b.csrf)")
    evil = httpx.post(
        url, cookies=cookies, headers={"Origin": "http://evil.example", "X-Kbatch-CSRF": csrf}
    )
    assert evil.status_code == 403 and evil.json()["error"]["code"] == "bad_origin"
    assert server.client().get(job_id).state.value in ("PENDING", "RUNNING")
    ok = httpx.post(url, cookies=cookies, headers={**origin, "X-Kbatch-CSRF": csrf})
    assert ok.status_code == 200, ok.text
    assert problems == []


def _cookies(context: BrowserContext) -> dict[str, str]:
    return {c["name"]: c["value"] for c in context.cookies()}


def test_live_table_logs_actions_and_xss(server: KbatchServer, context: BrowserContext) -> None:
    page, problems = logged_in(context, server)
    outside = outside_requests(page, server)
    expect(page.locator("#live")).to_have_text("live")

    # A job submitted with the CLI appears and changes state without a reload.
    job_id = submit(
        server, "-J", XSS, "--wrap", "echo first-line; sleep 2; echo second-line >&2; sleep 1"
    )
    row = page.locator(f'#job-rows tr[data-id="{job_id}"]')
    expect(row).to_be_visible()
    name_cell = row.locator("td.name")
    expect(name_cell).to_have_text(XSS)  # shown as text
    assert page.locator("#jobs img").count() == 0
    expect(row.locator(".state")).to_have_text("RUNNING", timeout=10_000)
    expect(row).to_have_count(0, timeout=15_000)  # finished: off the active tab
    page.click("#tab-finished")
    expect(row.locator(".state")).to_have_text("COMPLETED")
    expect(row.locator("td").nth(9)).to_have_text("0")

    # Output followed live on the job's page.
    slow = submit(
        server,
        "-J",
        "counter",
        "--wrap",
        "for i in 1 2 3; do echo tick-$i; sleep 1; done; sleep 60",
    )
    page.click("#tab-active")
    page.fill("#filter-text", "counter")
    expect(page.locator("#job-rows tr")).to_have_count(1)
    screenshot(page, "list")
    page.locator(f'#job-rows tr[data-id="{slow}"] a').click()
    expect(page).to_have_url(f"{server.url}/jobs/{slow}")
    expect(page.locator("#log-output")).to_contain_text("tick-1", timeout=10_000)
    expect(page.locator("#log-output")).to_contain_text("tick-3", timeout=10_000)
    expect(page.locator("#job-script")).to_contain_text("echo tick-$i")
    href = page.locator("#dl-output").get_attribute("href")
    assert href == f"api/v1/jobs/{slow}/logs?stream=output"
    screenshot(page, "job")

    # Cancel, confirmed.
    page.click("#act-cancel")
    expect(page.locator("#job-fields .state")).to_have_text("CANCELLED", timeout=10_000)
    assert server.client().get(slow).cancelled_by is not None

    # Resubmit with the same spec: a new job, whose page we land on.
    page.click("#act-resubmit")
    expect(page).not_to_have_url(f"{server.url}/jobs/{slow}", timeout=10_000)
    new_id = page.url.rsplit("/", 1)[1]
    assert new_id != slow
    resubmitted = server.client().get(new_id)
    assert resubmitted.name == "counter"
    expect(page.locator("#log-output")).to_contain_text("tick-1", timeout=10_000)

    # Edit and resubmit: the form, prefilled, with a new name.
    page.click("#act-edit")
    expect(page.locator("#f-script")).to_have_value(re.compile("echo tick"))
    page.fill("#f-name", "edited")
    page.fill("#f-script", "#!/bin/sh\necho edited-run\n")
    page.click("#f-submit")
    expect(page.locator("#log-output")).to_contain_text("edited-run", timeout=10_000)
    edited = server.client().get(page.url.rsplit("/", 1)[1])
    assert edited.name == "edited"
    server.client().cancel(new_id)
    assert outside == [] and problems == []


def test_submit_form_hold_release_and_keyboard(
    server: KbatchServer, context: BrowserContext
) -> None:
    page, problems = logged_in(context, server)
    page.click("#new-job")
    page.fill("#f-script", "#!/bin/sh\nsleep 60\n")
    workdir = server.state_dir.parent / "work"
    workdir.mkdir(exist_ok=True)
    page.fill("#f-workdir", str(workdir))
    page.fill("#f-name", "from-the-form")
    page.fill("#f-memory", "64M")
    page.fill("#f-time", "5")
    screenshot(page, "submit")
    page.click("#f-submit")
    row = page.locator("#job-rows tr", has_text="from-the-form")
    expect(row).to_be_visible()
    job_id = row.get_attribute("data-id")
    assert job_id is not None
    job = server.client().get(job_id)
    assert job.memory == 64 * 1024**2 and job.time_limit == 300

    # Keyboard: Tab to a row, Enter opens it.
    row.focus()
    page.keyboard.press("Enter")
    expect(page).to_have_url(f"{server.url}/jobs/{job_id}")
    expect(page.locator("#job-fields .state")).to_have_text(re.compile("PENDING|RUNNING"))
    page.click("#act-cancel")
    expect(page.locator("#job-fields .state")).to_have_text("CANCELLED", timeout=10_000)

    held = submit(server, "--hold", "--wrap", "echo held")
    page.goto(f"{server.url}/jobs/{held}")
    expect(page.locator("#act-release")).to_be_enabled()
    page.click("#act-release")
    expect(page.locator("#job-fields .state")).to_have_text("COMPLETED", timeout=10_000)
    assert problems == []


def _fake_jobs(count: int) -> bytes:
    now = datetime.now(UTC).isoformat()
    jobs = [
        {
            "id": str(i),
            "user": "someone",
            "name": f"job-{i}",
            "state": "RUNNING" if i % 3 else "PENDING",
            "reason": None if i % 3 else "Resources",
            "exit_code": None,
            "submitted": now,
            "started": now if i % 3 else None,
            "finished": None,
            "cpus": 1,
            "memory": 1024**3,
            "gpus": 0,
            "time_limit": 3600,
        }
        for i in range(1, count + 1)
    ]
    return json.dumps({"jobs": jobs}).encode()


def test_ten_thousand_jobs_render_within_a_second(
    server: KbatchServer, context: BrowserContext
) -> None:
    page, _ = logged_in(context, server)
    body = _fake_jobs(10_000)

    def fulfill(route: Route) -> None:
        route.fulfill(status=200, content_type="application/json", body=body)

    page.route(re.compile(r".*/api/v1/jobs\?.*"), fulfill)
    started = time.monotonic()
    page.reload()
    expect(page.locator("#job-rows tr")).to_have_count(500)  # one page of rows; "more" for the rest
    # The page marks its first rows; the time is since the navigation started.
    elapsed = page.evaluate("performance.getEntriesByName('kbatch-first-rows')[0].startTime")
    timings = page.evaluate(
        "performance.getEntriesByType('resource').map(e => [e.name.split('/').pop(), "
        "Math.round(e.startTime), Math.round(e.responseEnd)])"
    )
    print(f"first view of 10,000 jobs: {elapsed:.0f} ms; requests: {timings}")
    assert elapsed < 1000, f"first view took {elapsed:.0f} ms"
    assert time.monotonic() - started < 5
    expect(page.locator("#count-active")).to_have_text("(10000)")
    expect(page.locator("#more")).to_be_visible()

    # A phone: the page still fits its width (the table scrolls inside its box).
    page.set_viewport_size({"width": 390, "height": 844})
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0
    screenshot(page, "phone")


def test_an_array_is_one_row_with_its_counts_and_its_tasks_can_be_cancelled(
    server: KbatchServer, context: BrowserContext
) -> None:
    page, problems = logged_in(context, server)
    array = submit(server, "-J", "sweep", "--array=0-5", "--wrap", "sleep 60")
    summary = page.locator(f'#job-rows tr.array[data-id="{array}"]')
    expect(summary).to_be_visible()
    # two CPUs: two tasks run, four wait, on one row
    expect(summary.locator(".counts")).to_have_text("4 PENDING, 2 RUNNING", timeout=10_000)
    expect(summary.locator(".state")).to_contain_text("RUNNING")
    expect(page.locator("#job-rows tr.task")).to_have_count(0)
    summary.locator("button.expand").click()
    tasks = page.locator("#job-rows tr.task")
    expect(tasks).to_have_count(3)  # 0, 1 and the group of four waiting
    expect(tasks.nth(0)).to_have_attribute("data-id", f"{array}_0")
    expect(tasks.nth(2)).to_have_attribute("data-id", f"{array}_[2-5]")
    screenshot(page, "array-list")

    # The array's page: counts, task links, and cancelling a range of tasks.
    summary.locator("a").click()
    expect(page).to_have_url(f"{server.url}/jobs/{array}")
    expect(page.locator("#tasks-section")).to_be_visible()
    expect(page.locator("#output-section")).to_be_hidden()
    expect(page.locator("#job-fields")).to_contain_text("4 PENDING, 2 RUNNING")
    page.fill("#cancel-tasks-list", "1-3")
    page.click("#cancel-tasks button")
    expect(page.locator("#job-fields")).to_contain_text("3 CANCELLED", timeout=10_000)
    client = server.client()
    server.wait_state(f"{array}_4", JobState.RUNNING)  # task 1's CPU went to the next index
    assert [client.get(f"{array}_{i}").state.value for i in range(6)] == [
        "RUNNING",
        "CANCELLED",
        "CANCELLED",
        "CANCELLED",
        "RUNNING",
        "PENDING",
    ]
    page.locator("#task-links a", has_text=f"{array}_0").click()
    expect(page).to_have_url(f"{server.url}/jobs/{array}_0")
    expect(page.locator("#output-section")).to_be_visible()
    page.goto(f"{server.url}/jobs/{array}")
    page.click("#act-cancel")  # the whole array
    expect(page.locator("#job-fields .state")).to_have_text("CANCELLED", timeout=15_000)
    assert client.get(array).array_counts == {"CANCELLED": 6}
    assert problems == []
