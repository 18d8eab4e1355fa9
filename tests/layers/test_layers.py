"""Building blocks: token order, attention paths, drop path, SwiGLU width, crop-group blocks."""

import pytest
import torch

from dinov2.layers import Attention, Block, DropPath, PatchEmbed3D, SwiGLUFFN


def test_patch_embed_token_order_is_conv_output_flattened_hwd():
    torch.manual_seed(0)
    pe = PatchEmbed3D(patch_size=4, in_chans=1, embed_dim=8).eval()
    x = torch.zeros(1, 1, 8, 12, 16)  # grid (2, 3, 4)
    base = pe(x)
    x[0, 0, 4:8, 8:12, 0:4] = 1.0  # patch (h=1, w=2, d=0)
    changed = (pe(x) - base).abs().sum(-1)[0]
    assert changed.nonzero().flatten().tolist() == [1 * 3 * 4 + 2 * 4 + 0]


def test_patch_embed_rejects_non_divisible_and_wrong_channels():
    pe = PatchEmbed3D(patch_size=4, in_chans=2, embed_dim=8)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        pe(torch.zeros(1, 2, 8, 8, 10))
    with pytest.raises(ValueError, match="channels"):
        pe(torch.zeros(1, 1, 8, 8, 8))


def test_sdpa_path_equals_explicit_softmax_path():
    torch.manual_seed(0)
    attn = Attention(dim=32, num_heads=4).eval()
    x = torch.randn(3, 17, 32)
    explicit, weights = attn.forward_with_weights(x)
    torch.testing.assert_close(attn(x), explicit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 17))


def test_attention_qkv_layout_is_three_heads_headdim():
    # Zero k so attention is uniform; then output = mean over tokens of v for each head, and v
    # must be read from the LAST third of the qkv output (layout (3, heads, head_dim)).
    attn = Attention(dim=8, num_heads=2).eval()
    with torch.no_grad():
        attn.qkv.weight.zero_()
        attn.qkv.bias.zero_()
        attn.qkv.weight[16:24] = torch.eye(8)  # v = x
        attn.proj.weight.copy_(torch.eye(8))
        attn.proj.bias.zero_()
    x = torch.randn(1, 5, 8)
    torch.testing.assert_close(attn(x), x.mean(1, keepdim=True).expand(1, 5, 8))


def test_block_forward_list_equals_per_group_forward():
    torch.manual_seed(0)
    blk = Block(32, 4, init_values=0.1).eval()
    xs = [torch.randn(2, 9, 32), torch.randn(5, 4, 32)]
    for out, x in zip(blk.forward_list(xs), xs):
        torch.testing.assert_close(out, blk(x), atol=1e-5, rtol=1e-5)


def test_drop_path_drops_whole_samples_in_training_only():
    torch.manual_seed(0)
    dp = DropPath(0.5)
    x = torch.ones(1000, 3)
    y = dp(x)
    per_sample = y[:, 0]
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert (y == y[:, :1]).all()  # all features of a sample share the decision
    assert 0.4 < (per_sample == 0).float().mean() < 0.6
    assert torch.equal(dp.eval()(x), x)


def test_block_drop_path_is_stochastic_in_training_and_deterministic_in_eval():
    torch.manual_seed(0)
    blk = Block(16, 2, init_values=1.0, drop_path=0.5)
    x = torch.randn(64, 3, 16)
    assert not torch.equal(blk.train()(x), blk.train()(x))
    blk.eval()
    assert torch.equal(blk(x), blk(x))


def test_swiglu_hidden_width_is_two_thirds_rounded_to_8():
    ffn = SwiGLUFFN(1536, 6144)
    assert ffn.w12.weight.shape == (2 * 4096, 1536)
    assert ffn.w3.weight.shape == (1536, 4096)
    assert ffn(torch.randn(2, 3, 1536)).shape == (2, 3, 1536)


def test_block_compiles_without_graph_breaks():
    blk = Block(32, 4, init_values=0.1, drop_path=0.1).train()
    explanation = torch._dynamo.explain(blk)(torch.randn(2, 9, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
