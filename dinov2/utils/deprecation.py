"""Moved commands: the one-line warning an old ``python -m`` path prints before it runs the new one.

The modules left at the old paths (``dinov2.eval.segmentation3d``, ``dinov2.data.sample_data``...)
hold nothing but a ``main`` that calls :func:`warn_moved_command` and delegates to the new one.
"""

from __future__ import annotations

import sys

_warned: set[str] = set()


def warn_moved_command(old: str, new: str) -> None:
    """Print once per process, to stderr: ``python -m <old>`` is deprecated, use ``python -m <new>``."""
    if old in _warned:
        return
    _warned.add(old)
    print(f"warning: 'python -m {old}' is deprecated and will be removed; use 'python -m {new}' "
          "(same arguments).", file=sys.stderr)
