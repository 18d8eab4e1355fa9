"""What every entry point does around its work: one voice for errors and logs, one process set-up.

Every ``python -m dinov2...`` command's ``main(argv)`` is wrapped in :func:`entry_point`::

    @entry_point
    def main(argv=None) -> int:
        parser = argparse.ArgumentParser(...)
        add_debug_flag(parser)
        args = parser.parse_args(argv)
        start_entry_point()
        ...

- A user error (:data:`USER_ERRORS`: any :class:`~dinov2.utils.errors.UserError`, such as a
  ``DatalistError``, ``CheckpointError`` or ``ConfigError``, and a missing file or folder) is
  printed as one line, ``ERROR: <message>``, on stderr, and ``main`` returns 1: no traceback.
  Any other exception is a bug and keeps its traceback.
- ``--debug`` on the command line (before a ``--``) or ``DINOV2_DEBUG=1`` in the environment lets
  user errors through as well, traceback included. The wrapper takes ``--debug`` out of the
  command line before ``main`` parses it, so every command accepts it;
  :func:`add_debug_flag` lists it in a parser's ``--help``.
- :func:`start_entry_point` logs INFO and above to stderr in :data:`LOG_FORMAT` (the format of
  ``train3d``'s ``log.txt`` too), hides the third-party notices that are normal here, and tunes
  the CPU allocator. Importing ``dinov2`` does none of this: it is the command's decision.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import warnings
from typing import Callable, Iterator, Sequence, TypeVar

from .errors import UsageError, UserError, exception_chain

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
DEBUG_FLAG = "--debug"
DEBUG_ENV = "DINOV2_DEBUG"
DEBUG_HELP = f"show the full traceback of an error instead of one ERROR line (also {DEBUG_ENV}=1)"

# The exceptions whose message is the whole story for a user: printed as one line, exit code 1.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError)

_Main = TypeVar("_Main", bound=Callable[..., "int | None"])


def log_formatter() -> logging.Formatter:
    """The one log line format of every entry point (stderr and ``log.txt``)."""
    return logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT)


def quiet_third_party() -> None:
    """Hide third-party notices that are the normal case for this project. Idempotent.

    MONAI announces, the first time a DICOM reader is built, that NVIDIA's GPU DICOM codec is
    absent and that it falls back to pydicom's decoders (a log warning and a ``UserWarning``).
    """
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    # filterwarnings moves an identical filter to the front instead of adding a second one.
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)


def start_entry_point(level: int = logging.INFO, tune_allocator: bool = True) -> None:
    """The process set-up of a command, after its arguments are parsed. Idempotent.

    Logs ``level`` and above to stderr in :data:`LOG_FORMAT` (a program that configured logging
    already keeps its handlers), hides the third-party notices of :func:`quiet_third_party`, and,
    with ``tune_allocator`` (commands that hold large tensors), keeps freed large blocks for reuse
    (:func:`~dinov2.utils.allocator.tune_cpu_allocator`).
    """
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT)
    quiet_third_party()
    if tune_allocator:
        from .allocator import tune_cpu_allocator  # noqa: PLC0415

        tune_cpu_allocator()


def add_debug_flag(parser) -> None:
    """List ``--debug`` in an argparse parser's ``--help`` (:func:`entry_point` reads and removes the
    flag before the parser runs)."""
    parser.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """``--debug`` among ``argv`` (``sys.argv[1:]`` when None) before any ``--``, or ``DINOV2_DEBUG`` set
    to anything but ``""`` / ``0`` / ``false`` / ``no``."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return True
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" in args:
        args = args[:args.index("--")]
    return DEBUG_FLAG in args


def without_debug_flag(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--debug`` before any ``--`` (what follows ``--`` belongs to another command)."""
    args = list(argv)
    cut = args.index("--") if "--" in args else len(args)
    return [a for a in args[:cut] if a != DEBUG_FLAG] + args[cut:]


def error_line(exc: BaseException) -> str:
    """``ERROR: <message>`` on one line (the message's whitespace and newlines collapsed)."""
    message = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        # OSError(errno, strerror, filename) prints as "[Errno 2] No such file or directory: 'x'".
        message = f"{exc.filename}: {exc.strerror}"
    return f"ERROR: {message or type(exc).__name__}"


def report_user_error(exc: BaseException, file=None) -> int:
    """Print :func:`error_line` of ``exc`` to ``file`` (stderr) and return the exit code, 1."""
    print(error_line(exc), file=file if file is not None else sys.stderr, flush=True)
    return 1


class FlagError(UsageError):
    """A command-line flag argparse rejected (unknown flag, bad choice, missing value)."""


@contextlib.contextmanager
def flag_errors_as_user_errors() -> Iterator[None]:
    """While a command runs, argparse's rejections raise :class:`FlagError` instead of printing
    the usage block and exiting with code 2, so a bad flag ends like every other user error:
    one ``ERROR:`` line and exit code 1 (``--help`` still prints the full usage)."""
    import argparse  # noqa: PLC0415

    def error(parser: argparse.ArgumentParser, message: str):
        raise FlagError(f"{parser.prog}: {message} (see {parser.prog} --help)")

    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = error  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]


def user_error_behind(exc: BaseException, caught: tuple[type[BaseException], ...] = USER_ERRORS) -> BaseException | None:
    """The user error a library wrapped in a ``RuntimeError`` (MONAI's ``Compose`` re-raises a
    transform's error as ``RuntimeError("applying transform ...")``), found along the
    ``__cause__`` / ``__context__`` chain; None when there is none."""
    return next((e for e in exception_chain(exc) if isinstance(e, caught)), None)


def entry_point(main: _Main | None = None, *, user_errors: tuple[type[BaseException], ...] = ()):
    """Wrap a command's ``main(argv=None) -> int`` so that user errors end it with one line.

    Args:
        main: the command's function; its first argument is the command line (None:
            ``sys.argv[1:]``). Used bare (``@entry_point``) or with arguments.
        user_errors: more exception types this command treats as the user's (besides
            :data:`USER_ERRORS`), e.g. ``(ValueError,)`` for a command whose every ``ValueError``
            is about its flags or files.

    Returns:
        The wrapped function: it returns ``main``'s code, or 1 after printing ``ERROR: <message>``
        to stderr for a user error; with ``--debug`` / ``DINOV2_DEBUG=1`` the error propagates.
    """
    caught = USER_ERRORS + tuple(user_errors)

    def wrap(fn: _Main) -> _Main:
        @functools.wraps(fn)
        def wrapper(argv: Sequence[str] | None = None, *args, **kwargs):
            command_line = list(sys.argv[1:] if argv is None else argv)
            debug = debug_requested(command_line)
            if DEBUG_FLAG in command_line:
                command_line = without_debug_flag(command_line)
                argv = command_line
            if debug:
                return fn(argv, *args, **kwargs)
            try:
                with flag_errors_as_user_errors():
                    return fn(argv, *args, **kwargs)
            except caught as exc:
                return report_user_error(exc)
            except RuntimeError as exc:
                cause = user_error_behind(exc, caught)
                if cause is None:
                    raise
                return report_user_error(cause)

        wrapper.__wrapped_entry_point__ = True  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return wrap(main) if main is not None else wrap


def run_entry_point(main: Callable[..., "int | None"], argv: Sequence[str] | None = None, *,
                    user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Call ``main(argv)`` as :func:`entry_point` would; returns the exit code (None counts as 0)."""
    code = entry_point(main, user_errors=user_errors)(argv)
    return 0 if code is None else int(code)


@contextlib.contextmanager
def user_input(*types: type[BaseException], prefix: str = "") -> Iterator[None]:
    """Within this block, exceptions of ``types`` (default ``ValueError``) are about the user's input:
    they are re-raised as :class:`~dinov2.utils.errors.UsageError` (the original as its cause),
    which an entry point prints as one line. :class:`UserError` passes unchanged.

    Args:
        types: the exception types to translate.
        prefix: put before the message (e.g. ``"--config-file my.yaml: "``).
    """
    types = types or (ValueError,)
    try:
        yield
    except UserError:
        raise
    except types as exc:
        raise UsageError(f"{prefix}{exc}") from exc
