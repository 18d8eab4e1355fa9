"""Shared fixtures of the training tests: a datalist of small real brain volumes, a shared cache."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny_cpu.yaml"
# Volumes with every side <= this many voxels (the 2-4 mm templates and the small scans) load
# in milliseconds; the 1 mm templates add nothing to a 32^3-crop test but seconds of I/O.
MAX_SIDE = 128


@pytest.fixture(scope="session")
def small_datalist(tmp_path_factory) -> Path:
    """Pretraining datalist JSON of the small real volumes shipped in installed packages."""
    from dinov2.data.datalist import header_entry, write_datalist
    from dinov2.data.image_io import read_header
    from dinov2.sample_data import find_pretraining_volumes

    headers = [read_header(p) for p in find_pretraining_volumes()]
    entries = [header_entry(h) for h in headers if max(h.shape[:3]) <= MAX_SIDE]
    assert len(entries) >= 4, "expected the small sample volumes of requirements-data.txt to be installed"
    return write_datalist(entries, tmp_path_factory.mktemp("data") / "pretrain.json")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One preprocessing cache for every training test of the session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_config() -> Path:
    """The tiny CPU config of the demo and tests."""
    return TINY_CONFIG


@pytest.fixture(scope="session")
def tiny_argv(small_datalist, cache_dir):
    """``tiny_argv(output_dir, *overrides)``: command-line arguments of a tiny CPU run."""

    def make(output_dir, *overrides) -> list[str]:
        return ["--config-file", str(TINY_CONFIG), "--output-dir", str(output_dir), "--cache-dir", str(cache_dir),
                f"train.datalist={small_datalist}", *overrides]

    return make
