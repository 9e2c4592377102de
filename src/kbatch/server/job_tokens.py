"""A JupyterHub token of its own for every job, revoked when the job ends.

The user's token never travels into a job (:mod:`kbatch.server.policy` strips
it from the environment a user sends).  Instead, right before a job starts,
the service asks the hub for a new token of the job's user with only the
scopes the admin configured (``[jupyterhub] job_token_scopes``, e.g. to reach
dask-gateway) and an expiry of the job's time limit plus a margin.  When the
job has ended, every token of that user whose note names the job is deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kbatch.backends.base import JobHooks
from kbatch.errors import KbatchError, ServiceUnavailable
from kbatch.models import Job
from kbatch.server.hub import HubClient

__all__ = ["JobTokens", "token_expiry", "token_note"]

log = logging.getLogger("kbatch.server.job_tokens")


def token_note(service_name: str, job_id: str) -> str:
    """The note that marks a job's token in the hub (and in the user's token list)."""
    return f"kbatch job {job_id} (service {service_name})"


def token_expiry(job: Job, *, default: int, margin: int) -> int:
    """Seconds the job's token lives: its time limit plus ``margin``, or ``default``."""
    return job.time_limit + margin if job.time_limit else default


class JobTokens(JobHooks):
    def __init__(
        self,
        hub: HubClient,
        *,
        service_name: str,
        scopes: Sequence[str],
        default_expiry: int,
        margin: int = 300,
        api_url: str | None = None,
    ) -> None:
        self.hub = hub
        self.service_name = service_name
        self.scopes = list(scopes)
        self.default_expiry = default_expiry
        self.margin = margin
        self.api_url = api_url or hub.api_url
        self._unrevoked: set[tuple[str, str]] = set()  # (user, note) whose revocation failed

    async def environment(self, job: Job) -> dict[str, str]:
        note = token_note(self.service_name, job.id)
        token = await self.hub.create_token(
            job.user,
            note=note,
            expires_in=token_expiry(job, default=self.default_expiry, margin=self.margin),
            scopes=self.scopes,
        )
        log.info(
            "job %s: made hub token %s for %s with scopes %s",
            job.id,
            token.id,
            job.user,
            " ".join(token.scopes) or "(none)",
        )
        await self._retry_revocations()
        return {
            "JUPYTERHUB_API_TOKEN": token.token,
            "JUPYTERHUB_API_URL": self.api_url,
            "JUPYTERHUB_USER": job.user,
        }

    async def finished(self, job: Job) -> None:
        self._unrevoked.add((job.user, token_note(self.service_name, job.id)))
        await self._retry_revocations()

    async def _retry_revocations(self) -> None:
        """Revoke what is due; what fails (the hub is down) is tried again at the next job."""
        for user, note in sorted(self._unrevoked):
            try:
                await self._revoke(user, note)
            except ServiceUnavailable as exc:
                log.warning("cannot revoke the hub token %r of %s yet: %s", note, user, exc)
                return  # the hub is down: keep this and the rest for later
            except KbatchError as exc:
                log.error("cannot revoke the hub token %r of %s: %s", note, user, exc)
            self._unrevoked.discard((user, note))

    async def _revoke(self, user: str, note: str) -> None:
        for token in await self.hub.list_tokens(user):
            if token.note == note:
                await self.hub.delete_token(user, token.id)
                log.info("revoked hub token %s of %s (%s)", token.id, user, note)
