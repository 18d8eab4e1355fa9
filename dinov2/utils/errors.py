"""The errors a user fixes, and resource failures turned into messages that say what to do.

:class:`UserError` is the base of every exception whose message names the flag, config key or
file at fault and the fix (``DatalistError``, ``CheckpointError``, ``ResourceError``...): every
entry point (:func:`dinov2.utils.entry_point.entry_point`) prints it as one ``ERROR:`` line and
exits with code 1, without a traceback. :class:`UsageError` is the plain "bad value" of a flag or
config key; it is also a ``ValueError``, so code that catches ``ValueError`` still catches it.

Entry points wrap their run in :func:`explained_resource_errors`: the original exception is
kept as the cause, and a :class:`ResourceError` with advice is raised instead, so a user sees
"reduce train.batch_size_per_gpu or the crop sizes" rather than a bare allocator trace.
"""

from __future__ import annotations

import contextlib
import errno
from typing import Iterator

_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


class UserError(Exception):
    """An error the user fixes (a flag, a config key, a file); the message names which and how.

    Subclasses keep their historical bases too (``class DatalistError(UserError, ValueError)``),
    so existing ``except ValueError`` code is unaffected.
    """


class UsageError(UserError, ValueError):
    """A flag or config value that cannot be used as given; the message names it and the fix."""


class ResourceError(UserError, RuntimeError):
    """The machine ran out of a resource; the message says which and what to change."""


def exception_chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and what it was raised from, outermost first (``__cause__``, else ``__context__``).

    Libraries wrap errors (MONAI's ``Compose`` re-raises a transform's error as
    ``RuntimeError("applying transform ...")``); the chain is where the original one is found.
    """
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        chain.append(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return chain


def explain_resource_error(exc: BaseException, memory_advice: str, disk_advice: str) -> str | None:
    """Advice for an out-of-memory or no-space error, or None for any other exception.

    Args:
        exc: the exception raised by the run.
        memory_advice: what the entry point's user can lower (config keys / flags).
        disk_advice: where the run writes (output and cache folders) and what to free.
    """
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" while writing {exc.filename}" if getattr(exc, "filename", None) else ""
        return f"No space left on the device{where}. {disk_advice}"
    import torch  # noqa: PLC0415 - the error classes above are imported by light modules

    oom_type = getattr(torch, "OutOfMemoryError", None)
    text = str(exc).lower()
    is_oom = isinstance(exc, MemoryError) or (oom_type is not None and isinstance(exc, oom_type)) or (
        isinstance(exc, RuntimeError) and any(m in text for m in _OOM_MARKERS))
    if is_oom:
        device = "GPU" if "cuda" in text else "memory"
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return f"Out of {device} ({first_line}). {memory_advice}"
    return None


@contextlib.contextmanager
def explained_resource_errors(memory_advice: str, disk_advice: str) -> Iterator[None]:
    """Re-raise out-of-memory / no-space errors as :class:`ResourceError` with advice."""
    try:
        yield
    except ResourceError:
        raise
    except BaseException as exc:  # noqa: BLE001 - only resource errors are translated
        advice = explain_resource_error(exc, memory_advice, disk_advice)
        if advice is None:
            raise
        raise ResourceError(advice) from exc
