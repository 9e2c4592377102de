"""``kbatch dashboard``: a one-time link that logs the browser in to the web dashboard.

The link carries a single-use code valid for two minutes, never the token: the
server swaps it for a session cookie and redirects to the dashboard's clean URL.
"""

from __future__ import annotations

import argparse
import os
import sys

from kbatch.client import Client

__all__ = ["dashboard"]


def _can_open_browser() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or (
        sys.platform == "darwin"
    )


def dashboard(args: argparse.Namespace) -> int:
    with Client.from_config() as client:
        link = client.dashboard_link()
    print("Open the kbatch dashboard (this link works once, within 2 minutes):")
    print(f"  {link}")
    if not args.no_browser and _can_open_browser():
        import webbrowser

        webbrowser.open(link)
    return 0
