"""``python -m dinov2.eval.instances COMMAND ...``: the instance segmentation commands.

Each command is the ``main(argv)`` of its module, imported only when chosen (``train`` pulls in
torch and MONAI, ``evaluate`` needs neither).
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

from dinov2.utils.entry_point import entry_point
from dinov2.utils.errors import UsageError

PROG = "python -m dinov2.eval.instances"
# command -> (module of its main(argv), what it does)
COMMANDS = {
    "train": ("train", "train the distance model on a datalist of image and instance-label stacks"),
    "segment": ("segment", "instance labels of TIFF / NIfTI stacks with a trained model"),
    "evaluate": ("evaluate", "SEG, DET, OP_CSB, precision / recall / F1 of predictions against references"),
    "baseline": ("baseline", "the threshold + connected-components baseline"),
}


def usage() -> str:
    """The ``--help`` text: the commands and what each does."""
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} {{{','.join(COMMANDS)}}} ...", "",
             "3D instance segmentation by regression of a per-object distance map and a seeded watershed.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", f"{PROG} COMMAND --help shows a command's options."]
    return "\n".join(lines)


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen command with the rest of the command line; its exit code.

    This wrapper handles user errors and ``--debug`` (already taken out of ``argv``) for the
    command too: it calls the command's unwrapped ``main``, so a user error still ends with one
    ``ERROR:`` line and ``--debug`` still shows its traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 1
    command = args[0]
    if command not in COMMANDS:
        raise UsageError(f"{PROG}: unknown command '{command}'; choose one of {', '.join(COMMANDS)} (see {PROG} --help)")
    module = importlib.import_module(f"dinov2.eval.instances.{COMMANDS[command][0]}")
    command_main = getattr(module.main, "__wrapped__", module.main)
    return int(command_main(args[1:]) or 0)

if __name__ == "__main__":
    sys.exit(main())
