"""Batch multi-crop samples and draw the iBOT masks of the global crops.

Each sample is ``{"global_crops": [Tensor(C, G, G, G)] * n_global, "local_crops":
[Tensor(C, L, L, L)] * n_local}`` (the 3D augmentation's output). Crops are stacked crop-major
(every sample's crop 0, then every sample's crop 1, ...) because the meta-architecture splits
the teacher's outputs back into per-crop chunks of ``B`` with ``chunk``.

A fraction ``mask_probability`` of the global crops receives an iBOT mask; their mask ratios
are stratified over ``mask_ratio_tuple`` so that one batch always spans light and heavy masking
instead of relying on luck. The loss side needs the masked positions in three forms: the
boolean ``collated_masks`` for the student's mask token, ``mask_indices_list`` to gather the
masked tokens, and ``masks_weight`` so that every masked crop contributes equally however many
tokens it masks.

Random draws come from an explicit ``numpy.random.Generator``. When none is passed, one is
seeded from torch's global generator at every call: DataLoader seeds torch differently in each
worker (and reproducibly under ``torch.manual_seed``), so workers draw different masks while a
seeded run repeats itself, and the draw is part of the torch RNG state that checkpoints keep.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from dinov2.data.crop_boxes import CROP_BOXES_KEY, collate_crop_boxes, global_crop_rows, is_cut_batch
from dinov2.data.masking import MaskingGenerator3d
from dinov2.utils.config import with_packaged_defaults

MaskGenerator = Callable[[int, np.random.Generator], np.ndarray]
Allocate = Callable[[Mapping[str, tuple[tuple[int, ...], torch.dtype]]], dict[str, torch.Tensor]]


def _crop_shape(samples: Sequence[Mapping[str, Any]], key: str) -> tuple[int, ...] | None:
    """Shape ``(n_crops * B, C, *spatial)`` of the crop-major stack of ``samples[b][key]``; ``None``
    when the samples hold no such crops."""
    counts = {len(sample.get(key, ()) or ()) for sample in samples}
    if len(counts) != 1:
        raise ValueError(
            f"Every sample must hold the same number of '{key}', got counts {sorted(counts)}; "
            "check the augmentation's crop settings."
        )
    (n_crops,) = counts
    if n_crops == 0:
        return None
    shapes = {tuple(sample[key][i].shape) for sample in samples for i in range(n_crops)}
    if len(shapes) != 1:
        raise ValueError(f"All '{key}' must have one shape to be stacked, got {sorted(shapes)}.")
    return (n_crops * len(samples), *shapes.pop())


def _fill_crop_major(samples: Sequence[Mapping[str, Any]], key: str, out: torch.Tensor) -> torch.Tensor:
    """Copies ``samples[b][key][i]`` into ``out[i * B + b]`` (cast to ``out.dtype``) and returns ``out``."""
    batch = len(samples)
    for b, sample in enumerate(samples):
        for i, crop in enumerate(sample[key]):
            # Plain tensors: MONAI MetaTensor affines mean nothing for a batch of random crops and
            # would be carried (and checked) through every op.
            out[i * batch + b].copy_(torch.as_tensor(crop).as_subclass(torch.Tensor))
    return out


def _validate_settings(
    mask_ratio_tuple: Sequence[float], mask_probability: float, n_tokens_per_side: Sequence[int] | None
) -> tuple[tuple[float, float], float, tuple[int, int, int]]:
    """Checks the masking settings and returns them as ``(ratios, probability, grid)``."""
    ratios = tuple(float(r) for r in mask_ratio_tuple)
    if len(ratios) != 2 or not 0.0 <= ratios[0] <= ratios[1] <= 1.0:
        raise ValueError(
            f"mask_ratio_tuple must be (min, max) with 0 <= min <= max <= 1, got {tuple(mask_ratio_tuple)}."
        )
    if not 0.0 <= float(mask_probability) <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}.")
    if n_tokens_per_side is None:
        raise ValueError(
            "n_tokens_per_side (h, w, d) is required: global crop size // patch size per axis; "
            "make_collate_fn computes it from the config."
        )
    grid = tuple(int(n) for n in n_tokens_per_side)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"n_tokens_per_side must be three positive ints (h, w, d), got {tuple(n_tokens_per_side)}.")
    return ratios, float(mask_probability), grid  # type: ignore[return-value]


def _generator_from_torch() -> np.random.Generator:
    """A fresh generator seeded by torch's global generator (seeded per DataLoader worker)."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return np.random.default_rng(seed)


def collate_data_and_cast(
    samples: Sequence[Mapping[str, Any]],
    mask_ratio_tuple: tuple[float, float] = (0.2, 0.75),
    mask_probability: float = 0.5,
    n_tokens_per_side: Sequence[int] | None = None,
    mask_generator: MaskGenerator | None = None,
    dtype: torch.dtype = torch.float32,
    rng: np.random.Generator | None = None,
    allocate: Allocate | None = None,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Collates multi-crop samples and draws iBOT masks for some global crops.

    Args:
        samples: ``B`` dicts, each with ``"global_crops"`` (list of ``n_global`` tensors
            ``(C, G, G, G)``) and optionally ``"local_crops"`` (list of ``n_local`` tensors
            ``(C, L, L, L)``); every sample holds the same numbers of crops.
        mask_ratio_tuple: ``(min, max)`` fraction of tokens masked in a masked crop.
        mask_probability: fraction of the ``n_global * B`` global crops that get a mask;
            ``int(n_global * B * mask_probability)`` crops are masked.
        n_tokens_per_side: token grid ``(h, w, d)`` of a global crop (crop size // patch size).
        mask_generator: callable ``(num_tokens_to_mask, rng) -> bool array (h, w, d)``, such as a
            :class:`~dinov2.data.masking.MaskingGenerator3d`; ``None`` masks uniformly at random.
        dtype: dtype of the collated crops (e.g. ``torch.bfloat16`` for mixed precision).
        rng: generator for the ratios, the choice of masked crops and the masks; ``None`` seeds
            one from torch's global generator (see the module docstring).
        allocate: ``{key: (shape, dtype)} -> {key: Tensor}``, where the output tensors are made
            (e.g. :func:`dinov2.data.shared_batches.allocate_batch`, one shared block per batch
            in a loader worker); ``None``: new tensors.
        extra: further tensors returned under their own keys, stored with the others (e.g.
            the samples' stream positions).

    Returns:
        Dict with
            ``collated_global_crops``: ``(n_global * B, C, G, G, G)`` in ``dtype``, crop-major,
            a plain ``torch.Tensor`` (MetaTensor metadata is dropped);
            ``collated_local_crops``: ``(n_local * B, C, L, L, L)`` in ``dtype``, crop-major, or
            ``None`` when the samples hold no local crops;
            ``collated_masks``: bool ``(n_global * B, h * w * d)``, tokens in C-order of
            ``(h, w, d)`` (the order of a flattened ``Conv3d`` patch embedding);
            ``mask_indices_list``: long ``(M,)``, indices of the masked tokens in
            ``collated_masks.flatten()``;
            ``masks_weight``: float32 ``(M,)``, ``1 / (masked tokens of its crop)`` per masked
            token, so each masked crop's weights sum to 1;
            ``n_masked_patches``: long ``(1,)`` holding ``M``;
            ``upperbound``: int, an upper bound of ``M`` for any draw with these settings
            (sum over masked crops of the token count at the top of their stratum), for
            allocating fixed-size buffers;
            and the ``extra`` tensors (copies).

    Example:
        >>> crop = torch.zeros(1, 32, 32, 32)
        >>> out = collate_data_and_cast([{"global_crops": [crop, crop]}] * 2,
        ...                             n_tokens_per_side=(4, 4, 4), rng=np.random.default_rng(0))
        >>> out["collated_global_crops"].shape, out["collated_masks"].shape
        (torch.Size([4, 1, 32, 32, 32]), torch.Size([4, 64]))
    """
    if not samples:
        raise ValueError("collate_data_and_cast got an empty batch; the DataLoader's batch_size must be >= 1.")
    ratios, _, grid = _validate_settings(mask_ratio_tuple, mask_probability, n_tokens_per_side)
    if mask_generator is None:
        mask_generator = MaskingGenerator3d(grid, mode="random")
    rng = _generator_from_torch() if rng is None else rng

    if is_cut_batch(samples):  # crops.augment_on_device: boxes and draws, the training device makes the crops
        masks, upperbound = _draw_masks(global_crop_rows(samples), grid, ratios, mask_probability, mask_generator, rng)
        small = {**_mask_tensors(masks), **(extra or {})}
        out = (allocate or _new_tensors)({key: (tuple(t.shape), t.dtype) for key, t in small.items()})
        return {CROP_BOXES_KEY: collate_crop_boxes(samples), **{key: out[key].copy_(t) for key, t in small.items()},
                "upperbound": upperbound}
    global_shape = _crop_shape(samples, "global_crops")
    if global_shape is None:
        raise ValueError("Samples hold no 'global_crops'; iBOT masking needs at least one global crop per sample.")
    local_shape = _crop_shape(samples, "local_crops")
    masks, upperbound = _draw_masks(global_shape[0], grid, ratios, mask_probability, mask_generator, rng)
    small = {**_mask_tensors(masks), **(extra or {})}
    specs = {"collated_global_crops": (global_shape, dtype)}
    if local_shape is not None:
        specs["collated_local_crops"] = (local_shape, dtype)
    specs.update({key: (tuple(t.shape), t.dtype) for key, t in small.items()})
    out = (allocate or _new_tensors)(specs)
    return {
        "collated_global_crops": _fill_crop_major(samples, "global_crops", out["collated_global_crops"]),
        "collated_local_crops": None if local_shape is None else _fill_crop_major(
            samples, "local_crops", out["collated_local_crops"]),
        **{key: out[key].copy_(t) for key, t in small.items()},
        "upperbound": upperbound,
    }


def _new_tensors(specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in specs.items()}


def _draw_masks(
    n_crops: int,
    grid: tuple[int, int, int],
    ratios: tuple[float, float],
    mask_probability: float,
    mask_generator: MaskGenerator,
    rng: np.random.Generator,
) -> tuple[np.ndarray, int]:
    """Picks the masked crops, one mask ratio per stratum of ``ratios``, and draws their masks.

    Returns:
        ``(masks, upperbound)``: bool array ``(n_crops, h * w * d)`` (C-order of the grid ``(h, w,
        d)``, unmasked crops all False) and the upper bound of masked tokens for these settings.
    """
    low, high = ratios
    n_tokens = math.prod(grid)
    n_masked_crops = int(n_crops * mask_probability)
    # One ratio per stratum of [low, high]: the batch always covers the whole range.
    strata = np.linspace(low, high, n_masked_crops + 1)
    masks = np.zeros((n_crops, n_tokens), dtype=bool)
    masked_crops = rng.permutation(n_crops)[:n_masked_crops]
    for crop, (lo, hi) in zip(masked_crops, zip(strata[:-1], strata[1:])):
        num = int(n_tokens * rng.uniform(lo, hi))
        mask = np.asarray(mask_generator(num, rng))
        if mask.shape != grid or mask.dtype != bool:
            raise ValueError(
                f"mask_generator returned {mask.dtype} {mask.shape}, expected bool {grid}; "
                "build it with the same token grid as n_tokens_per_side."
            )
        masks[crop] = mask.reshape(-1)
    upperbound = int(sum(int(n_tokens * hi) for hi in strata[1:]))
    return masks, upperbound


def _mask_tensors(masks: np.ndarray) -> dict[str, torch.Tensor]:
    """The three forms of the masked positions that the loss side needs.

    Args:
        masks: bool array ``(N, T)``, ``N`` global crops of ``T`` tokens.

    Returns:
        ``collated_masks`` bool ``(N, T)``; ``mask_indices_list`` long ``(M,)`` (indices into
        ``collated_masks.flatten()``); ``masks_weight`` float32 ``(M,)`` (``1 / masked tokens of
        its crop``); ``n_masked_patches`` long ``(1,)`` holding ``M``.
    """
    n_crops, n_tokens = masks.shape
    collated_masks = torch.from_numpy(masks)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    tokens_per_crop = collated_masks.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)
    masks_weight = (1.0 / tokens_per_crop).expand(n_crops, n_tokens)[collated_masks]
    return {
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.tensor([mask_indices_list.numel()], dtype=torch.long),
    }


class CollateDataAndCast:
    """Picklable DataLoader ``collate_fn`` that calls :func:`collate_data_and_cast` with fixed settings.

    It holds no random state: each call seeds its generator from torch's global generator,
    which DataLoader seeds per worker, so worker processes never repeat each other's masks.

    Args:
        mask_ratio_tuple: ``(min, max)`` masked fraction of a masked crop's tokens.
        mask_probability: fraction of global crops that get a mask.
        n_tokens_per_side: token grid ``(h, w, d)`` of a global crop.
        mask_generator: see :func:`collate_data_and_cast`; must be picklable for worker processes.
        dtype: dtype of the collated crops.
    """

    def __init__(
        self,
        mask_ratio_tuple: tuple[float, float],
        mask_probability: float,
        n_tokens_per_side: Sequence[int],
        mask_generator: MaskGenerator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.mask_ratio_tuple, self.mask_probability, self.n_tokens_per_side = _validate_settings(
            mask_ratio_tuple, mask_probability, n_tokens_per_side
        )
        if mask_generator is None:
            mask_generator = MaskingGenerator3d(self.n_tokens_per_side, mode="random")
        self.mask_generator = mask_generator
        self.dtype = dtype

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mask_ratio_tuple={self.mask_ratio_tuple}, "
            f"mask_probability={self.mask_probability}, n_tokens_per_side={self.n_tokens_per_side}, "
            f"mask_generator={self.mask_generator!r}, dtype={self.dtype})"
        )

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Collates one batch; see :func:`collate_data_and_cast` for the output."""
        return collate_data_and_cast(
            samples,
            mask_ratio_tuple=self.mask_ratio_tuple,
            mask_probability=self.mask_probability,
            n_tokens_per_side=self.n_tokens_per_side,
            mask_generator=self.mask_generator,
            dtype=self.dtype,
        )


def _tokens_per_side(global_crops_size: int | Sequence[int], patch_size: int) -> tuple[int, int, int]:
    sizes = (global_crops_size,) * 3 if isinstance(global_crops_size, int) else tuple(global_crops_size)
    if len(sizes) != 3 or patch_size < 1 or any(int(s) % patch_size or int(s) < patch_size for s in sizes):
        raise ValueError(
            f"global_crops_size {global_crops_size} must be an int or three ints, each a positive multiple of "
            f"patch_size {patch_size}; fix crops.global_crops_size or student.patch_size in the config."
        )
    return tuple(int(s) // patch_size for s in sizes)  # type: ignore[return-value]


def make_collate_fn(
    ibot_cfg: Mapping[str, Any],
    patch_size: int,
    global_crops_size: int | Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> CollateDataAndCast:
    """Builds the training ``collate_fn`` from the config's ``ibot`` section.

    Keys read from ``ibot_cfg`` (a dict or an OmegaConf ``DictConfig``; other keys are ignored):

    - ``mask_ratio_min_max`` (required): ``[min, max]`` masked fraction of a masked crop.
    - ``mask_sample_probability`` (required): fraction of global crops that get a mask.
    - ``mask_mode``: ``"random"`` (default) or ``"block"`` (3D cuboids).
    - ``mask_block_min_tokens`` (default 4), ``mask_block_max_tokens`` (default ``None``),
      ``mask_block_min_aspect`` (default 0.3): cuboid settings for ``"block"`` mode.

    Args:
        ibot_cfg: the ``ibot`` config section.
        patch_size: ViT patch size in voxels.
        global_crops_size: global crop size, an int (cube) or ``(H, W, D)``.
        dtype: dtype of the collated crops.

    Returns:
        A picklable :class:`CollateDataAndCast`, usable with any ``num_workers``.
    """
    missing = [key for key in ("mask_ratio_min_max", "mask_sample_probability") if key not in ibot_cfg]
    if missing:
        raise ValueError(f"The ibot config section lacks {missing}; add them to the training YAML.")
    ibot_cfg = with_packaged_defaults("ibot", ibot_cfg)  # the block-mask keys' defaults live in the YAML
    grid = _tokens_per_side(global_crops_size, int(patch_size))
    max_tokens = ibot_cfg["mask_block_max_tokens"]
    mask_generator = MaskingGenerator3d(
        grid,
        mode=str(ibot_cfg["mask_mode"]),
        min_num_patches=int(ibot_cfg["mask_block_min_tokens"]),
        max_num_patches=None if max_tokens is None else int(max_tokens),
        min_aspect=float(ibot_cfg["mask_block_min_aspect"]),
    )
    return CollateDataAndCast(
        mask_ratio_tuple=tuple(ibot_cfg["mask_ratio_min_max"]),
        mask_probability=float(ibot_cfg["mask_sample_probability"]),
        n_tokens_per_side=grid,
        mask_generator=mask_generator,
        dtype=dtype,
    )
