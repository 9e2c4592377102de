"""The web dashboard behind a real JupyterHub, in a real browser (Debian's Chromium).

Through the hub's proxy, as users reach it: each user logs in with the hub's
OAuth for services (the dummy authenticator's login form), sees the jobs they
submit with the CLI in their notebook terminal appear and change state without
a reload, follows a job's output, cancels and resubmits it.  Another user sees
none of them and is refused on their direct URLs; a hub admin sees everyone's
with the "All users" switch; a user without the access scope is turned away, told
who to ask.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.support.browser import screenshot, watch_page
from tests.support.jupyterhub import CONTACT, USERS_GROUP, Hub

XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture
def contexts(browser: Browser) -> Iterator[Callable[[], BrowserContext]]:
    made: list[BrowserContext] = []

    def make() -> BrowserContext:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        made.append(context)
        return context

    yield make
    for context in made:
        context.close()


def hub_login(hub: Hub, context: BrowserContext, user: str) -> tuple[Page, list[str]]:
    """Open the dashboard: the hub asks who we are, then sends us back logged in."""
    page = context.new_page()
    problems = watch_page(page)
    page.goto(hub.service_url + "/")
    page.wait_for_url(re.compile(r".*/hub/login.*"))
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", "any password: the dummy authenticator takes it")
    page.click("input[type=submit], button[type=submit]")
    page.wait_for_url(hub.service_url + "/")
    expect(page.locator("#who")).to_contain_text(user)
    expect(page.locator("#live")).to_have_text("live")
    cookie = next(c for c in context.cookies() if c["name"] == "kbatch-session")
    assert cookie["httpOnly"] and cookie["path"] == "/services/kbatch/"
    return page, problems


def _submit(hub: Hub, env: dict[str, str], *args: str) -> str:
    result = hub.notebook_cli(env, "submit", "--parsable", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_dashboard_through_the_hub(
    hub: Hub, contexts: Callable[[], BrowserContext], username: Callable[[str], str]
) -> None:
    alice = hub.create_user(username("alice"), groups=(USERS_GROUP,))
    bob = hub.create_user(username("bob"), groups=(USERS_GROUP,))
    boss = hub.create_user(username("boss"), admin=True)
    alice_env = hub.spawn(alice)

    page, problems = hub_login(hub, contexts(), alice)
    assert page.locator("#job-rows tr").count() == 0

    # A job submitted in alice's terminal appears, runs and ends without a reload.
    quick = _submit(hub, alice_env, "-J", XSS, "--wrap", "echo quick; sleep 2")
    row = page.locator(f'#job-rows tr[data-id="{quick}"]')
    expect(row.locator("td.name")).to_have_text(XSS)
    assert page.locator("#jobs img").count() == 0
    expect(row.locator(".state")).to_have_text("RUNNING", timeout=15_000)
    expect(row).to_have_count(0, timeout=20_000)  # ended: moved to the finished tab
    page.click("#tab-finished")
    expect(row.locator(".state")).to_have_text("COMPLETED")

    # Its output followed live on its page; cancel and resubmit, each confirmed.
    slow = _submit(
        hub,
        alice_env,
        "-J",
        "ticker",
        "--wrap",
        "for i in 1 2 3; do echo tick-$i; sleep 1; done; sleep 120",
    )
    page.click("#tab-active")
    page.locator(f'#job-rows tr[data-id="{slow}"] a').click()
    expect(page).to_have_url(f"{hub.service_url}/jobs/{slow}")
    expect(page.locator("#log-output")).to_contain_text("tick-3", timeout=15_000)
    page.click("#act-cancel")
    expect(page.locator("#job-fields .state")).to_have_text("CANCELLED", timeout=15_000)
    page.click("#act-resubmit")
    expect(page).not_to_have_url(f"{hub.service_url}/jobs/{slow}", timeout=15_000)
    again = page.url.rsplit("/", 1)[1]
    expect(page.locator("#log-output")).to_contain_text("tick-1", timeout=15_000)
    expect(page.locator("#job-fields dd").first).to_have_text(alice)
    page.click("#act-cancel")
    expect(page.locator("#job-fields .state")).to_have_text("CANCELLED", timeout=15_000)
    assert problems == []

    # Bob sees none of alice's jobs, and her job's URLs answer as if it did not exist.
    bob_page, bob_problems = hub_login(hub, contexts(), bob)
    expect(bob_page.locator("#empty")).to_be_visible()
    bob_page.click("#tab-finished")
    expect(bob_page.locator("#job-rows tr")).to_have_count(0)
    assert bob_page.locator("#all-users-label").is_hidden()
    for job in (quick, slow, again):
        bob_page.goto(f"{hub.service_url}/jobs/{job}")
        expect(bob_page.locator("#job-title")).to_have_text("No such job")
        assert "tick" not in bob_page.locator("body").inner_text()
        for path in (f"api/v1/jobs/{job}", f"dashboard/jobs/{job}/spec", f"api/v1/jobs/{job}/logs"):
            status = bob_page.evaluate(f"fetch({path!r}).then(r => r.status)")
            assert status == 404, path
    everyone = bob_page.evaluate("fetch('dashboard/events?all_users=true').then(r => r.status)")
    assert everyone == 403
    assert bob_problems == []

    # A hub admin sees both users' jobs, with their names, when asking for all users.
    boss_page, _ = hub_login(hub, contexts(), boss)
    expect(boss_page.locator("#who")).to_have_text(f"{boss} (admin)")
    boss_page.check("#all-users")
    boss_page.click("#tab-finished")
    for job in (quick, slow, again):
        expect(boss_page.locator(f'#job-rows tr[data-id="{job}"] td.col-user')).to_have_text(alice)
    boss_page.fill("#filter-user", bob)
    expect(boss_page.locator("#job-rows tr")).to_have_count(0)
    boss_page.fill("#filter-user", alice)
    expect(boss_page.locator("#job-rows tr")).to_have_count(3)
    screenshot(boss_page, "admin")

    # No login code, OAuth state or token reached the service's log.
    log = hub.logs()
    assert "code=" not in log and "state=" not in log and "access_token" not in log


def test_a_user_without_access_is_turned_away(
    hub: Hub, contexts: Callable[[], BrowserContext], username: Callable[[str], str]
) -> None:
    eve = hub.create_user(username("eve"))  # in no group: no access:services!service=kbatch
    context = contexts()
    page = context.new_page()
    page.goto(hub.service_url + "/")
    page.wait_for_url(re.compile(r".*/hub/login.*"))
    page.fill("input[name=username]", eve)
    page.fill("input[name=password]", "x")
    with page.expect_response(re.compile(r".*/hub/api/oauth2/authorize.*")) as answer:
        page.click("input[type=submit], button[type=submit]")
    assert answer.value.status == 403  # the hub itself refuses to log her in to kbatch
    # ... on its own page, which says who to ask (kbatch's hub template), as text
    contact = page.locator("#kbatch-contact")
    expect(contact).to_contain_text(f"To use kbatch, ask {CONTACT} for access.")
    assert contact.locator("b").count() == 0
    assert "&lt;b&gt;Computing&lt;/b&gt; &amp; Data" in page.content()
    assert not [c for c in context.cookies() if c["name"] == "kbatch-session"]
    status = page.evaluate("fetch('/services/kbatch/dashboard/session').then(r => r.status)")
    assert status == 401
