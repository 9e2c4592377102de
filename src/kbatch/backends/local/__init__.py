"""The local backend: jobs as detached processes on this machine, state in SQLite.

Kept free of imports so that each job's supervisor starts fast; the backend
itself is :class:`kbatch.backends.local.backend.LocalBackend`.
"""
