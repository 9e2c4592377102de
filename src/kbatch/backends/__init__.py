"""Where jobs run: one small interface (:mod:`kbatch.backends.base`), a local and a
Kubernetes implementation.

Kept free of imports: each local job's supervisor is a fresh Python process
that imports :mod:`kbatch.backends.local.supervisor`, and starts faster
without the backend interface and logging it does not use.
"""
