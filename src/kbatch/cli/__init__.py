"""The ``kbatch`` and ``kqueue`` commands.

Only :mod:`argparse` and :mod:`kbatch.errors` are imported to build the
parser; each command imports what it needs when it runs, and nothing here
imports the server, the web framework or a Kubernetes library.
"""
