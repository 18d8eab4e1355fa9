"""Worker side of ``crops.augment_on_device``: cut one box per sample, batch boxes and draws.

With the key on, a data-loader worker does no resampling and no intensity work: it draws every
parameter of the sample's crops (:func:`dinov2.data.augment_draws.draw_sample`), cuts the
smallest box of the volume that holds all of them (:func:`cut_crop_boxes`), and the collate packs
a batch of such boxes and draws into a few tensors (:func:`collate_crop_boxes`) that
:mod:`dinov2.data.device_augment` turns into crops on the training device.

The box is kept in the volume's storage dtype (float16 storage crosses as float16) and stays a
view of the cached volume in the main process; a worker's collate copies it once, into the shared
memory the batch crosses to the main process in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from dinov2.data.augment_draws import CropDraw, SampleDraw, histogram_control_points

CROP_BOXES_KEY = "crop_boxes"  # the key of a cut sample and of a batch of them


@dataclass(frozen=True)
class CutSample:
    """One sample's box and the draws of its crops.

    Attributes:
        box: ``(C, bx, by, bz)`` tensor, the volume's smallest box holding every crop.
        origin: the voxel of the volume where ``box`` starts.
        draw: the crops' draws, box corners in voxels of the volume (``origin`` is subtracted
            where the box is read).
        noise_seeds: one seed per crop (global then local) of the crop's Gaussian noise field
            (used by the crops that get noise), drawn from the sample's torch generator.
    """

    box: torch.Tensor
    origin: tuple[int, int, int]
    draw: SampleDraw
    noise_seeds: tuple[int, ...]


def cut_crop_boxes(volume: torch.Tensor, draw: SampleDraw, generator: torch.Generator) -> dict[str, CutSample]:
    """The worker's output for one sample under ``crops.augment_on_device``.

    Args:
        volume: ``(C, H, W, D)`` tensor the draws were made for (read, not copied).
        draw: the sample's draws, box corners in voxels of ``volume``.
        generator: the sample's torch generator (seeded by its stream position); the crops'
            noise seeds are drawn from it.

    Returns:
        ``{"crop_boxes": CutSample}`` with ``box`` a view of ``volume``.
    """
    crops = draw.crops()
    low = tuple(min(c.start[a] for c in crops) for a in range(3))
    high = [max(c.start[a] + c.size[a] for c in crops) for a in range(3)]
    box = volume[:, low[0]:high[0], low[1]:high[1], low[2]:high[2]]
    seeds = tuple(torch.randint(0, 2**62, (len(crops),), generator=generator).tolist())
    return {CROP_BOXES_KEY: CutSample(box, low, draw, seeds)}  # type: ignore[arg-type]


def is_cut_batch(samples: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a batch's samples are :func:`cut_crop_boxes` outputs (rather than crops)."""
    return bool(samples) and CROP_BOXES_KEY in samples[0]


def global_crop_rows(samples: Sequence[Mapping[str, Any]]) -> int:
    """Global crops of a batch of cut samples (``n_global * B``), the rows the iBOT masks are drawn for."""
    return len(samples) * len(samples[0][CROP_BOXES_KEY].draw.global_crops)


def collate_crop_boxes(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch ``B`` cut samples: their boxes and per-crop parameter tensors (crop-major rows).

    Args:
        samples: ``{"crop_boxes": CutSample}`` dicts with the same numbers of crops.

    Returns:
        ``{"boxes": [Tensor(C, bx, by, bz)] * B in the boxes' dtype, "draws": [SampleDraw] * B,
        "noise_seeds": [tuple] * B, "origins": [(x, y, z)] * B, "global": group, "local": group
        or None}``; the draws' box corners are in voxels of the volumes, the group's relative to
        the boxes; a group (see
        :func:`_group`) holds row ``i * B + b`` for crop ``i`` of sample ``b``, the order of the
        collated crops.
    """
    cuts = [sample[CROP_BOXES_KEY] for sample in samples]
    counts = {(len(c.draw.global_crops), len(c.draw.local_crops)) for c in cuts}
    if len(counts) != 1:
        raise ValueError(f"Every sample must hold the same numbers of crops, got {sorted(counts)}.")
    n_global = len(cuts[0].draw.global_crops)
    return {
        "boxes": _batch_boxes([c.box for c in cuts]),
        "draws": [c.draw for c in cuts],
        "noise_seeds": [c.noise_seeds for c in cuts],
        "origins": [c.origin for c in cuts],
        "global": _group([c.draw.global_crops for c in cuts], [c.origin for c in cuts],
                         [c.noise_seeds[:n_global] for c in cuts]),
        "local": _group([c.draw.local_crops for c in cuts], [c.origin for c in cuts],
                        [c.noise_seeds[n_global:] for c in cuts]),
    }


def _batch_boxes(boxes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The boxes as they leave the collate: views of the volumes in-process, one shared buffer in a worker.

    In the main process (``num_workers=0``) nothing needs copying: the boxes are read, never
    written. In a worker the batch crosses to the main process through shared memory, so the
    boxes are copied straight into one shared buffer (as ``default_collate`` does), instead of
    into private memory that pickling would copy a second time.
    """
    if torch.utils.data.get_worker_info() is None:
        return list(boxes)
    numel = sum(b.numel() for b in boxes)
    flat = boxes[0].new(boxes[0]._typed_storage()._new_shared(numel, device=boxes[0].device))
    out, offset = [], 0
    for box in boxes:
        out.append(flat[offset:offset + box.numel()].view(box.shape).copy_(box))
        offset += box.numel()
    return out


def _rows(crops: Sequence[CropDraw], test) -> np.ndarray:
    return np.array([r for r, c in enumerate(crops) if test(c)], dtype=np.int64)


def _floats(values: Sequence, width: int | None = None) -> np.ndarray:
    shape = (len(values),) if width is None else (len(values), width)
    return np.array(values, dtype=np.float32).reshape(shape)


def _group(per_sample: Sequence[Sequence[CropDraw]], origins: Sequence[Sequence[int]],
           seeds: Sequence[Sequence[int]]) -> dict[str, Any] | None:
    """Arrays of one crop group (global or local), rows crop-major; None when it has no crops.

    NumPy arrays, not tensors: small arrays cross from a worker inside the pickled batch, where
    every tensor would take a shared-memory segment and a file descriptor of its own.

    Returns:
        ``size`` (int S), ``samples`` (int B), per row ``sample`` int64 (N,), ``start`` (in the
        sample's box) / ``extent`` / ``axes`` int64 (N, 3), ``flipped`` bool (N, 3); per transform
        the rows it applies to (``*_rows`` int64) and its float32 parameters: ``gamma``;
        ``noise_std``, ``noise_seed`` (int64); ``histogram_points`` (n, P) control points on
        [0, 1]; ``blur_sigma`` (n, 3); ``sharpen_sigma1`` / ``sharpen_sigma2`` (n, 3),
        ``sharpen_alpha``; ``gibbs_alpha``.
    """
    n_crops, n_samples = len(per_sample[0]), len(per_sample)
    if n_crops == 0:
        return None
    crops = [per_sample[b][i] for i in range(n_crops) for b in range(n_samples)]
    row_seeds = [seeds[b][i] for i in range(n_crops) for b in range(n_samples)]
    of = lambda kind: [c for c in crops if c.intensity == kind]  # noqa: E731
    sharpened = [c.sharpen for c in crops if c.sharpen is not None]
    sample = np.tile(np.arange(n_samples, dtype=np.int64), n_crops)
    return {
        "size": crops[0].out_size,
        "samples": n_samples,
        "sample": sample,
        "start": np.array([c.start for c in crops], dtype=np.int64) - np.array(origins, np.int64)[sample],
        "extent": np.array([c.size for c in crops], dtype=np.int64),
        "axes": np.array([c.orientation.axes for c in crops], dtype=np.int64),
        "flipped": np.array([[j in c.orientation.flipped for j in range(3)] for c in crops], dtype=bool),
        "contrast_rows": _rows(crops, lambda c: c.intensity == "contrast"),
        "gamma": _floats([c.gamma for c in of("contrast")]),
        "noise_rows": _rows(crops, lambda c: c.intensity == "noise"),
        "noise_std": _floats([c.noise_std for c in of("noise")]),
        "noise_seed": np.array([s for c, s in zip(crops, row_seeds) if c.intensity == "noise"], dtype=np.int64),
        "histogram_rows": _rows(crops, lambda c: c.intensity == "histogram"),
        "histogram_points": _floats([histogram_control_points(c.histogram_steps, 0.0, 1.0) for c in of("histogram")],
                                    _points(crops)),
        "blur_rows": _rows(crops, lambda c: c.blur_sigma is not None),
        "blur_sigma": _floats([c.blur_sigma for c in crops if c.blur_sigma is not None], 3),
        "sharpen_rows": _rows(crops, lambda c: c.sharpen is not None),
        "sharpen_sigma1": _floats([d.sigma1 for d in sharpened], 3),
        "sharpen_sigma2": _floats([d.sigma2 for d in sharpened], 3),
        "sharpen_alpha": _floats([d.alpha for d in sharpened]),
        "gibbs_rows": _rows(crops, lambda c: c.gibbs_alpha is not None),
        "gibbs_alpha": _floats([c.gibbs_alpha for c in crops if c.gibbs_alpha is not None]),
    }


def _points(crops: Sequence[CropDraw]) -> int:
    """Control points of the group's histogram shifts (the same for every crop of a run)."""
    return next((len(c.histogram_steps) + 2 for c in crops if c.intensity == "histogram"), 0)
