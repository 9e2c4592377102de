"""Hub tokens on the HTTP API, through the hub's proxy: 401, 403 and what is accepted."""

from __future__ import annotations

from collections.abc import Callable

from tests.support.jupyterhub import SERVICE, USERS_GROUP, Hub, assert_no_secrets


def _error(response: object) -> dict[str, str]:
    import httpx

    assert isinstance(response, httpx.Response)
    error: dict[str, str] = response.json()["error"]
    return error


def test_missing_and_unknown_tokens_are_401(hub: Hub) -> None:
    missing = hub.service("GET", "/whoami")
    assert missing.status_code == 401
    assert _error(missing)["code"] == "no_token"
    assert "JUPYTERHUB_API_TOKEN" in _error(missing)["message"]

    for scheme in ("token", "Bearer"):
        bad = hub.service("GET", "/jobs", token="not-a-hub-token-0123456789", scheme=scheme)
        assert bad.status_code == 401
        assert _error(bad) == {
            "code": "invalid_token",
            "message": "the hub did not accept the token (unknown, expired or revoked)",
            "field": None,
        }
        assert "not-a-hub-token" not in bad.text

    malformed = hub.service("GET", "/whoami", token="abc", scheme="Basic")
    assert malformed.status_code == 401 and _error(malformed)["code"] == "no_token"


def test_a_revoked_token_is_401(hub: Hub, username: Callable[[str], str]) -> None:
    user = hub.create_user(username("revoked"), groups=(USERS_GROUP,))
    token = hub.token(user)
    (entry,) = [t for t in hub.tokens(user) if t["note"] == "test"]
    hub.api_ok("DELETE", f"/users/{user}/tokens/{entry['id']}")
    response = hub.service("GET", "/whoami", token=token)
    assert response.status_code == 401
    assert token not in response.text


def test_a_valid_token_without_the_access_scope_is_403(
    hub: Hub, username: Callable[[str], str]
) -> None:
    # A user the admin granted nothing: the hub knows the token, kbatch refuses it.
    outsider = hub.create_user(username("outsider"))
    token = hub.token(outsider)
    response = hub.service("GET", "/jobs", token=token)
    assert response.status_code == 403
    error = _error(response)
    assert error["code"] == "missing_scope"
    assert f"access:services!service={SERVICE}" in error["message"]
    assert outsider in error["message"] and token not in response.text

    # A member of the granted group, with a token narrowed to other scopes.
    member = hub.create_user(username("narrow"), groups=(USERS_GROUP,))
    narrow = hub.token(member, scopes=[f"read:users:name!user={member}"])
    assert hub.service("GET", "/whoami", token=narrow).status_code == 403
    # ...and the same user's token with the scope is accepted.
    assert hub.service("GET", "/whoami", token=hub.token(member)).json()["name"] == member

    # A service's token (here the test's own admin service) is not a user's.
    service = hub.service("GET", "/whoami", token=hub.admin_token)
    assert service.status_code == 403 and hub.admin_token not in service.text


def test_the_access_scope_is_enough(hub: Hub, username: Callable[[str], str]) -> None:
    user = hub.create_user(username("scoped"), groups=(USERS_GROUP,))
    token = hub.token(user, scopes=[f"access:services!service={SERVICE}"])
    for scheme in ("token", "Bearer", "bearer"):
        response = hub.service("GET", "/whoami", token=token, scheme=scheme)
        assert response.status_code == 200, response.text
        assert response.json() == {"name": user, "admin": False, "groups": [USERS_GROUP]}
    jobs = hub.service("GET", "/jobs", token=token)
    assert jobs.status_code == 200 and jobs.json() == {"jobs": []}


def test_health_and_openapi_need_no_token(hub: Hub) -> None:
    assert hub.service("GET", "/health").json()["backend"] == "local"
    assert hub.service("GET", "/openapi.json").status_code == 200


def test_no_token_reaches_the_log(hub: Hub, username: Callable[[str], str]) -> None:
    user = hub.create_user(username("quiet"), groups=(USERS_GROUP,))
    token = hub.token(user)
    hub.service("GET", "/jobs", token=token)
    hub.service("GET", "/jobs", token=token + "x")
    assert_no_secrets(hub)
