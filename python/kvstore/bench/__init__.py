"""kvstore's benchmarks (``kvstore bench``, ``python -m kvstore bench``): the store against
``numpy.copyto``, ``iperf3``, Mooncake Store, Redis, or another build of kvstore. Nothing in the
library imports this package."""

from .runner import run_bench

__all__ = ["run_bench"]
