"""Code upload and result fetch (``kbatch submit --code``, ``kbatch fetch``).

What is shared by the client and the server, and light enough for the CLI:

- :mod:`kbatch.uploads.manifest`: the manifest (path, sha256, size, executable bit
  of every file) and its checks, the same on both sides.
- :mod:`kbatch.uploads.tree`: the client's walk of a folder, honouring ``.gitignore``
  and ``.kbatchignore``, refusing what cannot travel (escapes, devices, sockets).
- :mod:`kbatch.uploads.results`: what a job left in its code directory that is new
  or changed, read safely from a directory its job could have filled with traps.

The server's blob store is :mod:`kbatch.server.blobs`.
"""
