"""``kbatch server`` that also makes per-job hub tokens on the local backend: tests only.

The server refuses ``[jupyterhub] job_token_scopes`` with the local backend
(:func:`kbatch.server.config.check_shared_account`): jobs there share the
server's Unix account, so any job could read another job's token.  The
per-job token machinery (:mod:`kbatch.server.job_tokens`, a backend hook) is
the same on every backend, though, and the tests' Kubernetes control plane
(kwok) runs no containers, so the tests of that machinery against the real
hub (``tests/jupyterhub/test_job_tokens.py``, ``test_hub_outage.py``) run
their jobs on the local backend through this entry point, which lifts that
one refusal and nothing else: ``jobs_share_server_account`` is still needed.

Run as ``python -m tests.support.job_token_server server ARGS`` (the
arguments of ``kbatch server``), with the repository on ``PYTHONPATH``.
"""

from __future__ import annotations

import dataclasses
import sys

import kbatch.server.config
from kbatch.cli.main import main
from kbatch.server.config import ServerConfig

_check = kbatch.server.config.check_shared_account


def _allow_job_tokens(config: ServerConfig) -> None:
    hub = dataclasses.replace(config.jupyterhub, job_token_scopes=())
    _check(dataclasses.replace(config, jupyterhub=hub))


if __name__ == "__main__":
    kbatch.server.config.check_shared_account = _allow_job_tokens
    sys.exit(main())
