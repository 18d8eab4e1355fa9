"""A position embedding the ONNX tracer can follow to any input size, equal to the model's own.

:meth:`VisionTransformer3D.interpolate_pos_encoding` returns the stored embedding when the patch
grid is the native one and resamples it with ``F.interpolate(scale_factor=...)`` otherwise. Both
the Python branch and the scale factor are computed from sizes in Python, so a traced graph keeps
whatever the example input chose: exported at the native size, every other size fails (or, with
the same number of tokens, silently uses the wrong embedding). Here the same resampling is written
as tensor operations on the token grid: per axis, a ``(new, native)`` matrix of linear
interpolation weights built from ``arange(new)``, and the three applied with one ``einsum``.

It reproduces PyTorch's CPU kernel (``upsample_trilinear3d``, ``align_corners=False``): source
coordinate ``(i + 0.5) * scale - 0.5`` clamped at 0, ``scale = native / (new + offset)``; an axis
whose size does not change is copied as it is (the kernel skips it), which also makes the native
grid return the stored embedding exactly.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch

from dinov2.models.vision_transformer import VisionTransformer3D


def axis_weights(native: int, new: int, offset: float) -> torch.Tensor:
    """Linear interpolation weights from ``native`` positions to ``new`` positions along one axis.

    Args:
        native: the embedding's number of positions along the axis.
        new: the token grid's (traced: it comes from the input's shape).
        offset: the backbone's ``interpolate_offset`` (0: the exact size ratio).

    Returns:
        float32 ``(new, native)``; row ``i`` holds at most two non-zero weights summing to 1, and
        the identity when ``new == native``.
    """
    i = torch.arange(new).to(torch.float32)
    count = torch.ones_like(i).sum()  # ``new`` as a tensor, so the graph computes the scale from the input
    source = ((i + 0.5) * (native / (count + offset)) - 0.5).clamp(min=0.0)
    low = source.floor().clamp(max=native - 1)
    frac = (source - low).clamp(0.0, 1.0)
    high = (low + 1).clamp(max=native - 1)
    columns = torch.arange(native, dtype=torch.float32)[None, :]
    weights = ((columns == low[:, None]).to(torch.float32) * (1 - frac)[:, None]
               + (columns == high[:, None]).to(torch.float32) * frac[:, None])
    identity = (columns == i[:, None]).to(torch.float32)
    return torch.where(count == native, identity, weights)


def traced_pos_encoding(backbone: VisionTransformer3D, grid: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """Position embedding ``(1, 1 + h*w*d, E)`` for a patch grid ``(h, w, d)``, as tensor operations.

    Equal to ``backbone.interpolate_pos_encoding(grid, dtype)`` on the CPU (within float rounding),
    for any grid, with no Python branch on the grid.
    """
    pos = backbone.pos_embed
    dim = pos.shape[-1]
    native = backbone.patch_grid
    patches = pos[0, 1:].float().reshape(*native, dim)
    weights = [axis_weights(n, g, backbone.interpolate_offset) for n, g in zip(native, grid)]
    resampled = torch.einsum("abce,ha,wb,dc->hwde", patches, *weights).reshape(1, -1, dim)
    return torch.cat([pos[:, :1].float(), resampled], dim=1).to(dtype)


@contextlib.contextmanager
def traceable_position_embedding(backbone: VisionTransformer3D) -> Iterator[None]:
    """Within this block ``backbone`` computes its position embedding with :func:`traced_pos_encoding`.

    Only this instance changes, and only until the block ends (the class method is restored by
    removing the instance attribute): training and PyTorch inference never see it.
    """
    backbone.interpolate_pos_encoding = types.MethodType(traced_pos_encoding, backbone)
    try:
        yield
    finally:
        del backbone.interpolate_pos_encoding
