"""Segment volumes with a finetuned checkpoint; label maps are written in each input's space.

Usage::

    python -m dinov2.eval.segmentation.predict --checkpoint seg_out/best_model.pth --input scan.nii.gz --output preds
    python -m dinov2.eval.segmentation.predict --checkpoint best_model.pth --input scans/ --output preds --tta-flip
    python -m dinov2.eval.segmentation.predict --checkpoint best_model.pth --input dataset.json --output preds  # multi-modal

``--input`` is a NIfTI file, a folder of NIfTI files (one case each, single-modality models), a
DICOM series folder (``FOLDER::SERIES`` picks one of several series; the case is named after the
folder), or a finetuning datalist JSON (its ``test`` entries, or every entry of a plain list;
``image`` may list one file per modality); several may be given. Each output
``<case>_seg.nii.gz`` has the shape, affine and orientation of its input (a DICOM input's: the
series' space); beside it, ``<case>_seg.png`` shows axial, coronal
and sagittal slices of the input with the labels over them (``--no-preview`` skips it). The
checkpoint alone describes the model and the preprocessing. A 4D input is segmented one frame at a
time: ``--frame N`` (or, for a model of C channels, a 4D file of C frames gives them all).

``--format nnunet`` writes what nnU-Net's own evaluation reads: ``<case>.nii.gz`` (no ``_seg``
suffix, no preview) holding nnU-Net's integer labels (regions painted in the preset's
``regions_class_order``); input files named ``CASE_XXXX.nii.gz`` (nnU-Net's ``imagesTs``) are
grouped by case, one file per channel in channel order.

A bad case never stops the run: every input is checked first
(:func:`dinov2.data.validation.read_volume`: empty, truncated or unreadable files, 2D/5D arrays,
4D without ``--frame``, the wrong number of channels, no finite voxel), each bad case gets one
line naming its file and the reason, the other cases are still predicted, ``skipped.tsv`` (columns
``path``, ``reason``) lists the skipped ones in the output folder, and the exit code is 1. Outputs
are written under a temporary name and renamed, so a failed case leaves no output file. Some
NaN/+-Inf voxels are tolerated (one warning; they take the smallest finite value).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dinov2.data.datalist.format import DatalistError
from dinov2.data.dicom_series import volume_name, volume_source
from dinov2.data.image_io import is_dicom_candidate, is_nifti_path
from dinov2.data.skipped_report import REPORT_NAME, write_skipped_tsv
from dinov2.data.validation import find_input_error
from dinov2.utils.config import with_packaged_defaults
from dinov2.utils.device import add_device_argument, resolve_device
from dinov2.utils.entry_point import add_debug_flag, entry_point, start_entry_point
from dinov2.utils.precision import autocast_context

logger = logging.getLogger("dinov2.eval.segmentation.predict")


def _is_dicom_folder(path: Path) -> bool:
    """A folder of DICOM files and no NIfTI file: one case, its series (read_volume refuses several)."""
    if not path.is_dir():
        return False
    files = [p for p in path.iterdir() if p.is_file()]
    return not any(is_nifti_path(p) for p in files) and any(is_dicom_candidate(p) for p in files)


def list_cases(input_path: str | Path) -> list[tuple[str, list[str]]]:
    """``(case name, [files])`` for a NIfTI file, a folder of NIfTI files, a DICOM series folder (or
    ``FOLDER::SERIES``, or a multi-frame DICOM file), or a datalist JSON.

    A DICOM case is named after its folder (``FOLDER_SERIES`` with a series choice), so its label
    map is ``<folder>_seg.nii.gz``, in the series' space.

    Raises:
        FileNotFoundError: the input does not exist or holds no NIfTI file.
        DatalistError: a ``.json`` input that is not JSON, or an entry without an ``image`` path.
    """
    path = Path(input_path)
    if not volume_source(path).exists():
        raise FileNotFoundError(f"--input {path} does not exist; pass a NIfTI file, a folder of them, a DICOM series "
                                "folder, or a datalist JSON.")
    if not path.exists() or _is_dicom_folder(path):  # FOLDER::SERIES, or the slices of a series
        return [(volume_name(path), [str(path)])]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and is_nifti_path(p))
        if not files:
            subfolders = sorted(p.name + "/" for p in path.iterdir() if p.is_dir())
            hint = f" (sub-folders are not searched; it has {', '.join(subfolders)})" if subfolders else ""
            raise FileNotFoundError(f"No .nii/.nii.gz file directly in {path}{hint}. Pass the folder that holds the "
                                    "images, one NIfTI file, or a datalist JSON whose 'test' entries list them.")
        return [(volume_name(p), [str(p)]) for p in files]
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            where = ""
            if isinstance(exc, json.JSONDecodeError):
                where = f" (line {exc.lineno}, column {exc.colno}: {exc.msg})"
            raise DatalistError(path, [], summary=f"--input {path} is not a valid JSON datalist{where}; fix the file "
                                "or rebuild it with python -m dinov2.data.datalist.") from exc
        entries = data.get("test") or [] if isinstance(data, dict) else data
        if not entries:
            raise FileNotFoundError(f"{path} has no 'test' entries to predict.")
        if not isinstance(entries, list):
            raise DatalistError(path, [], summary=f"--input {path}: expected a list of entries (or a dict with a "
                                f"'test' list), got {type(entries).__name__}.")
        cases = []
        for i, entry in enumerate(entries):
            image = entry.get("image") if isinstance(entry, dict) else None
            images = image if isinstance(image, list) else [image]
            if not images or not all(isinstance(p, str) and p for p in images):
                where = f"test[{i}]" if isinstance(data, dict) else f"[{i}]"
                raise DatalistError(path, [], summary=f"--input {path}: entry {where} has no 'image' path (or list of "
                                    'paths); write entries like {"image": "case1.nii.gz"}.')
            images = [str(p if Path(p).is_absolute() else path.parent / p) for p in images]
            cases.append((entry.get("name") or volume_name(images[0]), images))
        return cases
    if not (is_nifti_path(path) or is_dicom_candidate(path)):
        raise FileNotFoundError(f"--input {path} is neither a NIfTI file, a DICOM file, a folder nor a datalist JSON.")
    return [(volume_name(path), [str(path)])]


def collect_cases(inputs: Sequence[str | Path]) -> list[tuple[str, list[str]]]:
    """The cases of every ``--input`` (see :func:`list_cases`), checked for clashing output names.

    Raises:
        FileNotFoundError: an input does not exist or holds no NIfTI file.
        ValueError: two cases would write the same ``<case>_seg.nii.gz``.
    """
    cases, seen = [], {}
    for item in inputs:
        for name, files in list_cases(item):
            if name in seen and seen[name] != files:
                raise ValueError(f"Two cases are named '{name}' ({seen[name][0]} and {files[0]}): both would write "
                                 f"{name}_seg.nii.gz. Predict them into different --output folders.")
            if name not in seen:
                seen[name] = files
                cases.append((name, files))
    return cases


def skip_reason(exc: BaseException, files: Sequence[str]) -> tuple[str, str]:
    """``(path, reason)`` of a case that failed: the file at fault and why, in one line."""
    found = find_input_error(exc)
    if found is not None:
        return str(found.path), found.reason
    text = " ".join(str(exc).split()) or type(exc).__name__
    return str(files[0]), f"prediction failed ({type(exc).__name__}: {text[:300]})"


def write_skipped(out_dir: Path, skipped: Sequence[tuple[str, str]]) -> Path | None:
    """Write ``skipped.tsv`` (``path``, ``reason``) when cases were skipped; remove a stale one otherwise
    (a re-run into the same folder must not show the failures of an earlier run)."""
    return write_skipped_tsv(Path(out_dir) / REPORT_NAME, ("path", "reason"), skipped, remove_stale=True)


def predict_one(model, preset, name: str, files: Sequence[str], out_dir: Path, args, device, settings: dict) -> Path:
    """Predict one case; its label map (and preview) appear only when everything succeeded."""
    from .inference import predict_case
    from .preview import write_preview

    nnunet = getattr(args, "format", "default") == "nnunet"
    written = predict_case(model, preset, files, out_dir / f"{name}{'' if nnunet else '_seg'}.nii.gz", device=device,
                           autocast=autocast_context(args.precision, device), frame=args.frame, **settings)
    if args.no_preview or nnunet:
        return written
    png = written.with_name(f"{name}_seg.png")
    tmp = png.with_name(f".{png.stem}.{os.getpid()}.partial.png")
    try:
        write_preview(files[0], written, tmp, preset, frame=args.frame)
        os.replace(tmp, png)
    except BaseException:
        tmp.unlink(missing_ok=True)
        written.unlink(missing_ok=True)
        raise
    return written


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dinov2.eval.segmentation.predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    model_source = p.add_mutually_exclusive_group(required=True)
    model_source.add_argument("--checkpoint", help="best_model.pth written by python -m dinov2.eval.segmentation")
    model_source.add_argument("--model", help="instead of --checkpoint: the .onnx file written by python -m "
                              "dinov2.export (run by ONNX Runtime on the CPU, in float32; its preprocessing is "
                              "stored in it)")
    p.add_argument("--input", required=True, nargs="+",
                   help="NIfTI file, folder of NIfTI files, or datalist JSON (several may be given)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: the run's)")
    p.add_argument("--blend", choices=("gaussian", "constant"), default=None)
    p.add_argument("--sw-batch-size", type=int, default=None)
    p.add_argument("--tta-flip", action="store_true", help="average over flips along each axis")
    p.add_argument("--frame", type=int, default=None,
                   help="frame of 4D inputs to segment (3D inputs ignore it); without it a 4D input is skipped, "
                        "unless its frames are the model's channels")
    p.add_argument("--no-preview", action="store_true",
                   help="do not write <case>_seg.png (input slices with the predicted labels over them)")
    p.add_argument("--format", choices=("default", "nnunet"), default="default",
                   help="nnunet: <case>.nii.gz label maps for nnU-Net's evaluation (no preview; CASE_XXXX.nii.gz "
                        "inputs grouped by case)")
    add_device_argument(p, default="auto", key=None)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="autocast of the forward passes (bf16 pays off on CPUs with AMX/AVX512-BF16 and on GPUs)")
    add_debug_flag(p)
    return p


# A wrong path, file or flag value is the user's to fix (every ValueError of loading names it): one
# ERROR line and exit code 1, not a traceback.
@entry_point(user_errors=(ValueError,))
def main(argv: Sequence[str] | None = None) -> int:
    """Predict every case of ``--input``; returns the exit code (1 when a case was skipped, or after
    one ``ERROR:`` line for a user error: a missing file, a bad flag value or checkpoint)."""
    args = get_args_parser().parse_args(argv)
    start_entry_point()
    from dinov2.checkpoints.finetuned import load_finetuned
    from dinov2.utils.errors import explain_resource_error

    if args.frame is not None and args.frame < 0:
        raise ValueError(f"--frame {args.frame} is negative; frames count from 0.")
    cases = collect_cases(args.input)
    if args.format == "nnunet":
        from dinov2.data.datalist.nnunet.cases import group_channel_files

        cases = group_channel_files(cases)
    device = resolve_device(args.device, key="--device")
    if args.model is not None:
        from .onnx_model import load_onnx_model

        model, preset, info = load_onnx_model(args.model, device, args.precision)
        device = model.device
    else:
        model, preset, info = load_finetuned(args.checkpoint, device)
    # The checkpoint's evaluation settings over the packaged ones (an older file may lack some).
    evaluation = with_packaged_defaults("evaluation", info["config"].get("evaluation", {}),
                                        default="eval/segmentation_default")
    settings = {"overlap": args.overlap if args.overlap is not None else float(evaluation["overlap"]),
                "blend": args.blend or str(evaluation["blend"]),
                "sw_batch_size": args.sw_batch_size or int(evaluation["sw_batch_size"]),
                "tta_flip": args.tta_flip}
    logger.info("%s head (%s, iteration %d) on %d case(s)", info["head"], preset.name, info["iteration"], len(cases))
    out_dir = Path(args.output)
    skipped: list[tuple[str, str]] = []
    # A CPU case takes tens of seconds: a bar over the cases gives rate and ETA on stderr; the
    # written paths go to stdout (one per line, for scripts) through tqdm so they do not tear it.
    with logging_redirect_tqdm(), tqdm(cases, desc="predict", unit="case", dynamic_ncols=True) as bar:
        for name, files in bar:
            bar.set_postfix_str(name)
            try:
                written = predict_one(model, preset, name, files, out_dir, args, device, settings)
            except Exception as exc:  # noqa: BLE001 - one bad case must not stop the others
                if explain_resource_error(exc, "", "") is not None:
                    raise  # out of memory / disk: the next cases would fail the same way
                path, reason = skip_reason(exc, files)
                if find_input_error(exc) is None:
                    logger.debug("case %s failed", name, exc_info=exc)
                logger.error("Skipped %s: %s", path, reason)
                skipped.append((path, reason))
                continue
            tqdm.write(str(written), file=sys.stdout)
    table = write_skipped(out_dir, skipped)
    if table is not None:
        logger.error("%d of %d case(s) skipped (listed in %s); the others were predicted.", len(skipped), len(cases),
                     table)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
