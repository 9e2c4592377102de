"""Where jobs run: one small interface, a local and a Kubernetes implementation."""

from kbatch.backends.base import Backend

__all__ = ["Backend"]
