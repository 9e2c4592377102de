"""JupyterHub settings: the server's [jupyterhub] section and the client's discovery."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kbatch.client.config import (
    _from_jupyterhub,
    discover_config,
    service_url_from_model,
)
from kbatch.errors import ConfigError
from kbatch.server.config import JupyterHubConfig, load_config
from kbatch.server.main import build_backend

SERVICE_ENV = {
    "JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api",
    "JUPYTERHUB_API_TOKEN": "service-secret",
    "JUPYTERHUB_SERVICE_NAME": "batch",
    "JUPYTERHUB_SERVICE_URL": "http://127.0.0.1:10101",
    "JUPYTERHUB_SERVICE_PREFIX": "/services/batch/",
}


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kbatch.toml"
    path.write_text(text)
    return path


def test_a_hub_service_needs_no_settings(tmp_path: Path) -> None:
    # On Kubernetes; the local backend also needs [local] jobs_share_server_account (below).
    config = load_config(
        None,
        environ={**SERVICE_ENV, "HOME": str(tmp_path)},
        auth="jupyterhub",
        backend="kubernetes",
    )
    hub = config.jupyterhub
    assert (hub.api_url, hub.api_token, hub.service_name) == (
        "http://127.0.0.1:8081/hub/api",
        "service-secret",
        "batch",
    )
    assert (config.host, config.port, config.prefix) == ("127.0.0.1", 10101, "/services/batch")
    assert "service-secret" not in repr(config)


def test_the_file_and_flags_win(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
auth = "jupyterhub"
backend = "kubernetes"
prefix = "/custom"
[jupyterhub]
api_url = "https://hub.example.org/hub/api"
service_name = "kb"
admin_groups = ["ops"]
cache_seconds = 5
job_token_scopes = ["access:services!service=dask-gateway"]
job_token_expiry = "2:00:00"
job_token_margin = 60
""",
    )
    config = load_config(path, environ={**SERVICE_ENV, "HOME": str(tmp_path)}, port=9000)
    assert config.jupyterhub == JupyterHubConfig(
        api_url="https://hub.example.org/hub/api",
        api_token="service-secret",
        service_name="kb",
        admin_groups=("ops",),
        cache_seconds=5,
        job_token_scopes=("access:services!service=dask-gateway",),
        job_token_expiry=7200,
        job_token_margin=60,
    )
    assert (config.prefix, config.port) == ("/custom", 9000)


def test_without_the_hubs_environment_the_prefix_is_the_services(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "JUPYTERHUB_API_URL": "http://hub/hub/api"}
    config = load_config(
        None, environ={**env, "JUPYTERHUB_API_TOKEN": "t"}, auth="jupyterhub", backend="kubernetes"
    )
    assert (config.prefix, config.host, config.port) == ("/services/kbatch", "127.0.0.1", 0)
    named = load_config(
        None,
        environ={
            **env,
            "JUPYTERHUB_API_TOKEN": "t",
            "JUPYTERHUB_SERVICE_URL": "http://kbatch:8000",
        },
        auth="jupyterhub",
        backend="kubernetes",
    )
    assert (named.host, named.port) == ("0.0.0.0", 8000)  # a DNS name: every address


@pytest.mark.parametrize(
    ("env", "section", "message"),
    [
        ({}, "", "needs the hub's API URL"),
        ({"JUPYTERHUB_API_URL": "http://hub/hub/api"}, "", "needs the service's API token"),
        ({"JUPYTERHUB_API_TOKEN": "t"}, 'api_url = "hub:8081"', "must start with http"),
        (SERVICE_ENV, "admin_groups = 'ops'", "admin_groups must be a list of strings"),
        (SERVICE_ENV, "cache_seconds = 'soon'", "cache_seconds must be a number"),
        (SERVICE_ENV, "job_token_expiry = 'forever'", "job_token_expiry"),
        (SERVICE_ENV, "colour = 'blue'", "unknown key(s) colour"),
    ],
)
def test_bad_hub_settings(tmp_path: Path, env: dict[str, str], section: str, message: str) -> None:
    path = _toml(tmp_path, f'auth = "jupyterhub"\n[jupyterhub]\n{section}\n')
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(path, environ={**env, "HOME": str(tmp_path)})


# -- hub users on the local backend share the server's Unix account ---------------------


def test_hub_users_on_the_local_backend_need_the_admins_consent(tmp_path: Path) -> None:
    env = {**SERVICE_ENV, "HOME": str(tmp_path)}
    with pytest.raises(ConfigError) as refused:
        load_config(_toml(tmp_path, 'auth = "jupyterhub"\n'), environ=env)
    message = str(refused.value)
    assert "jobs_share_server_account = true" in message and "[local]" in message
    assert "under this server's own Unix account" in message
    assert "other users' jobs and files" in message

    consent = _toml(tmp_path, 'auth = "jupyterhub"\n[local]\njobs_share_server_account = true\n')
    config = load_config(consent, environ=env)
    assert config.backend_section("local")["jobs_share_server_account"] is True
    assert build_backend(config).config.jobs_share_server_account is True  # type: ignore[attr-defined]
    # A single user's own server (token auth) needs no consent; nor does Kubernetes.
    assert load_config(None, environ=env).auth == "token"
    kube = load_config(
        _toml(tmp_path, 'auth = "jupyterhub"\nbackend = "kubernetes"\n'), environ=env
    )
    assert kube.backend == "kubernetes"


@pytest.mark.parametrize("auth", ["jupyterhub", "token"])
def test_job_tokens_need_the_kubernetes_backend(tmp_path: Path, auth: str) -> None:
    path = _toml(
        tmp_path,
        f'auth = "{auth}"\n[local]\njobs_share_server_account = true\n'
        '[jupyterhub]\njob_token_scopes = ["access:services!service=kbatch"]\n',
    )
    with pytest.raises(ConfigError) as refused:
        load_config(path, environ={**SERVICE_ENV, "HOME": str(tmp_path)})
    message = str(refused.value)
    assert message.startswith("config [jupyterhub]: job_token_scopes needs the Kubernetes backend")
    assert "any job could read another job's hub token" in message


def test_jobs_share_server_account_is_a_boolean(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[local]\njobs_share_server_account = "yes"\n')
    with pytest.raises(ConfigError, match="jobs_share_server_account must be true or false"):
        load_config(path, environ={"HOME": str(tmp_path)})


def test_token_auth_ignores_the_hubs_environment(tmp_path: Path) -> None:
    config = load_config(None, environ={"HOME": str(tmp_path), "JUPYTERHUB_SERVICE_URL": "x"})
    assert (config.auth, config.prefix, config.port) == ("token", "", 0)


# -- the client ------------------------------------------------------------------------

NOTEBOOK_ENV = {
    "JUPYTERHUB_API_URL": "http://hub:8081/hub/api",
    "JUPYTERHUB_API_TOKEN": "notebook-secret",
    "JUPYTERHUB_USER": "alice",
    "JUPYTERHUB_PUBLIC_HUB_URL": "",
}


def _never(api_url: str, token: str, service: str) -> str:
    raise AssertionError("the hub must not be asked")


def test_a_notebook_uses_the_hubs_public_url() -> None:
    env = {**NOTEBOOK_ENV, "JUPYTERHUB_PUBLIC_HUB_URL": "https://hub.example.org/prefix/hub/"}
    config = _from_jupyterhub(env, _never)
    assert config is not None
    assert config.url == "https://hub.example.org/prefix/services/kbatch"
    assert config.token == "notebook-secret"
    config = _from_jupyterhub({**env, "KBATCH_SERVICE_NAME": "gpu batch"}, _never)
    assert (
        config is not None and config.url == "https://hub.example.org/prefix/services/gpu%20batch"
    )


def test_without_a_public_url_the_hub_is_asked() -> None:
    asked: list[tuple[str, str, str]] = []

    def locate(api_url: str, token: str, service: str) -> str:
        asked.append((api_url, token, service))
        return "http://10.0.0.5:8000/services/kbatch"

    config = _from_jupyterhub(NOTEBOOK_ENV, locate)
    assert config is not None and config.url == "http://10.0.0.5:8000/services/kbatch"
    assert asked == [("http://hub:8081/hub/api", "notebook-secret", "kbatch")]
    assert _from_jupyterhub({"JUPYTERHUB_API_URL": "http://hub/hub/api"}, locate) is None


def test_the_hubs_answer_about_the_service() -> None:
    model = {"name": "kbatch", "url": "http://127.0.0.1:10101/", "prefix": "/services/kbatch/"}
    ok = service_url_from_model(200, json.dumps(model).encode(), service="kbatch", api_url="H")
    assert ok == "http://127.0.0.1:10101/services/kbatch"
    cases = [
        (403, b"{}", "lacks read:services!service=kbatch"),
        (404, b"{}", "no service named 'kbatch'"),
        (500, b"{}", "HTTP 500"),
        (200, b"nonsense", "unreadable"),
        (200, b'{"name": "kbatch", "kind": "service", "admin": false}', "knows no URL"),
    ]
    for status, body, message in cases:
        with pytest.raises(ConfigError, match=message):
            service_url_from_model(status, body, service="kbatch", api_url="H")


def test_overrides_come_first_and_keep_the_notebooks_token(tmp_path: Path) -> None:
    env = {**NOTEBOOK_ENV, "HOME": str(tmp_path), "KBATCH_URL": "http://elsewhere/"}
    config = discover_config(env)
    assert (config.url, config.token, config.source) == (
        "http://elsewhere",
        "notebook-secret",
        "environment",
    )
    assert discover_config({**env, "KBATCH_TOKEN": "mine"}).token == "mine"
    config_file = tmp_path / ".config" / "kbatch" / "config.json"
    config_file.parent.mkdir(parents=True)
    config_file.write_text('{"url": "http://configured"}')
    del env["KBATCH_URL"]
    config = discover_config(env)
    assert (config.url, config.token) == ("http://configured", "notebook-secret")


def test_hub_users_run_as_their_accounts_with_a_root_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**SERVICE_ENV, "HOME": str(tmp_path)}
    path = _toml(tmp_path, 'auth = "jupyterhub"\n[local]\nrun_as_user = true\n')
    monkeypatch.setattr("os.geteuid", lambda: 0)
    config = load_config(path, environ=env)
    backend = build_backend(config)
    assert backend.config.runs_as_users  # type: ignore[attr-defined]
    assert not backend.config.jobs_share_server_account  # type: ignore[attr-defined]
    # Not root: run_as_user would change nothing, so the shared account must be accepted.
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(ConfigError) as refused:
        load_config(path, environ=env)
    assert "run_as_user = true needs a server running as root" in str(refused.value)
    shared = _toml(
        tmp_path,
        'auth = "jupyterhub"\n[local]\nrun_as_user = true\njobs_share_server_account = true\n',
    )
    assert not build_backend(load_config(shared, environ=env)).config.runs_as_users  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"run_as_user": "yes"}, "run_as_user"),
        ({"min_uid": "x"}, "min_uid"),
        ({"user_template": 3}, "user_template"),
    ],
)
def test_run_as_user_settings_are_typed(
    tmp_path: Path, section: dict[str, object], key: str
) -> None:
    from kbatch.backends.local.backend import LocalBackend

    with pytest.raises(ConfigError, match=key):
        LocalBackend.from_config(section, state_dir=tmp_path)
