"""Which Unix account runs a hub user's job, and what that account could do itself.

With ``[local] run_as_user = true`` and a server running as root, a job of the
user ``alice`` runs as the account ``user_template.format(username="alice")``
(``jupyter-alice`` by default, as The Littlest JupyterHub names them).  The
account is looked up when the job is submitted and again when it starts; an
account that does not exist, is root, or has a uid below ``min_uid`` is
refused, as is a working directory or output file the account could not
write itself.

What the account may do is asked of the kernel, as that account: the check runs
``test(1)`` under the account's uid, gid and groups (never a shell), so
permissions of every parent directory and ACLs count exactly as they will for
the job.  It is advice given early, not the enforcement: the job itself opens its
output files and changes to its working directory only after it has become
the account (:mod:`kbatch.backends.local.supervisor`).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess

import msgspec

from kbatch.backends.local.jobdir import Account
from kbatch.errors import PermissionDenied, SpecError

__all__ = [
    "Account",
    "AccountPolicy",
    "can_write_directory",
    "can_write_file",
    "check_paths",
    "lookup",
]

_TEST = shutil.which("test", path="/usr/bin:/bin") or "/usr/bin/test"


class AccountPolicy(msgspec.Struct, kw_only=True, frozen=True):
    user_template: str = "jupyter-{username}"
    min_uid: int = 1000

    def account_name(self, user: str) -> str:
        return self.user_template.format(username=user)


def lookup(user: str, policy: AccountPolicy) -> Account:
    """The account that runs ``user``'s jobs, or :class:`PermissionDenied` saying why not."""
    try:
        name = policy.account_name(user)
    except (KeyError, IndexError, ValueError) as exc:  # a broken template: the admin's to fix
        raise PermissionDenied(
            f"this server's user_template {policy.user_template!r} cannot be applied: {exc}",
            status=403,
            code="no_account",
        ) from exc
    try:
        entry = pwd.getpwnam(name)
    except (KeyError, ValueError):
        raise PermissionDenied(
            f"there is no Unix account {name!r} for the user {user!r} on this machine, so "
            "their jobs cannot run; ask the admin to create it",
            status=403,
            code="no_account",
        ) from None
    if entry.pw_uid == 0 or entry.pw_uid < policy.min_uid:
        raise PermissionDenied(
            f"the Unix account {name!r} (uid {entry.pw_uid}) may not run jobs: this server runs "
            f"jobs only as accounts with a uid of {policy.min_uid} or more (min_uid), never root",
            status=403,
            code="account_not_allowed",
        )
    groups = sorted(set(os.getgrouplist(name, entry.pw_gid)))
    return Account(
        name=name, uid=entry.pw_uid, gid=entry.pw_gid, groups=groups, home=entry.pw_dir or "/"
    )


def _test_as(account: Account, *expression: str) -> bool:
    """``test EXPRESSION`` run as the account: whether it holds for the account."""
    try:
        done = subprocess.run(  # a fixed program, the paths as arguments, never a shell
            [_TEST, *expression],
            user=account.uid,
            group=account.gid,
            extra_groups=account.groups,
            env={},
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def can_write_directory(account: Account, path: str) -> bool:
    """Whether the account may enter ``path`` and create files in it."""
    return _test_as(account, "-d", path, "-a", "-w", path, "-a", "-x", path)


def can_write_file(account: Account, path: str, *, exists: bool = True) -> bool:
    """Whether the account could open ``path`` for writing: the file if it exists
    (``/dev/null`` too), else a new file in its directory.  With ``exists`` False the
    file is known to be new (its name has the job's id): only its directory counts."""
    if exists and _test_as(account, "-e", path):
        return _test_as(account, "-w", path) and not _test_as(account, "-d", path)
    return can_write_directory(account, os.path.dirname(path) or "/")


def check_paths(account: Account, workdir: str, files: dict[str, tuple[str, bool]]) -> None:
    """:class:`SpecError` unless the account could work in ``workdir`` and write each file.

    ``files`` maps ``output``/``error`` to the path and whether that very file may
    already exist (False when its name holds the job's id, not known yet).
    """
    if not can_write_directory(account, workdir):
        raise SpecError(
            f"the working directory {workdir} is not one the account {account.name} can enter "
            "and write; change -D/--chdir",
            field="workdir",
        )
    for name, (path, exists) in files.items():
        if not can_write_file(account, path, exists=exists):
            raise SpecError(
                f"the account {account.name} cannot write the {name} file {path}; "
                f"change --{name} to a place it may write",
                field=name,
            )
