"""The Kubernetes backend: each job a batch/v1 Job; the Job's labels and annotations are the record.

Pure pieces (names, manifests, notebook defaults, status mapping) are kept
apart from the code that talks to the API server (``backend.py``,
``cache.py``), and tested without a cluster.  Imported only by the server.
"""
