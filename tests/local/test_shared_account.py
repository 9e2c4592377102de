"""The real server refuses hub users on the local backend without the admin's consent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HUB_ENV = {
    "JUPYTERHUB_API_URL": "http://127.0.0.1:9/hub/api",  # never asked: it must not start
    "JUPYTERHUB_API_TOKEN": "service-secret-0123456789",
    "JUPYTERHUB_SERVICE_NAME": "kbatch",
    "PATH": "/usr/bin:/bin",
}


def _serve(tmp_path: Path, toml: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "kbatch.toml"
    config.write_text(toml)
    return subprocess.run(
        [sys.executable, "-m", "kbatch.cli.main", "server", "--port=0", f"--config={config}"],
        env={**HUB_ENV, "HOME": str(tmp_path), "KBATCH_STATE_DIR": str(tmp_path / "state")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('auth = "jupyterhub"\n', "'jobs_share_server_account = true' in the [local] section"),
        (
            'auth = "jupyterhub"\n[local]\njobs_share_server_account = true\n'
            '[jupyterhub]\njob_token_scopes = ["access:services!service=kbatch"]\n',
            "job_token_scopes needs the Kubernetes backend",
        ),
    ],
)
def test_the_server_refuses_to_start(tmp_path: Path, toml: str, message: str) -> None:
    result = _serve(tmp_path, toml)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert HUB_ENV["JUPYTERHUB_API_TOKEN"] not in result.stdout + result.stderr
    assert not (tmp_path / "state" / "server.json").exists()  # nothing listened
