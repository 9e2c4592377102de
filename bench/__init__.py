"""kbatch's benchmarks, side by side with what users would use instead.

Run ``python -m bench`` (``make bench``); ``python -m bench --help`` lists the
options.  Results go to ``bench/results/``; see :mod:`bench.run`.
"""

__all__: list[str] = []
