"""Tests for dinov2.data.collate: crop order, dtype, iBOT mask bookkeeping and the DataLoader hook."""

import math
import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dinov2.data.collate import CollateDataAndCast, collate_data_and_cast, make_collate_fn
from dinov2.data.masking import MaskingGenerator3d

GRID = (4, 4, 4)
N_TOKENS = 64


def _samples(batch, n_global=2, n_local=3, global_size=8, local_size=4, channels=1):
    """Crops filled with a code (sample * 10 + crop) so their order can be read back."""
    return [
        {
            "global_crops": [torch.full((channels,) + (global_size,) * 3, b * 10.0 + i) for i in range(n_global)],
            "local_crops": [torch.full((channels,) + (local_size,) * 3, b * 10.0 + i) for i in range(n_local)],
        }
        for b in range(batch)
    ]


def _collate(samples, seed=0, **kwargs):
    kwargs.setdefault("n_tokens_per_side", GRID)
    return collate_data_and_cast(samples, rng=np.random.default_rng(seed), **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shapes_crop_major_order_and_dtype(dtype):
    batch, n_global, n_local = 3, 2, 3
    out = _collate(_samples(batch, n_global, n_local, channels=2), dtype=dtype)
    glob, loc = out["collated_global_crops"], out["collated_local_crops"]
    assert glob.shape == (n_global * batch, 2, 8, 8, 8) and glob.dtype == dtype
    assert loc.shape == (n_local * batch, 2, 4, 4, 4) and loc.dtype == dtype
    expected_global = [b * 10 + i for i in range(n_global) for b in range(batch)]
    expected_local = [b * 10 + i for i in range(n_local) for b in range(batch)]
    assert glob[:, 0, 0, 0, 0].float().tolist() == expected_global
    assert loc[:, 0, 0, 0, 0].float().tolist() == expected_local
    assert out["collated_masks"].shape == (n_global * batch, N_TOKENS)
    assert out["collated_masks"].dtype == torch.bool


def test_no_local_crops_gives_none():
    out = _collate(_samples(2, n_local=0))
    assert out["collated_local_crops"] is None
    assert out["collated_global_crops"].shape[0] == 4


@pytest.mark.parametrize("batch,n_global,probability", [(4, 2, 0.5), (5, 2, 0.3), (8, 2, 1.0), (3, 1, 0.7)])
def test_fraction_of_masked_crops_and_ratios_stratified(batch, n_global, probability):
    low, high = 0.1, 0.6
    for seed in range(5):
        out = _collate(_samples(batch, n_global), seed=seed, mask_ratio_tuple=(low, high), mask_probability=probability)
        per_crop = out["collated_masks"].sum(dim=1)
        n_masked = int(batch * n_global * probability)
        ratios = np.sort(per_crop[per_crop > 0].numpy() / N_TOKENS)
        assert (per_crop > 0).sum() == n_masked
        assert ((ratios >= int(N_TOKENS * low) / N_TOKENS) & (ratios <= high)).all()
        # One crop per stratum: the k-th smallest ratio lies in the k-th of n_masked strata.
        edges = np.linspace(low, high, n_masked + 1)
        for k, ratio in enumerate(ratios):
            assert int(N_TOKENS * edges[k]) / N_TOKENS <= ratio <= edges[k + 1]


def test_masked_crops_chosen_at_random():
    masked_sets = {
        tuple(_collate(_samples(4), seed=s)["collated_masks"].any(dim=1).nonzero().flatten().tolist())
        for s in range(20)
    }
    assert len(masked_sets) > 5


@pytest.mark.parametrize("seed", range(4))
def test_indices_weights_and_counts_consistent(seed):
    out = _collate(_samples(4, 2), seed=seed, mask_probability=0.75)
    masks = out["collated_masks"]
    flat_idx = masks.flatten().nonzero().flatten()
    assert torch.equal(out["mask_indices_list"], flat_idx)
    assert out["mask_indices_list"].dtype == torch.long
    assert out["n_masked_patches"].dtype == torch.long and out["n_masked_patches"].shape == (1,)
    assert int(out["n_masked_patches"]) == int(masks.sum()) == out["mask_indices_list"].numel()
    assert out["masks_weight"].shape == out["mask_indices_list"].shape
    crop_of_token = out["mask_indices_list"] // N_TOKENS
    for crop in crop_of_token.unique():
        weights = out["masks_weight"][crop_of_token == crop]
        assert abs(weights.sum().item() - 1.0) < 1e-5
        assert torch.allclose(weights, torch.full_like(weights, 1.0 / int(masks[crop].sum())))
    assert out["n_masked_patches"].item() <= out["upperbound"]


def test_upperbound_bounds_every_draw_and_is_tight_enough():
    totals = []
    for seed in range(30):
        out = _collate(_samples(4, 2), seed=seed, mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5)
        totals.append(int(out["n_masked_patches"]))
        assert totals[-1] <= out["upperbound"]
    # Four masked crops, top of their strata 0.2..0.5 of 64 tokens: 12 + 19 + 25 + 32.
    assert out["upperbound"] == 88
    assert max(totals) > 0.8 * out["upperbound"]


@pytest.mark.parametrize("batch,probability", [(3, 0.0), (1, 0.4)])
def test_no_masks(batch, probability):
    out = _collate(_samples(batch, n_global=2), mask_probability=probability)
    assert not out["collated_masks"].any()
    assert out["mask_indices_list"].shape == (0,) and out["mask_indices_list"].dtype == torch.long
    assert out["masks_weight"].shape == (0,)
    assert out["n_masked_patches"].tolist() == [0]
    assert out["upperbound"] == 0


def test_batch_of_one():
    out = _collate(_samples(1, n_global=2), mask_probability=0.5)
    assert out["collated_global_crops"].shape[0] == 2
    assert int(out["collated_masks"].any(dim=1).sum()) == 1
    assert abs(out["masks_weight"].sum().item() - 1.0) < 1e-5


def test_reproducible_with_explicit_rng_and_seeded_from_torch_otherwise():
    a, b, c = (_collate(_samples(4), seed=s)["collated_masks"] for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(7)
    d = collate_data_and_cast(_samples(4), n_tokens_per_side=GRID)["collated_masks"]
    e = collate_data_and_cast(_samples(4), n_tokens_per_side=GRID)["collated_masks"]
    torch.manual_seed(7)
    f = collate_data_and_cast(_samples(4), n_tokens_per_side=GRID)["collated_masks"]
    assert torch.equal(d, f) and not torch.equal(d, e)


def test_block_mask_generator_is_used():
    gen = MaskingGenerator3d(GRID, mode="block", min_num_patches=4)
    out = _collate(_samples(4), mask_generator=gen, mask_ratio_tuple=(0.3, 0.5))
    masks = out["collated_masks"].reshape(-1, *GRID)
    masked = masks[masks.flatten(1).any(dim=1)]
    assert masked.shape[0] == 4
    # A cuboid of >= 4 tokens appears: some masked token has a masked neighbour along each axis.
    for axis in (1, 2, 3):
        pairs = masked.narrow(axis, 0, GRID[axis - 1] - 1) & masked.narrow(axis, 1, GRID[axis - 1] - 1)
        assert pairs.any()


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="same number"):
        _collate([_samples(1)[0], _samples(1, n_global=1)[0]])
    with pytest.raises(ValueError, match="mask_ratio_tuple"):
        _collate(_samples(2), mask_ratio_tuple=(0.6, 0.2))
    with pytest.raises(ValueError, match="mask_probability"):
        _collate(_samples(2), mask_probability=1.5)
    with pytest.raises(ValueError, match="n_tokens_per_side"):
        _collate(_samples(2), n_tokens_per_side=None)
    with pytest.raises(ValueError, match="mask_generator returned"):
        _collate(_samples(2), mask_generator=MaskingGenerator3d((4, 4, 8)))
    with pytest.raises(ValueError, match="empty batch"):
        _collate([])


def test_make_collate_fn_from_omegaconf_and_pickle():
    ibot = OmegaConf.create(
        {"mask_ratio_min_max": [0.1, 0.5], "mask_sample_probability": 0.5, "mask_mode": "block", "loss_weight": 1.0}
    )
    fn = make_collate_fn(ibot, patch_size=4, global_crops_size=16, dtype=torch.bfloat16)
    assert isinstance(fn, CollateDataAndCast)
    assert fn.n_tokens_per_side == GRID and fn.mask_generator.mode == "block"
    clone = pickle.loads(pickle.dumps(fn))
    torch.manual_seed(0)
    out = clone(_samples(2, global_size=16))
    assert out["collated_global_crops"].dtype == torch.bfloat16
    assert out["collated_masks"].shape == (4, 64)
    assert int(out["collated_masks"].any(dim=1).sum()) == 2


def test_make_collate_fn_validates():
    ibot = {"mask_ratio_min_max": (0.1, 0.5), "mask_sample_probability": 0.5}
    with pytest.raises(ValueError, match="mask_sample_probability"):
        make_collate_fn({"mask_ratio_min_max": (0.1, 0.5)}, patch_size=4, global_crops_size=16)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        make_collate_fn(ibot, patch_size=5, global_crops_size=16)
    assert make_collate_fn(ibot, patch_size=4, global_crops_size=(16, 8, 12)).n_tokens_per_side == (4, 2, 3)


class _CropDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return _samples(1, global_size=16)[0]


def test_works_as_dataloader_collate_fn_with_workers():
    fn = make_collate_fn({"mask_ratio_min_max": (0.3, 0.6), "mask_sample_probability": 1.0}, 4, 16)
    loader = torch.utils.data.DataLoader(_CropDataset(), batch_size=2, num_workers=2, collate_fn=fn)
    torch.manual_seed(0)
    masks = [batch["collated_masks"] for batch in loader]
    assert len(masks) == 4 and all(m.shape == (4, 64) and m.any(dim=1).all() for m in masks)
    # Batches 0 and 1 come from different workers: their masks must not be copies.
    assert not torch.equal(masks[0], masks[1])


class _TaggedTensor(torch.Tensor):
    """Stands in for MONAI's MetaTensor: a tensor subclass the augmentation may hand over."""


def test_tensor_subclasses_are_collated_as_plain_tensors():
    crop = torch.zeros(1, 8, 8, 8).as_subclass(_TaggedTensor)
    out = _collate([{"global_crops": [crop, crop], "local_crops": [crop]}] * 2)
    assert type(out["collated_global_crops"]) is torch.Tensor
    assert type(out["collated_local_crops"]) is torch.Tensor


def test_block_mask_settings_are_config_keys_with_packaged_defaults():
    """ibot.mask_block_* can be tuned from YAML / key=value (the strict check used to reject them)."""
    from dinov2.train.train3d import build_config

    cfg = build_config(None, ["train.datalist=x.json", "ibot.mask_mode=block", "ibot.mask_block_min_tokens=8",
                              "ibot.mask_block_max_tokens=20", "ibot.mask_block_min_aspect=0.5"])
    generator = make_collate_fn(cfg.ibot, 16, 96).mask_generator
    assert (generator.mode, generator.min_num_patches, generator.max_num_patches) == ("block", 8, 20)
    assert generator.log_aspect_range[0] == pytest.approx(math.log(0.5))
