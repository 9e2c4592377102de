"""``python -m kbatch``: the ``kbatch`` command, e.g. where its script is not on PATH.

A hub starts its service as ``[sys.executable, "-m", "kbatch", "server", ...]``:
the interpreter's absolute path works whatever PATH the hub was given.
"""

from kbatch.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
