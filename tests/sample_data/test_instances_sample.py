"""The 3D nuclei instance sample cut into quadrants (dinov2/sample_data/instances.py)."""

from __future__ import annotations

import numpy as np
import pytest

from dinov2.data.datalist import load_finetune_datalist
from dinov2.eval.instances import io
from dinov2.eval.instances.metrics import contingency
from dinov2.sample_data import INSTALL_HINT, package_dir
from dinov2.sample_data.instances import (
    N_QUADRANTS,
    SPACING,
    STARDIST_IMAGE,
    STARDIST_MASK,
    main,
    quadrant_slices,
)

pytest.importorskip("tifffile", reason="TIFF stacks need the optional extra 'instances'")


def test_quadrants_tile_any_grid_once():
    for shape in ((57, 61, 31), (4, 4, 1), (5, 2, 3)):
        count = np.zeros(shape, np.int32)
        for box in quadrant_slices(shape):
            count[box] += 1
        assert (count == 1).all(), shape


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """``(folder, source image, source labels)`` once the command has run."""
    root = package_dir("stardist")
    if root is None:
        pytest.skip(f"the sample-data package stardist is not installed; run: {INSTALL_HINT}")
    folder = tmp_path_factory.mktemp("nuclei")
    assert main(["--out", str(folder)]) == 0
    image = io.read_image(root / STARDIST_IMAGE, spacing=SPACING)
    labels = io.read_labels(root / STARDIST_MASK, like=image)
    return folder, image.array, labels.array


def _read(folder, entry):
    image = io.read_image(folder / entry["image"])
    return image, io.read_labels(folder / entry["label"], like=image)


def test_quadrants_rebuild_the_stack_and_its_objects(sample):
    folder, source, source_labels = sample
    assert source.shape == (57, 61, 31) and len(np.unique(source_labels)) - 1 == 51
    fold = load_finetune_datalist(folder / "fold0.json", validate=False, progress=False)
    entries = {e["name"]: e for split in ("training", "validation", "test") for e in fold[split]}
    assert sorted(entries) == [f"nuclei_q{k}" for k in range(N_QUADRANTS)]
    kinds = set()
    for k, box in enumerate(quadrant_slices(source.shape)):
        image, labels = _read(folder, entries[f"nuclei_q{k}"])
        kinds.add(image.kind)
        assert image.spacing == SPACING and image.meta["spacing_source"] == "file"
        np.testing.assert_array_equal(image.array, source[box])
        ids = np.unique(labels.array)
        np.testing.assert_array_equal(ids, np.arange(ids.size))  # renumbered 1..n
        # one-to-one with the source objects present in the quadrant (cut objects kept as parts)
        table = contingency(source_labels[box], labels.array)
        assert table.overlap.shape[0] == table.overlap.shape[1] == ids.size - 1
        np.testing.assert_array_equal(table.overlap, np.diag(table.ref_sizes))
    assert kinds == {"tiff", "nifti"}  # a mixed-format folder


def test_fold_datalists_hold_each_quadrant_out_once(sample):
    folder = sample[0]
    tested = []
    for k in range(N_QUADRANTS):
        fold = load_finetune_datalist(folder / f"fold{k}.json", validate=False, progress=False)
        names = {split: [e["name"] for e in fold[split]] for split in ("training", "validation", "test")}
        assert names["test"] == [f"nuclei_q{k}"]
        assert names["validation"] == [f"nuclei_q{(k + 1) % N_QUADRANTS}"]
        assert len(names["training"]) == 2
        assert len(set(sum(names.values(), []))) == N_QUADRANTS  # no quadrant in two splits
        for split in ("training", "validation", "test"):
            for entry in fold[split]:
                assert entry["spacing"] == list(SPACING)
                image, labels = _read(folder, entry)
                assert labels.array.max() > 0
        tested += names["test"]
    assert sorted(tested) == [f"nuclei_q{k}" for k in range(N_QUADRANTS)]
