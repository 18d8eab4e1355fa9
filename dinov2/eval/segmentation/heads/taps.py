"""Which transformer blocks a segmentation head reads: derived from the depth, never hard-coded."""

from __future__ import annotations

NUM_TAPS = 4


def evenly_spaced_taps(depth: int, num_taps: int = NUM_TAPS) -> list[int]:
    """0-based indices of ``num_taps`` blocks spread evenly over the depth, the last one included.

    ``(depth * k) // num_taps - 1`` for ``k = 1..num_taps``: blocks 3, 6, 9, 12 of 12 and 6, 12,
    18, 24 of 24 (1-based), i.e. ``depth // 4 * k - 1`` whenever the depth is a multiple of 4.
    For other depths the last tap is still the last block, so the deepest features are used.

    Args:
        depth: number of blocks of the backbone.
        num_taps: number of blocks to read.

    Returns:
        Sorted, distinct 0-based block indices.

    Example:
        >>> evenly_spaced_taps(12)
        [2, 5, 8, 11]
    """
    if num_taps < 1:
        raise ValueError(f"num_taps must be >= 1, got {num_taps}")
    if depth < num_taps:
        raise ValueError(
            f"A backbone of depth {depth} cannot give {num_taps} distinct taps; "
            f"use a backbone with at least {num_taps} blocks.")
    return [(depth * k) // num_taps - 1 for k in range(1, num_taps + 1)]


def last_taps(depth: int, num_taps: int = NUM_TAPS) -> list[int]:
    """0-based indices of the last ``num_taps`` blocks (the linear probe's input).

    Example:
        >>> last_taps(12)
        [8, 9, 10, 11]
    """
    if depth < num_taps:
        raise ValueError(
            f"A backbone of depth {depth} has fewer than {num_taps} blocks to read; "
            f"use a backbone with at least {num_taps} blocks.")
    return list(range(depth - num_taps, depth))
