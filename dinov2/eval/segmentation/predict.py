"""Segment volumes with a finetuned checkpoint; label maps are written in each input's space.

Usage::

    python -m dinov2.eval.segmentation.predict --checkpoint seg_out/best_model.pth --input scan.nii.gz --output preds
    python -m dinov2.eval.segmentation.predict --checkpoint best_model.pth --input scans/ --output preds --tta-flip
    python -m dinov2.eval.segmentation.predict --checkpoint best_model.pth --input dataset.json --output preds  # multi-modal

``--input`` is a NIfTI file, a folder of NIfTI files (one case each, single-modality models), or
a finetuning datalist JSON (its ``test`` entries, or every entry of a plain list; ``image`` may
list one file per modality). Each output ``<case>_seg.nii.gz`` has the shape, affine and
orientation of its input; beside it, ``<case>_seg.png`` shows axial, coronal and sagittal slices
of the input with the labels over them (``--no-preview`` skips it). The checkpoint alone
describes the model and the preprocessing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from dinov2.data.image_io import is_nifti_path, strip_image_suffix
from dinov2.utils.device import resolve_device
from dinov2.utils.entry_point import start_entry_point
from dinov2.utils.precision import autocast_context

logger = logging.getLogger("dinov2.eval.segmentation.predict")


def list_cases(input_path: str | Path) -> list[tuple[str, list[str]]]:
    """``(case name, [files])`` for a NIfTI file, a folder of NIfTI files, or a datalist JSON.

    Raises:
        FileNotFoundError: the input does not exist or holds no NIfTI file.
    """
    path = Path(input_path)
    if not path.exists():
        raise FileNotFoundError(f"--input {path} does not exist; pass a NIfTI file, a folder of them, or a datalist JSON.")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and is_nifti_path(p))
        if not files:
            subfolders = sorted(p.name + "/" for p in path.iterdir() if p.is_dir())
            hint = f" (sub-folders are not searched; it has {', '.join(subfolders)})" if subfolders else ""
            raise FileNotFoundError(f"No .nii/.nii.gz file directly in {path}{hint}. Pass the folder that holds the "
                                    "images, one NIfTI file, or a datalist JSON whose 'test' entries list them.")
        return [(strip_image_suffix(p.name), [str(p)]) for p in files]
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        entries = data.get("test") or [] if isinstance(data, dict) else data
        if not entries:
            raise FileNotFoundError(f"{path} has no 'test' entries to predict.")
        cases = []
        for entry in entries:
            images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
            images = [str(p if Path(p).is_absolute() else path.parent / p) for p in images]
            cases.append((entry.get("name") or strip_image_suffix(Path(images[0]).name), images))
        return cases
    if not is_nifti_path(path):
        raise FileNotFoundError(f"--input {path} is neither a NIfTI file, a folder nor a datalist JSON.")
    return [(strip_image_suffix(path.name), [str(path)])]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dinov2.eval.segmentation.predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="best_model.pth written by python -m dinov2.eval.segmentation")
    p.add_argument("--input", required=True, help="NIfTI file, folder of NIfTI files, or datalist JSON")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: the run's)")
    p.add_argument("--blend", choices=("gaussian", "constant"), default=None)
    p.add_argument("--sw-batch-size", type=int, default=None)
    p.add_argument("--tta-flip", action="store_true", help="average over flips along each axis")
    p.add_argument("--no-preview", action="store_true",
                   help="do not write <case>_seg.png (input slices with the predicted labels over them)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="autocast of the forward passes (bf16 pays off on CPUs with AMX/AVX512-BF16 and on GPUs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Predict every case of ``--input``; returns the exit code."""
    args = get_args_parser().parse_args(argv)
    start_entry_point()
    from dinov2.checkpoints.finetuned import load_finetuned

    from .inference import predict_case
    from .preview import write_preview

    try:  # a wrong path or file is the user's to fix: say so in one line, not a traceback
        cases = list_cases(args.input)
        device = resolve_device(args.device, key="--device")
        model, preset, info = load_finetuned(args.checkpoint, device)
    except (FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 1
    evaluation = info["config"].get("evaluation", {})
    overlap = args.overlap if args.overlap is not None else evaluation.get("overlap", 0.5)
    blend = args.blend or evaluation.get("blend", "gaussian")
    sw_batch = args.sw_batch_size or evaluation.get("sw_batch_size", 4)
    logger.info("%s head (%s, iteration %d) on %d case(s)", info["head"], preset.name, info["iteration"], len(cases))
    out_dir = Path(args.output)
    # A CPU case takes tens of seconds: a bar over the cases gives rate and ETA on stderr; the
    # written paths go to stdout (one per line, for scripts) through tqdm so they do not tear it.
    with tqdm(cases, desc="predict", unit="case", dynamic_ncols=True) as bar:
        for name, files in bar:
            bar.set_postfix_str(name)
            written = predict_case(model, preset, files, out_dir / f"{name}_seg.nii.gz", overlap=overlap,
                                   blend=blend, sw_batch_size=sw_batch, tta_flip=args.tta_flip, device=device,
                                   autocast=autocast_context(args.precision, device))
            if not args.no_preview:
                write_preview(files[0], written, written.with_name(f"{name}_seg.png"), preset)
            tqdm.write(str(written), file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
