"""What every evaluation entry point does before its work: one place for the process set-up."""

from __future__ import annotations

import logging

from .allocator import tune_cpu_allocator

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def start_entry_point() -> None:
    """Log INFO and above to stderr with timestamps, and keep freed large blocks for reuse
    (:func:`~dinov2.utils.allocator.tune_cpu_allocator`). Idempotent."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    tune_cpu_allocator()
