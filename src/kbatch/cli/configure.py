"""``kbatch configure`` and ``kbatch whoami``."""

from __future__ import annotations

import argparse
import os

from kbatch.client import Client
from kbatch.client.config import discover_config, save_config

__all__ = ["configure", "whoami"]


def configure(args: argparse.Namespace) -> int:
    if args.url:
        token = args.token or os.environ.get("KBATCH_TOKEN")
        path = save_config(args.url, token)
        print(f"Wrote {path} (readable only by you)")
        with Client(args.url, token, retry_for=0) as client:
            identity = client.whoami()  # check it works, now rather than at the first submit
        print(f"The server knows you as {identity.name}")
        return 0
    config = discover_config()
    print(f"url:    {config.url}")
    print(f"token:  {'set' if config.token else 'none'}")
    print(f"source: {config.source}")
    return 0


def whoami(args: argparse.Namespace) -> int:
    with Client.from_config() as client:
        identity = client.whoami()
    admin = " (admin)" if identity.admin else ""
    print(f"{identity.name}{admin}")
    return 0
