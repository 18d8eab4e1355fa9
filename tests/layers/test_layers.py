"""Building blocks: token order, attention paths, drop path, SwiGLU width, crop-group blocks."""

import pytest
import torch

from dinov2.layers import Attention, Block, DropPath, PatchEmbed3D, SwiGLUFFN
from dinov2.layers.drop_path import kept_subset

pytestmark = pytest.mark.usefixtures("one_thread")


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


def _mean_output_and_grad(blk: Block, xs: list[torch.Tensor], draws: int, run):
    """Mean over ``draws`` training passes of ``run(blk, xs)`` and of the gradient of a fixed projection of it."""
    weights = [torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) for i, x in enumerate(xs)]
    outputs, grads = [torch.zeros_like(x) for x in xs], [torch.zeros_like(p) for p in blk.parameters()]
    for _ in range(draws):
        blk.zero_grad()
        outs = run(blk, xs)
        sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        for acc, o in zip(outputs, outs):
            acc += o.detach() / draws
        for acc, p in zip(grads, blk.parameters()):
            acc += (p.grad if p.grad is not None else torch.zeros_like(p)) / draws
    return outputs, grads


def _close_in_norm(got: list[torch.Tensor], want: list[torch.Tensor], scale: list[torch.Tensor], tol: float):
    for g, w, ref in zip(got, want, scale):
        assert torch.linalg.vector_norm(g - w) <= tol * torch.linalg.vector_norm(ref) + 1e-4


RESIDUAL_RUNS = {
    "forward": lambda blk, xs: [blk._residual(x, blk._mlp_branch) for x in xs],
    "crop groups": lambda blk, xs: blk._residual_list(xs, lambda flat, shapes: blk._mlp_branch(flat)),
}


@pytest.mark.parametrize("run", RESIDUAL_RUNS.values(), ids=RESIDUAL_RUNS.keys())
def test_subset_stochastic_depth_keeps_each_branch_expected_output_and_gradient(run):
    """A branch on a kept subset, scaled by B / kept: on average x + branch(x) and its gradient."""
    torch.manual_seed(0)
    blk = Block(8, 2, init_values=1.0, drop_path=0.3).train()
    xs = [torch.randn(10, 5, 8), torch.randn(7, 3, 8)]
    blk.drop_path = 0.0  # the expectation: the branch on every sample, unscaled
    expected, expected_grads = _mean_output_and_grad(blk, xs, 1, run)
    branch = [e - x for e, x in zip(expected, xs)]
    blk.drop_path = 0.3
    mean, grads = _mean_output_and_grad(blk, xs, 1000, run)
    _close_in_norm(mean, expected, branch, 0.05)
    _close_in_norm(grads, expected_grads, expected_grads, 0.05)


def test_subset_and_mask_stochastic_depth_agree_on_average_over_whole_blocks():
    """Rate 0.5 on even batches: each sample is kept with probability 1/2 and scaled by 2 either way."""
    torch.manual_seed(1)
    blk = Block(8, 2, init_values=1.0, drop_path=0.5).train()
    xs = [torch.randn(6, 5, 8), torch.randn(4, 3, 8)]
    runs = {"forward": lambda b, xs: [b(x) for x in xs], "crop groups": lambda b, xs: b.forward_list(xs)}
    for run in runs.values():
        subset, subset_grads = _mean_output_and_grad(blk, xs, 3000, run)
        blk.subset_drop_path = False
        masked, masked_grads = _mean_output_and_grad(blk, xs, 3000, run)
        blk.subset_drop_path = True
        _close_in_norm(subset, masked, [m - x for m, x in zip(masked, xs)], 0.08)
        _close_in_norm(subset_grads, masked_grads, masked_grads, 0.08)


def test_subset_stochastic_depth_runs_branches_on_the_kept_samples_only():
    blk = Block(8, 2, init_values=1.0, drop_path=0.3).train()
    seen = []
    blk.mlp.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    blk(torch.randn(10, 4, 8))
    assert seen == [7]  # floor(10 * 0.7) samples through the MLP
    seen.clear()
    blk.forward_list([torch.randn(10, 4, 8), torch.randn(20, 2, 8)])
    assert seen == [7 * 4 + 14 * 2]  # the groups' kept tokens, concatenated into one MLP call
    seen.clear()
    blk.subset_drop_path = False
    blk(torch.randn(10, 4, 8))
    assert seen == [10]
    seen.clear()
    blk.eval()(torch.randn(10, 4, 8))
    assert seen == [10]


def test_kept_subset_draws_distinct_samples_and_leaves_small_batches_to_per_sample_dropping():
    torch.manual_seed(0)
    kept, scale = kept_subset(10, 0.3, True, torch.device("cpu"))
    assert kept.numel() == 7 and kept.unique().numel() == 7 and scale == pytest.approx(10 / 7)
    assert kept_subset(1, 0.3, True, torch.device("cpu")) is None  # would drop nothing: Bernoulli factors instead
    assert kept_subset(10, 0.3, False, torch.device("cpu")) is None
    blk = Block(8, 2, init_values=1.0, drop_path=0.5).train()
    x = torch.randn(1, 3, 8)
    outs = {tuple(blk(x).flatten()[:3].tolist()) for _ in range(40)}
    assert len(outs) > 1  # a batch of one still gets stochastic depth


def test_subset_stochastic_depth_replays_under_the_same_seed():
    blk = Block(8, 2, init_values=1.0, drop_path=0.3).train()
    xs = [torch.randn(10, 4, 8), torch.randn(20, 2, 8)]
    torch.manual_seed(5)
    first = blk.forward_list(xs)
    torch.manual_seed(5)
    again = blk.forward_list(xs)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_swiglu_hidden_width_is_two_thirds_rounded_to_8():
    ffn = SwiGLUFFN(1536, 6144)
    assert ffn.w12.weight.shape == (2 * 4096, 1536)
    assert ffn.w3.weight.shape == (1536, 4096)
    assert ffn(torch.randn(2, 3, 1536)).shape == (2, 3, 1536)


def test_block_compiles_without_graph_breaks():
    blk = Block(32, 4, init_values=0.1, drop_path=0.1).train()
    explanation = torch._dynamo.explain(blk)(torch.randn(2, 9, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
