"""The server loads a backend by name or import path and hands it its own section raw."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbatch.errors import ConfigError
from kbatch.server.config import load_config
from kbatch.server.main import build_backend
from tests.support.memory_backend import MemoryBackend

MEMORY = "tests.support.memory_backend:MemoryBackend"


def _load(tmp_path: Path, text: str, **overrides: object):
    path = tmp_path / "kbatch.toml"
    path.write_text(text)
    return load_config(path, environ={"HOME": str(tmp_path)}, **overrides)


def test_sections_are_kept_raw_by_name(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        '[local]\ncpus = 8\nmemory = "32G"\nwhatever = 1\n[kubernetes]\nnamespace = "x"\n',
        cpus=2,
        memory=None,
    )
    # The server decodes none of them: a backend's keys are its own business.
    assert config.extra == {
        "local": {"cpus": 8, "memory": "32G", "whatever": 1},
        "kubernetes": {"namespace": "x"},
    }
    assert config.backend_overrides == {"cpus": 2}
    assert config.backend_section("local") == {"cpus": 2, "memory": "32G", "whatever": 1}
    assert config.backend_section("none") == {"cpus": 2}


def test_a_backend_by_import_path_gets_its_section(tmp_path: Path) -> None:
    config = _load(tmp_path, f'backend = "{MEMORY}"\n[memory]\nautostart = true\n')
    backend = build_backend(config)
    assert isinstance(backend, MemoryBackend)
    assert backend.config.autostart is True


def test_the_backend_refuses_keys_it_does_not_know(tmp_path: Path) -> None:
    config = _load(tmp_path, f'backend = "{MEMORY}"\n[memory]\ncolour = "blue"\n')
    with pytest.raises(ConfigError, match=r"config \[memory\]"):
        build_backend(config)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nosuch", "is not known"),
        ("nosuch.module:Backend", "cannot load backend"),
        ("kbatch.models:Job", "is not a kbatch backend class"),
    ],
)
def test_unknown_backends_are_config_errors(tmp_path: Path, name: str, message: str) -> None:
    config = _load(tmp_path, "", backend=name)
    with pytest.raises(ConfigError, match=message):
        build_backend(config)


def test_unknown_top_level_keys_are_still_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        _load(tmp_path, "colour = 1\n")


def test_the_contact_for_users_without_access(tmp_path: Path) -> None:
    from kbatch.server.dashboard import hub_oauth_settings

    config = _load(tmp_path, '[jupyterhub]\ncontact = "Research <b>Computing</b>, rc@x.org"\n')
    assert config.jupyterhub.contact == "Research <b>Computing</b>, rc@x.org"
    assert _load(tmp_path, "").jupyterhub.contact == ""
    for bad in ("contact = 3", 'contact = "two\\nlines"', f'contact = "{"x" * 501}"'):
        with pytest.raises(ConfigError, match="contact must be"):
            _load(tmp_path, f"[jupyterhub]\n{bad}\n")
    settings = hub_oauth_settings({}, service_name="kbatch", prefix="", admin_groups=())
    assert settings.who_to_ask == "the administrators of this JupyterHub"
    named = hub_oauth_settings(
        {}, service_name="kbatch", prefix="", admin_groups=(), contact="rc@x.org"
    )
    assert named.who_to_ask == "rc@x.org"
