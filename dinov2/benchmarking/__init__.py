"""Measuring tools of the benchmarks: FLOP counts, matmul peak, timing, machine description.

Imported only by ``scripts/benchmark*.py`` and the tests, never by training or evaluation code
(see :mod:`.perf`). Nothing is imported here, so ``import dinov2.benchmarking`` costs nothing.
"""
