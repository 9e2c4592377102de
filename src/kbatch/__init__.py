"""kbatch: sbatch and squeue for JupyterHub.

The top-level package stays tiny so that ``kbatch --help`` starts fast; the
client is imported from :mod:`kbatch.client`, the wire schema from
:mod:`kbatch.models` and the error tree from :mod:`kbatch.errors`.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
