"""iBOT token masks for a 3D grid of patch tokens.

A global crop of size ``(H, W, D)`` cut into ``p``-voxel patches gives a token grid
``(h, w, d) = (H // p, W // p, D // p)``. :class:`MaskingGenerator3d` returns a boolean array of
that shape with exactly the requested number of ``True`` (masked) tokens, either scattered
uniformly (``mode="random"``) or grouped into random cuboids (``mode="block"``, the 3D analogue
of BEiT/iBOT block-wise masking).

Its flattened C-order matches the token order of a ``Conv3d`` patch embedding flattened over
``(h, w, d)``, so ``mask.reshape(-1)`` lines up with the backbone's patch tokens.

Randomness comes only from an explicit ``numpy.random.Generator`` (held by the generator or
passed per call), never from numpy's global state, so masks are reproducible per seed and
independent across DataLoader workers that pass their own generators.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

MASK_MODES = ("random", "block")


def _validate_grid(input_size: Sequence[int]) -> tuple[int, int, int]:
    try:
        grid = tuple(int(s) for s in input_size)
    except TypeError as exc:
        raise ValueError(f"input_size must be three ints (h, w, d) of tokens per axis, got {input_size!r}.") from exc
    if len(grid) != 3 or any(s < 1 for s in grid):
        raise ValueError(
            f"input_size must be three positive ints (h, w, d) = crop size // patch size per axis, got {input_size!r}."
        )
    return grid  # type: ignore[return-value]


class MaskingGenerator3d:
    """Draws boolean iBOT masks over a ``(h, w, d)`` token grid.

    Args:
        input_size: tokens per axis ``(h, w, d)`` (crop size // patch size).
        mode: ``"random"`` masks tokens chosen uniformly without replacement; ``"block"`` masks
            random cuboids (random volume in ``[min_num_patches, max_num_patches]``, random
            log-uniform aspect ratios in ``[min_aspect, max_aspect]``) until the target count is
            reached. A cuboid that would overshoot the target is rejected; when no cuboid fits
            any more (the remainder is smaller than ``min_num_patches`` or ``max_attempts``
            draws in a row added nothing) the mask is topped up with unmasked tokens that touch
            the masked region (6-neighbourhood), so the count is always exact and the top-up
            stays clustered. As with 2D block-wise masking, cuboids lie fully inside the grid,
            so central tokens are masked more often than border ones (about 7x corner vs
            centre for 40 of 6x6x6 tokens).
        min_num_patches: smallest cuboid volume in tokens (block mode).
        max_num_patches: largest cuboid volume in tokens (block mode); ``None`` means no limit
            other than the remaining count.
        min_aspect: smallest side ratio of a cuboid (block mode); ``max_aspect`` defaults to
            ``1 / min_aspect``.
        max_aspect: largest side ratio of a cuboid (block mode).
        max_attempts: cuboid draws without progress before switching to the top-up.
        seed: seed of the generator held for calls that pass no ``rng``; ``None`` seeds it from
            OS entropy (numpy's ``default_rng(None)``).

    Example:
        >>> gen = MaskingGenerator3d((6, 6, 6), mode="block", seed=0)
        >>> mask = gen(80)
        >>> mask.shape, int(mask.sum())
        ((6, 6, 6), 80)
    """

    def __init__(
        self,
        input_size: Sequence[int],
        mode: str = "random",
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_attempts: int = 10,
        seed: int | None = None,
    ) -> None:
        self.input_size = _validate_grid(input_size)
        self.num_tokens = int(np.prod(self.input_size))
        if mode not in MASK_MODES:
            raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}.")
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}.")
        if max_num_patches is not None and max_num_patches < min_num_patches:
            raise ValueError(
                f"max_num_patches ({max_num_patches}) must be >= min_num_patches ({min_num_patches}) or None."
            )
        max_aspect = 1.0 / min_aspect if max_aspect is None and min_aspect > 0 else max_aspect
        if not (min_aspect > 0 and max_aspect is not None and max_aspect >= min_aspect):
            raise ValueError(
                f"Aspect ratios must satisfy 0 < min_aspect <= max_aspect, got min_aspect={min_aspect}, "
                f"max_aspect={max_aspect}."
            )
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}.")
        self.mode = mode
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = None if max_num_patches is None else int(max_num_patches)
        self.log_aspect_range = (math.log(min_aspect), math.log(max_aspect))
        self.max_attempts = int(max_attempts)
        self.rng = np.random.default_rng(seed)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size={self.input_size}, mode={self.mode!r}, "
            f"min_num_patches={self.min_num_patches}, max_num_patches={self.max_num_patches})"
        )

    def __call__(self, num_masking_patches: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """Draw one mask.

        Args:
            num_masking_patches: exact number of tokens to mask, in ``[0, h * w * d]``.
            rng: generator to draw from; ``None`` uses the one held by this object.

        Returns:
            Boolean array ``(h, w, d)`` with exactly ``num_masking_patches`` ``True`` entries.
        """
        num_masking_patches = int(num_masking_patches)
        if not 0 <= num_masking_patches <= self.num_tokens:
            raise ValueError(
                f"num_masking_patches must be in [0, {self.num_tokens}] for a {self.input_size} token grid, "
                f"got {num_masking_patches}."
            )
        rng = self.rng if rng is None else rng
        if self.mode == "random":
            flat = np.zeros(self.num_tokens, dtype=bool)
            flat[rng.choice(self.num_tokens, size=num_masking_patches, replace=False)] = True
            return flat.reshape(self.input_size)
        return self._block_mask(num_masking_patches, rng)

    def _block_mask(self, target: int, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros(self.input_size, dtype=bool)
        count = 0
        attempts_without_progress = 0
        while count < target and attempts_without_progress < self.max_attempts:
            remaining = target - count
            max_volume = remaining if self.max_num_patches is None else min(remaining, self.max_num_patches)
            if max_volume < self.min_num_patches:
                break
            added = self._add_cuboid(mask, rng, max_volume, remaining)
            count += added
            attempts_without_progress = 0 if added else attempts_without_progress + 1
        if count < target:
            self._top_up(mask, target - count, rng)
        return mask

    def _add_cuboid(self, mask: np.ndarray, rng: np.random.Generator, max_volume: int, remaining: int) -> int:
        """Masks one random cuboid in place if it adds 1..``remaining`` new tokens; returns how many."""
        volume = rng.uniform(self.min_num_patches, max_volume)
        # Two independent log-uniform ratios (w/h and d/h) give every elongation direction a chance.
        ratio_w, ratio_d = np.exp(rng.uniform(*self.log_aspect_range, size=2))
        side_h = (volume / (ratio_w * ratio_d)) ** (1.0 / 3.0)
        sides = [side_h, side_h * ratio_w, side_h * ratio_d]
        sides = [min(max(int(round(s)), 1), n) for s, n in zip(sides, self.input_size)]
        starts = [int(rng.integers(0, n - s + 1)) for s, n in zip(sides, self.input_size)]
        box = tuple(slice(st, st + s) for st, s in zip(starts, sides))
        new_tokens = int(sides[0] * sides[1] * sides[2] - mask[box].sum())
        if new_tokens == 0 or new_tokens > remaining:
            return 0
        mask[box] = True
        return new_tokens

    def _top_up(self, mask: np.ndarray, missing: int, rng: np.random.Generator) -> None:
        """Masks ``missing`` more tokens in place, preferring unmasked neighbours of the mask."""
        while missing > 0:
            frontier = _face_neighbours(mask) & ~mask
            candidates = np.flatnonzero(frontier)
            if candidates.size == 0:  # empty mask: nothing to grow from, seed anywhere unmasked
                candidates = np.flatnonzero(~mask)
            chosen = rng.choice(candidates, size=min(missing, candidates.size), replace=False)
            mask.flat[chosen] = True
            missing -= chosen.size


def _face_neighbours(mask: np.ndarray) -> np.ndarray:
    """The mask dilated by its 6-neighbourhood: masked tokens and those sharing a face with one."""
    grown = mask.copy()
    for axis in range(3):
        lower = [slice(None)] * 3
        upper = [slice(None)] * 3
        lower[axis] = slice(0, -1)
        upper[axis] = slice(1, None)
        grown[tuple(lower)] |= mask[tuple(upper)]
        grown[tuple(upper)] |= mask[tuple(lower)]
    return grown
