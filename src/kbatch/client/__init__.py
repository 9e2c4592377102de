"""The Python client library that the CLI is built on.

>>> from kbatch.client import Client
>>> client = Client.from_config()
>>> job = client.submit(JobSpec(script="#!/bin/sh\\necho hi\\n"))
"""

from kbatch.client.config import ClientConfig, discover_config
from kbatch.client.sync import Client

__all__ = ["Client", "ClientConfig", "discover_config"]
