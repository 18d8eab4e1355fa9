"""The two evaluation entry points a comparison drives, seen through one interface.

``seg`` is ``python -m dinov2.eval.segmentation`` (:mod:`dinov2.eval.segmentation.finetune`),
``probe`` is ``python -m dinov2.eval.linear`` (:mod:`dinov2.eval.linear.run`). A comparison
resolves each run's config with the entry point's own parser and ``build_config`` (so a bad
task argument fails before anything runs, and a finished run is recognised by its config), then
calls the entry point's ``main(argv)`` in this process or as a child process.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from typing import Any, Callable, Sequence

from omegaconf import OmegaConf

from dinov2.utils.errors import UsageError, UserError
from dinov2.utils.jsonsafe import json_safe

# kind -> (the module a user runs with -m, the module that holds get_args_parser / build_config / main)
MODULES = {"seg": ("dinov2.eval.segmentation", "dinov2.eval.segmentation.finetune"),
           "probe": ("dinov2.eval.linear", "dinov2.eval.linear.run")}
# Keys left out when two configs are compared: where a run lives is not what it computes.
_PLACE_KEYS = ("output_dir",)


def _module(kind: str):
    return importlib.import_module(MODULES[kind][1])


def command(kind: str, argv: Sequence[str]) -> list[str]:
    """The shell command of one run: ``python -m <module> <argv>``."""
    return [sys.executable, "-m", MODULES[kind][0], *argv]


def resolved_config(kind: str, argv: Sequence[str], label: str) -> dict[str, Any]:
    """The config the entry point would run with ``argv``, as plain JSON values, without its output folder.

    Args:
        kind: ``seg`` or ``probe``.
        argv: the run's command line (key=value overrides first, then flags).
        label: the task, named in errors.

    Raises:
        UsageError: a flag or key the entry point rejects (unknown, bad value), named with the task.
    """
    module = _module(kind)
    parser = module.get_args_parser()
    try:
        # Segmentation parses intermixed (key=value anywhere); the probe takes them before its flags.
        args = parser.parse_intermixed_args(list(argv)) if kind == "seg" else parser.parse_args(list(argv))
        cfg = module.build_config(args)
    except (UserError, ValueError) as exc:
        raise UsageError(f"{label} (see --task-args): {exc}") from exc
    plain = json.loads(json.dumps(json_safe(OmegaConf.to_container(cfg, resolve=True))))
    for key in _PLACE_KEYS:
        plain.pop(key, None)
    return plain


def main_function(kind: str) -> Callable[[Sequence[str]], int]:
    """The entry point's ``main(argv) -> exit code`` (user errors: one ``ERROR:`` line and code 1)."""
    return _module(kind).main


def run_in_process(kind: str, argv: Sequence[str]) -> int:
    """Call the entry point's ``main`` here; returns its exit code (None counts as 0)."""
    code = main_function(kind)(list(argv))
    return 0 if code is None else int(code)


def run_as_subprocess(kind: str, argv: Sequence[str]) -> int:
    """Run the entry point as ``python -m`` in a child process (its memory is freed when it ends)."""
    return subprocess.run(command(kind, argv), check=False).returncode
