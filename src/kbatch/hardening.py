"""Keeping what the server holds out of reach of the jobs it starts.

Jobs of the local backend run under the server's own Unix account until they
run as their users.  A process of the same uid can read another's
``/proc/<pid>/environ`` (where the hub's token of a service is), its memory,
and attach a debugger to it, unless that process is not *dumpable*:
``prctl(PR_SET_DUMPABLE, 0)`` makes its ``/proc/<pid>`` files root's and
refuses ``ptrace`` to anyone without ``CAP_SYS_PTRACE``.  An ``execve``
makes a process dumpable again, so every long-lived process of ours (the
server, each job's supervisor) calls :func:`make_undumpable` itself at start.

The supervisor is spawned with :func:`supervisor_environment`, never the
server's own environment; the job's environment is built from its spec alone.

Neither protects against root, nor against a job of the same uid that
signals the server or reads files the server's account can read: that needs
jobs running as their own users.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

__all__ = ["SECRET_VARIABLES", "make_undumpable", "scrub_environment", "supervisor_environment"]

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
# What the supervisor may inherit: it finds programs and decodes file names; nothing else.
SUPERVISOR_VARIABLES = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "PYTHONPATH")
# Credentials a hub hands its services; dropped from os.environ once the config has read them.
SECRET_VARIABLES = ("JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN")


def make_undumpable() -> bool:
    """Make this process non-dumpable (Linux); True if it now is.

    Best effort: on other systems, or if ``prctl`` fails, it returns False (the
    caller says so if it logs).  It imports only ``ctypes``: the supervisor calls it
    first thing at every job start.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        # The interpreter's own symbols include libc's; find_library would run ldconfig.
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def supervisor_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment a job's supervisor starts with: a few harmless variables."""
    env = os.environ if environ is None else environ
    return {key: env[key] for key in SUPERVISOR_VARIABLES if key in env}


def scrub_environment() -> None:
    """Drop credentials from this process's environment, so no child can inherit them."""
    for key in SECRET_VARIABLES:
        os.environ.pop(key, None)
