"""Deprecated command: ``python -m dinov2.eval.vis_pca`` is now ``python -m dinov2.eval.visualisation``.

Kept so existing scripts keep working: it prints a one-line warning to stderr and runs the new
command with the same arguments. Nothing else lives here.
"""

from __future__ import annotations

import sys
from typing import Sequence

from dinov2.utils.deprecation import warn_moved_command


def main(argv: Sequence[str] | None = None) -> int:
    """Warn that the command moved, then run ``python -m dinov2.eval.visualisation`` with ``argv``."""
    from dinov2.eval.visualisation.run import main as moved_main  # noqa: PLC0415 - imported only when run

    warn_moved_command("dinov2.eval.vis_pca", "dinov2.eval.visualisation")
    return moved_main(argv)


if __name__ == "__main__":
    sys.exit(main())
