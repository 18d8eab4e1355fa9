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


class DeprecatedConfigKeyWarning(FutureWarning):
    """A config key spelled the old way: it still works for one release; the message names the new key."""


def warn_deprecated_key(old: str, new: str, source: str) -> None:
    """Warn that config key ``old`` (given in ``source``: a file, a preset or "command line") is now ``new``.

    Shown by default (a ``FutureWarning``), once per occurrence, as
    ``<source>:0: DeprecatedConfigKeyWarning: config key 'old' is deprecated ...; use 'new'``.
    """
    import warnings  # noqa: PLC0415

    message = (f"config key '{old}' is deprecated and will be removed in the next release; use '{new}' "
               f"(same value)")
    # warn_explicit: the location shown is where the user wrote the key, not a line of this package
    # (line 0 prints no source line under the message).
    warnings.warn_explicit(message, DeprecatedConfigKeyWarning, filename=str(source), lineno=0,
                           module="dinov2.config")
