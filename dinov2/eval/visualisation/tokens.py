"""Last-block patch tokens and CLS attention of a whole volume, and their way back to its voxels.

Three ways to feed a volume of any size to the backbone (``input_type``):

* ``full_image``: pad each axis at its end to a multiple of the patch size, one forward pass;
* ``resize``: resample (trilinear) to ``image_size``, one forward pass;
* ``sliding_window``: pad as for ``full_image`` (and up to ``image_size``), then MONAI's
  ``sliding_window_inference`` over windows of ``image_size`` whose step is a whole number of
  patches; overlapping windows' token maps are averaged.

Before that, the axes are permuted as in pretraining (two in-plane axes first, see
:func:`dinov2.data.transforms.in_plane_axis_order`). :func:`to_voxels` undoes every step
exactly: token maps are upsampled trilinearly (each token covers its patch, cell-centred), the
padding is cropped (or the resize inverted) and the axes are put back, giving maps with the
input's shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from dinov2.data.transforms import in_plane_axis_order
from dinov2.layers.patch_embed import to_3tuple

from .attention import last_block_attention

INPUT_TYPES = ("full_image", "resize", "sliding_window")
PAD_VALUE = -1.0  # background after the pretraining intensity scaling


@dataclass(frozen=True)
class TokenGeometry:
    """How a token grid relates to the input voxels.

    Attributes:
        input_type: one of :data:`INPUT_TYPES`.
        input_shape: ``(X, Y, Z)`` of the input.
        perm: spatial axis permutation applied before the backbone.
        model_shape: spatial size of what the backbone (or the window stitching) covered, in
            permuted axes: the padded size, or ``image_size`` for ``resize``.
        grid: token grid ``(h, w, d)`` (permuted axes).
    """

    input_type: str
    input_shape: tuple[int, int, int]
    perm: tuple[int, int, int]
    model_shape: tuple[int, int, int]
    grid: tuple[int, int, int]


@dataclass
class TokenMaps:
    """Per-token maps of one volume (permuted axes, see :class:`TokenGeometry`).

    Attributes:
        features: ``(E, h, w, d)`` last block's normalised patch tokens, or None.
        attention: ``(heads, h, w, d)`` CLS-to-patch attention of the last block, each head
            summing to 1 over the tokens, or None.
        geometry: the mapping back to voxels.
    """

    features: torch.Tensor | None
    attention: torch.Tensor | None
    geometry: TokenGeometry


def _patch_multiple(size: int, patch: int) -> int:
    return int(math.ceil(size / patch) * patch)


def _grid_features(model: torch.nn.Module, x: torch.Tensor, want_features: bool, want_attention: bool) -> torch.Tensor:
    """``(B, C, H, W, D)`` → ``(B, E + heads, h, w, d)`` (the requested parts, in that order)."""
    grid = model.patch_embed.grid_size(x.shape[2:])
    parts = []
    if want_features:
        tokens = model.forward_features(x)["x_norm_patchtokens"]  # (B, N, E), d fastest
        parts.append(tokens.reshape(x.shape[0], *grid, -1).permute(0, 4, 1, 2, 3))
    if want_attention:
        parts.append(last_block_attention(model, x))
    return torch.cat(parts, dim=1)


def _sliding_overlap(window: tuple[int, ...], overlap: float, patch: int) -> list[float]:
    """Per-axis overlap whose window step is a whole number of patches (so every window starts on
    a patch boundary and MONAI's zoomed output positions are exact)."""
    out = []
    for size in window:
        step = max(patch, int(round(size * (1.0 - overlap) / patch)) * patch)
        step = min(step, size)
        value = 1.0 - step / size
        # MONAI takes int(size * (1 - overlap)); stay a hair below the ratio so rounding cannot lose a voxel.
        value = max(0.0, value - 1e-7) if step < size else 0.0
        if int(size * (1.0 - value)) != step:
            raise RuntimeError(f"Could not express a window step of {step} voxels as an overlap of a {size} window.")
        out.append(value)
    return out


@torch.no_grad()
def compute_token_maps(model: torch.nn.Module, volume: torch.Tensor, spacing: Sequence[float], input_type: str,
                       image_size: int | Sequence[int] | None = None, overlap: float = 0.5,
                       features: bool = True, attention: bool = False, sw_batch_size: int = 1) -> TokenMaps:
    """Token maps of one volume.

    Args:
        model: a :class:`dinov2.models.VisionTransformer3D` (eval mode).
        volume: ``(1, C, X, Y, Z)`` scaled intensities.
        spacing: voxel size of ``(X, Y, Z)`` (decides the pretraining axis order).
        input_type: one of :data:`INPUT_TYPES`.
        image_size: ``resize`` target / ``sliding_window`` window (default: the model's native
            ``img_size``); a multiple of the patch size.
        overlap: wanted overlap of sliding windows (rounded to whole patches).
        features: compute the patch-token features.
        attention: compute the CLS attention of the last block.
        sw_batch_size: windows per forward pass.

    Returns:
        :class:`TokenMaps`.
    """
    if input_type not in INPUT_TYPES:
        raise ValueError(f"input_type must be one of {INPUT_TYPES}, got {input_type!r}")
    if volume.ndim != 5 or volume.shape[0] != 1:
        raise ValueError(f"volume must be (1, C, X, Y, Z), got {tuple(volume.shape)}")
    if not features and not attention:
        raise ValueError("Ask for features, attention or both.")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    patch = model.patch_embed.patch_size[0]
    if len(set(model.patch_embed.patch_size)) != 1:
        raise ValueError(f"Only cubic patches are supported here, got {model.patch_embed.patch_size}")
    input_shape = tuple(int(s) for s in volume.shape[2:])
    perm = in_plane_axis_order(spacing, input_shape)
    x = volume.permute(0, 1, *(2 + p for p in perm)).float().to(model.pos_embed.device)
    size = to_3tuple(image_size) if image_size is not None else tuple(model.img_size)
    model.patch_embed.grid_size(size)  # raises a clear error for a size that is not a patch multiple

    if input_type == "resize":
        model_shape = size
        x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    else:
        model_shape = tuple(_patch_multiple(s, patch) for s in x.shape[2:])
        if input_type == "sliding_window":
            model_shape = tuple(max(m, w) for m, w in zip(model_shape, size))
        pad = []
        for s, m in zip(reversed(x.shape[2:]), reversed(model_shape)):
            pad += [0, m - s]
        x = F.pad(x, pad, value=PAD_VALUE)
    if input_type == "sliding_window":
        window = tuple(int(w) for w in size)
        out = sliding_window_inference(
            x, roi_size=window, sw_batch_size=sw_batch_size,
            predictor=lambda w: _grid_features(model, w, features, attention),
            overlap=_sliding_overlap(window, overlap, patch), mode="constant")
        out = torch.as_tensor(out)
    else:
        out = _grid_features(model, x, features, attention)
    out = out[0].float().cpu()
    grid = tuple(int(s) for s in out.shape[1:])
    if grid != tuple(m // patch for m in model_shape):
        raise RuntimeError(f"Token grid {grid} does not match the covered size {model_shape} / {patch}.")
    embed = model.embed_dim if features else 0
    feats = out[:embed] if features else None
    attn = None
    if attention:
        attn = out[embed:]
        attn = attn / attn.flatten(1).sum(dim=1).view(-1, 1, 1, 1)  # stitched windows: renormalise per head
    geometry = TokenGeometry(input_type, input_shape, tuple(perm), tuple(model_shape), grid)  # type: ignore[arg-type]
    return TokenMaps(feats, attn, geometry)


def to_voxels(maps: torch.Tensor, geometry: TokenGeometry, mode: str = "trilinear") -> torch.Tensor:
    """Bring token maps back to the input's voxel grid.

    Args:
        maps: ``(K, h, w, d)`` on the token grid of ``geometry``.
        geometry: from :func:`compute_token_maps`.
        mode: ``trilinear`` (smooth) or ``nearest`` (each voxel shows its patch's value).

    Returns:
        ``(K, X, Y, Z)`` in the input's axis order and shape.
    """
    if tuple(maps.shape[1:]) != geometry.grid:
        raise ValueError(f"maps of grid {tuple(maps.shape[1:])} do not match the geometry's {geometry.grid}")
    x = maps[None].float()
    permuted_input = tuple(geometry.input_shape[p] for p in geometry.perm)
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    if geometry.input_type == "resize":
        x = F.interpolate(x, size=permuted_input, mode=mode, **kwargs)
    else:
        x = F.interpolate(x, size=geometry.model_shape, mode=mode, **kwargs)
        x = x[:, :, : permuted_input[0], : permuted_input[1], : permuted_input[2]]
    inverse = [geometry.perm.index(a) for a in range(3)]
    return x[0].permute(0, *(1 + i for i in inverse)).contiguous()


def token_fraction(mask: torch.Tensor, geometry: TokenGeometry) -> torch.Tensor:
    """Fraction of each token's patch covered by a voxel mask.

    Args:
        mask: bool/float ``(X, Y, Z)`` in the input's axes.
        geometry: from :func:`compute_token_maps`.

    Returns:
        ``(h, w, d)`` values in ``[0, 1]`` (padding counts as outside the mask).
    """
    x = mask.float().permute(*geometry.perm)[None, None]
    if geometry.input_type == "resize":
        x = F.interpolate(x, size=geometry.model_shape, mode="trilinear", align_corners=False)
    else:
        pad = []
        for s, m in zip(reversed(x.shape[2:]), reversed(geometry.model_shape)):
            pad += [0, m - s]
        x = F.pad(x, pad, value=0.0)
    return F.adaptive_avg_pool3d(x, geometry.grid)[0, 0]
