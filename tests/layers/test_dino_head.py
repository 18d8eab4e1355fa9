"""DINO/iBOT projection head: checkpoint key names, frozen prototype norms, low-precision safety."""

import pytest
import torch

from dinov2.layers.dino_head import DINOHead, WeightNormLinear

# Published 3DINO-ViT-L teacher checkpoint, dino_head.* / ibot_head.* (shared/formats/).
PUBLISHED_HEAD = {
    "mlp.0.weight": (2048, 1024),
    "mlp.0.bias": (2048,),
    "mlp.2.weight": (2048, 2048),
    "mlp.2.bias": (2048,),
    "mlp.4.weight": (256, 2048),
    "mlp.4.bias": (256,),
    "last_layer.weight_g": (65536, 1),
    "last_layer.weight_v": (65536, 256),
}


def small_head(**kwargs):
    torch.manual_seed(0)
    return DINOHead(in_dim=16, out_dim=40, hidden_dim=24, bottleneck_dim=8, **kwargs)


def test_state_dict_matches_published_checkpoint():
    with torch.device("meta"):  # full-size shapes without allocating 80 MB
        head = DINOHead(in_dim=1024)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == PUBLISHED_HEAD


def test_output_shape_and_cosine_range():
    head = small_head()
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 40)
    tokens = head(torch.randn(2, 7, 16))  # patch tokens keep their leading dims
    assert tokens.shape == (2, 7, 40)
    assert out.abs().max() <= 1.0 + 1e-5


def test_prototype_norm_frozen_at_one():
    head = small_head()
    assert not head.last_layer.weight_g.requires_grad
    assert torch.equal(head.last_layer.weight_g, torch.ones(40, 1))
    with torch.no_grad():
        head.last_layer.weight_v.mul_(torch.rand(40, 1) * 10 + 0.1)  # rows of any length
    row_norms = head.last_layer.weight.norm(dim=1)
    assert torch.allclose(row_norms, torch.ones(40), atol=1e-5)
    head(torch.randn(3, 16)).sum().backward()
    assert head.last_layer.weight_g.grad is None
    assert head.last_layer.weight_v.grad is not None and head.mlp[0].weight.grad is not None


def test_trainable_norm_option():
    head = small_head(norm_last_layer=False)
    assert head.last_layer.weight_g.requires_grad
    with torch.no_grad():
        head.last_layer.weight_g.fill_(2.0)
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.full((40,), 2.0), atol=1e-5)


def test_weight_norm_linear_formula():
    layer = WeightNormLinear(3, 2, train_norm=True)
    with torch.no_grad():
        layer.weight_v.copy_(torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]]))
        layer.weight_g.copy_(torch.tensor([[5.0], [0.5]]))
    x = torch.tensor([[1.0, 1.0, 1.0]])
    # Row 0: 5 * (3, 4, 0) / 5 -> 7 ; row 1: 0.5 * (0, 0, 1) -> 0.5.
    assert torch.allclose(layer(x), torch.tensor([[7.0, 0.5]]))


def test_initialisation():
    torch.manual_seed(0)
    head = DINOHead(in_dim=256, out_dim=32, hidden_dim=512, bottleneck_dim=64)
    for index in (0, 2, 4):
        linear = head.mlp[index]
        assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert isinstance(head.mlp[1], torch.nn.GELU) and isinstance(head.mlp[3], torch.nn.GELU)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_forward_has_no_nan(dtype):
    head = small_head().to(dtype)
    # Zero input makes the bottleneck exactly zero (zero biases): normalising it is 0/eps,
    # which is NaN if eps underflows in the working dtype.
    for x in (torch.zeros(3, 16, dtype=dtype), 1e-4 * torch.randn(3, 16).to(dtype)):
        out = head(x)
        assert out.dtype == dtype
        assert torch.isfinite(out).all()


def test_autocast_forward_has_no_nan():
    head = small_head()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = head(torch.zeros(4, 16))
    assert torch.isfinite(out).all()


def test_variants_and_errors():
    one = DINOHead(in_dim=16, out_dim=10, hidden_dim=12, bottleneck_dim=4, nlayers=1)
    assert [k for k in one.state_dict() if k.startswith("mlp")] == ["mlp.0.weight", "mlp.0.bias"]
    bn = DINOHead(in_dim=16, out_dim=10, hidden_dim=12, bottleneck_dim=4, nlayers=2, use_bn=True)
    assert isinstance(bn.mlp[1], torch.nn.BatchNorm1d) and bn(torch.randn(3, 16)).shape == (3, 10)
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(in_dim=16, nlayers=0)
