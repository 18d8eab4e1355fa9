"""``python -m dinov2.serve --checkpoint best_model.pth``: serve one finetuned model over HTTP.

Usage::

    python -m dinov2.serve --checkpoint seg_out/best_model.pth
    python -m dinov2.serve --checkpoint best_model.pth --host 0.0.0.0 --port 8000 --concurrency 2 --device cuda

The model is loaded once, before the server accepts requests; ``GET /healthz`` answers as soon
as it does. FastAPI and Uvicorn are an optional extra (``pip install 'dinov2-3d[serve]'``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from dinov2.utils.device import add_device_argument
from dinov2.utils.entry_point import add_debug_flag, entry_point, start_entry_point
from dinov2.utils.errors import UsageError

logger = logging.getLogger("dinov2.serve")
INSTALL = "pip install 'dinov2-3d[serve]'"


def get_args_parser() -> argparse.ArgumentParser:
    """The command's flags (``python -m dinov2.serve --help``)."""
    p = argparse.ArgumentParser(prog="python -m dinov2.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="best_model.pth written by python -m dinov2.eval.segmentation")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--concurrency", type=int, default=1, help="inferences at once (each in a worker thread)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait; one more gets 503")
    p.add_argument("--max-upload-mb", type=float, default=512,
                   help="largest upload; above: 413 (a zip may unpack to 4x that)")
    p.add_argument("--timeout-s", type=float, default=300, help="queue wait + inference per request; past it: 504")
    add_device_argument(p, default="auto", key=None)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="autocast of the forward passes")
    p.add_argument("--tta-flip", action="store_true", help="average segmentations over flips along each axis")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    add_debug_flag(p)
    return p


def check_extra() -> None:
    """Raise one clear error when FastAPI or Uvicorn is missing (they are an optional extra)."""
    try:
        import fastapi  # noqa: F401, PLC0415
        import uvicorn  # noqa: F401, PLC0415
    except ImportError as exc:
        raise UsageError(f"the HTTP service needs FastAPI and Uvicorn ({exc.name or exc} is not installed): "
                         f"{INSTALL}") from None


def _check_limits(args: argparse.Namespace) -> None:
    for flag, value, low in (("--concurrency", args.concurrency, 1), ("--max-queue", args.max_queue, 0),
                             ("--port", args.port, 0), ("--threads", args.threads or 1, 1)):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if args.max_upload_mb <= 0 or args.timeout_s <= 0:
        raise UsageError("--max-upload-mb and --timeout-s must be > 0")


@entry_point(user_errors=(ValueError,))
def main(argv: Sequence[str] | None = None) -> int:
    """Load the model and serve it until interrupted; returns the exit code."""
    args = get_args_parser().parse_args(argv)
    start_entry_point()
    check_extra()
    _check_limits(args)
    import torch  # noqa: PLC0415
    import uvicorn  # noqa: PLC0415

    from .app import ServiceOptions, create_app  # noqa: PLC0415
    from .inference import load_served_model  # noqa: PLC0415

    if args.threads:
        torch.set_num_threads(args.threads)
    served = load_served_model(args.checkpoint, args.device, args.precision, args.tta_flip)
    logger.info("%s head (%s, iteration %s) on %s", served.info["head"], served.preset.name,
                served.info.get("iteration"), served.device)
    options = ServiceOptions(args.concurrency, args.max_queue, int(args.max_upload_mb * 2**20), args.timeout_s)
    uvicorn.run(create_app(served, options), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
