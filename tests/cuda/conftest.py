"""CUDA tests: every test here is marked ``cuda`` and skipped, with the reason, where torch sees no GPU.

Run them on a GPU machine with ``pytest -m cuda tests/cuda`` (``scripts/gpu_check.sh`` does, as
its first stage). They need no sample-data package: volumes are synthetic
(:mod:`dinov2.sample_data.synthetic`). The tests import the package's heavier modules inside
their functions, so that collecting them where they are skipped costs little more than torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny_cpu.yaml"
NO_GPU = "needs a CUDA GPU, torch sees none here (scripts/gpu_check.sh runs these on a GPU machine)"


def pytest_collection_modifyitems(config, items):
    """Skip every ``cuda``-marked test of the session when there is no GPU (collected, never run)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_GPU)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture()
def gpu() -> torch.device:
    """The GPU the tests compute on."""
    return torch.device("cuda", 0)


@pytest.fixture()
def tiny_cfg(gpu):
    """``tiny_cfg(*overrides)``: the tests' tiny pretraining config (``configs/tiny_cpu.yaml``) on the GPU."""
    from dinov2.train.train3d import build_config

    def make(*overrides: str):
        return build_config(str(TINY_CONFIG), ["train.datalist=unused.json", *overrides], device=str(gpu))

    return make


@pytest.fixture()
def make_batch():
    """``make_batch(cfg, batch_size, seed)``: a collated batch of random crops (on the CPU, as a loader gives it)."""
    from dinov2.data.collate import collate_data_and_cast

    def make(cfg, batch_size: int = 4, seed: int = 0) -> dict:
        gen = torch.Generator().manual_seed(seed)
        g, l, n_local = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
        samples = [{"global_crops": [torch.randn(1, g, g, g, generator=gen) for _ in range(2)],
                    "local_crops": [torch.randn(1, l, l, l, generator=gen) for _ in range(n_local)]}
                   for _ in range(batch_size)]
        side = g // cfg.student.patch_size
        return collate_data_and_cast(samples, tuple(cfg.ibot.mask_ratio_min_max), cfg.ibot.mask_sample_probability,
                                     (side,) * 3, rng=np.random.default_rng(seed))

    return make


@pytest.fixture(scope="session")
def synthetic_datalist(tmp_path_factory) -> Path:
    """A pretraining datalist of four small synthetic volumes (40 x 44 x 36 voxels)."""
    from dinov2.sample_data.synthetic import write_synthetic_datalist

    return write_synthetic_datalist(tmp_path_factory.mktemp("volumes"), count=4, shape=(40, 44, 36))
