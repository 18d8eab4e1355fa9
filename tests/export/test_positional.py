"""The traceable position embedding equals the backbone's own for every grid, offset and axis mix."""

from __future__ import annotations

import pytest
import torch

from dinov2.export.positional import axis_weights, traceable_position_embedding, traced_pos_encoding
from dinov2.models import build_model


@pytest.mark.parametrize("offset", [0.1, 0.0])
@pytest.mark.parametrize("grid", [(4, 3, 2), (4, 3, 5), (2, 3, 2), (7, 1, 9), (4, 6, 8)])
def test_traced_embedding_equals_the_models(offset, grid):
    torch.manual_seed(0)
    backbone = build_model("vit_tiny_3d", embed_dim=32, depth=1, num_heads=2, patch_size=8, img_size=(32, 24, 16),
                           interpolate_offset=offset)
    with torch.no_grad():
        backbone.pos_embed.normal_()
    expected = backbone.interpolate_pos_encoding(grid, torch.float32)
    got = traced_pos_encoding(backbone, grid, torch.float32)
    assert got.shape == expected.shape and (got - expected).abs().max() <= 1e-5
    if grid == backbone.patch_grid:
        assert torch.equal(got, expected)  # the native grid gives the stored embedding itself


def test_axis_weights_rows_are_convex_and_the_native_size_is_the_identity():
    weights = axis_weights(4, 7, 0.1)
    assert weights.shape == (7, 4) and torch.allclose(weights.sum(1), torch.ones(7))
    assert bool((weights >= 0).all()) and torch.equal(axis_weights(5, 5, 0.1), torch.eye(5))


def test_the_replacement_lasts_only_for_the_block():
    backbone = build_model("vit_tiny_3d", embed_dim=32, depth=1, num_heads=2, patch_size=8, img_size=16)
    with traceable_position_embedding(backbone):
        assert backbone.interpolate_pos_encoding.__func__ is traced_pos_encoding
    assert "interpolate_pos_encoding" not in vars(backbone)
