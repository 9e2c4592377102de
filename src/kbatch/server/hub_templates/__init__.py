"""A template for JupyterHub itself: its error page, saying who to ask when the hub
refuses a user the kbatch service (the dashboard's login).

The hub, not kbatch, turns such a user away (its OAuth authorization needs the
``access:services!service=kbatch`` scope), on its own error page; with this
directory in ``c.JupyterHub.template_paths`` that page adds, for that refusal
only, "To use kbatch, ask <contact> for access", from
``c.JupyterHub.template_vars["kbatch_contact"]`` (escaped: the hub's templates
autoescape).  See docs/jupyterhub.md.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TEMPLATES"]

TEMPLATES = str(Path(__file__).resolve().parent)
