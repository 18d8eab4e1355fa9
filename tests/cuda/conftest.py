"""CUDA tests: every test here is marked ``cuda`` and skipped, with the reason, where torch sees no GPU.

Run them on a GPU machine with ``pytest -m cuda tests/cuda`` (``scripts/gpu_check.sh`` does, as
its first stage). They need no sample-data package: volumes are synthetic
(:mod:`dinov2.sample_data.synthetic`). The tests import the package's heavier modules inside
their functions, so that collecting them where they are skipped costs little more than torch.
``make_batch`` (random collated crops) is the fixture of ``tests/conftest.py``, shared with the CPU
tests of the meta-architecture.
"""

from __future__ import annotations

from pathlib import Path

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


@pytest.fixture(scope="session")
def synthetic_datalist(tmp_path_factory) -> Path:
    """A pretraining datalist of four small synthetic volumes (40 x 44 x 36 voxels)."""
    from dinov2.sample_data.synthetic import write_synthetic_datalist

    return write_synthetic_datalist(tmp_path_factory.mktemp("volumes"), count=4, shape=(40, 44, 36))
