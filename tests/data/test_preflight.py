"""The pre-flight check (dinov2.data.preflight): every bad file found at once before a job starts,
cached by size and mtime, and ``--skip-bad-inputs`` leaving bad entries out with ``skipped.tsv``."""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dinov2.data import preflight
from dinov2.data.datalist import DatalistError
from dinov2.data.preflight import (
    FileCheck,
    LabelRule,
    PreflightCache,
    checked_finetune_datalist,
    checked_pretrain_entries,
    run_preflight,
)

SHAPE = (12, 12, 12)


def good(path: Path, seed: int = 0, data=None) -> str:
    if data is None:
        data = np.random.default_rng(seed).uniform(0, 10, size=SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return str(path)


def truncated(path: Path) -> str:
    """A gzip cut in half: its header still reads (the damage shows only when the voxels are read)."""
    data = np.random.default_rng(0).uniform(0, 1, size=SHAPE).astype(np.float32)  # incompressible
    full = gzip.compress(nib.Nifti1Image(data, np.eye(4)).to_bytes())
    path.write_bytes(full[: len(full) // 2])
    return str(path)


def labels(path: Path, values=(0, 1)) -> str:
    data = np.zeros(SHAPE, np.uint8)
    for k, v in enumerate(values):
        data[k] = v
    return good(path, data=data)


def test_every_bad_file_is_found_at_once_and_partial_nan_is_a_warning(tmp_path, caplog):
    some_inf = np.ones(SHAPE, np.float32)
    some_inf[0, 0, :3] = np.inf
    checks = [
        FileCheck(0, "[0]", good(tmp_path / "a.nii.gz")),
        FileCheck(1, "[1]", truncated(tmp_path / "cut.nii.gz")),
        FileCheck(2, "[2]", good(tmp_path / "nan.nii.gz", data=np.full(SHAPE, np.nan, np.float32))),
        FileCheck(3, "[3]", good(tmp_path / "inf.nii.gz", data=some_inf)),
        FileCheck(4, "[4].label", labels(tmp_path / "lab.nii.gz", (0, 1, 7)), role="label map", allowed=(0, 1),
                  classes="0 background, 1 brain", grid_of=str(tmp_path / "a.nii.gz")),
    ]
    with caplog.at_level(logging.WARNING):
        result = run_preflight(checks, cache=None, progress=False)
    found = {p.where: p for p in result.problems}
    assert set(found) == {"[1]", "[2]", "[4].label"} and result.bad_entries == {1, 2, 4}
    assert "truncated" in found["[1]"].reason and found["[1]"].path.endswith("cut.nii.gz")
    assert "no finite voxel" in found["[2]"].reason
    assert "7" in found["[4].label"].reason and "1 brain" in found["[4].label"].reason
    assert "inf.nii.gz: 3 of 1728 voxels are NaN or +-Inf" in caplog.text


def test_results_are_cached_by_size_and_mtime(tmp_path, monkeypatch):
    cache_file = tmp_path / "cache" / "preflight.json"
    files = [good(tmp_path / f"v{i}.nii.gz", seed=i) for i in range(3)]
    bad = truncated(tmp_path / "cut.nii.gz")
    checks = [FileCheck(i, f"[{i}]", p) for i, p in enumerate(files + [bad])]
    first = run_preflight(checks, cache=PreflightCache(cache_file), progress=False)
    assert first.cached == 0 and len(first.problems) == 1 and cache_file.is_file()

    def no_read(check):
        raise AssertionError(f"{check.path} was read again")

    monkeypatch.setattr(preflight, "_read", no_read)
    second = run_preflight(checks, cache=PreflightCache(cache_file), progress=False)
    assert second.cached == 4 and [p.where for p in second.problems] == ["[3]"]  # the bad answer is cached too

    monkeypatch.undo()
    good(tmp_path / "cut.nii.gz", seed=9)  # repaired: new size and mtime
    os.utime(bad, ns=(1, 1))
    third = run_preflight(checks, cache=PreflightCache(cache_file), progress=False)
    assert third.cached == 3 and third.problems == []


def test_a_changed_requirement_is_checked_again(tmp_path):
    """The same file under another task (other classes) is not answered from the cache."""
    cache_file = tmp_path / "preflight.json"
    image, label = good(tmp_path / "a.nii.gz"), labels(tmp_path / "l.nii.gz", (0, 1, 2))
    as_three = FileCheck(0, "x", label, role="label map", allowed=(0, 1, 2), grid_of=image)
    as_two = FileCheck(0, "x", label, role="label map", allowed=(0, 1), grid_of=image)
    assert run_preflight([as_three], cache=PreflightCache(cache_file), progress=False).problems == []
    result = run_preflight([as_two], cache=PreflightCache(cache_file), progress=False)
    assert result.cached == 0 and len(result.problems) == 1


def _pretrain_datalist(tmp_path: Path, images: list[str]) -> Path:
    path = tmp_path / "pretrain.json"
    path.write_text(json.dumps([{"image": p} for p in images]))
    return path


def test_pretraining_fails_with_every_bad_file_and_the_flag_to_skip(tmp_path):
    images = [good(tmp_path / "a.nii.gz"), truncated(tmp_path / "cut.nii.gz"), str(tmp_path / "missing.nii.gz"),
              good(tmp_path / "b.nii.gz", seed=1)]
    datalist = _pretrain_datalist(tmp_path, images)
    with pytest.raises(DatalistError) as info:
        checked_pretrain_entries(datalist, report_dir=tmp_path / "run", progress=False)
    text = str(info.value)
    assert "2 input files cannot be used" in text and "--skip-bad-inputs" in text
    assert "cut.nii.gz" in text and "missing.nii.gz" in text and "file not found" in text
    assert not (tmp_path / "run" / "skipped.tsv").exists()


def test_pretraining_skips_bad_files_and_lists_them(tmp_path, caplog):
    images = [good(tmp_path / "a.nii.gz"), truncated(tmp_path / "cut.nii.gz"), str(tmp_path / "missing.nii.gz"),
              good(tmp_path / "b.nii.gz", seed=1)]
    with caplog.at_level(logging.WARNING):
        entries = checked_pretrain_entries(_pretrain_datalist(tmp_path, images), skip=True,
                                           report_dir=tmp_path / "run", progress=False)
    assert [e["image"] for e in entries] == [images[0], images[3]]
    assert entries[0]["shape"] == list(SHAPE)
    rows = (tmp_path / "run" / "skipped.tsv").read_text().splitlines()
    assert rows[0] == "path\treason\twhere"
    assert [r.split("\t")[0] for r in rows[1:]] == [images[2], images[1]]  # header problems first, then full reads
    assert "file not found" in rows[1] and "truncated" in rows[2]
    assert "2 input files skipped (2 of 4 entries left out" in caplog.text


def test_skipping_every_entry_is_an_error_and_structure_is_never_skipped(tmp_path):
    datalist = _pretrain_datalist(tmp_path, [truncated(tmp_path / "cut.nii.gz")])
    with pytest.raises(DatalistError, match="no entry is left"):
        checked_pretrain_entries(datalist, skip=True, report_dir=tmp_path, progress=False)
    datalist.write_text(json.dumps([{"image": good(tmp_path / "a.nii.gz")}, {"img": "typo.nii.gz"}]))
    with pytest.raises(DatalistError, match=r"\[1\]: entry is not an object with an 'image' path"):
        checked_pretrain_entries(datalist, skip=True, report_dir=tmp_path, progress=False)


def test_headers_only_when_the_full_read_is_off(tmp_path):
    datalist = _pretrain_datalist(tmp_path, [good(tmp_path / "a.nii.gz"), truncated(tmp_path / "cut.nii.gz")])
    entries = checked_pretrain_entries(datalist, read_voxels=False, progress=False)
    assert len(entries) == 2  # a truncated gzip has a readable header


def _finetune_datalist(tmp_path: Path) -> Path:
    image = [good(tmp_path / f"img{i}.nii.gz", seed=i) for i in range(4)]
    data = {
        "training": [{"image": image[0], "label": labels(tmp_path / "l0.nii.gz")},
                     {"image": truncated(tmp_path / "cut.nii.gz"), "label": labels(tmp_path / "l1.nii.gz")}],
        "validation": [{"image": image[2], "label": labels(tmp_path / "l2.nii.gz", (0, 1, 5))},
                       {"image": image[3], "label": labels(tmp_path / "l3.nii.gz")}],
    }
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(data))
    return path


def test_finetuning_reads_images_and_labels(tmp_path):
    datalist = _finetune_datalist(tmp_path)
    rule = LabelRule((0, 1), "0 background, 1 brain")
    with pytest.raises(DatalistError) as info:
        checked_finetune_datalist(datalist, labels=rule, report_dir=tmp_path / "run", progress=False)
    text = str(info.value)
    assert "training[1].image" in text and "cut.nii.gz" in text
    assert "validation[0].label" in text and "l2.nii.gz" in text and "value(s) 5" in text

    kept = checked_finetune_datalist(datalist, labels=rule, skip=True, report_dir=tmp_path / "run", progress=False)
    assert [Path(e["image"]).name for e in kept["training"]] == ["img0.nii.gz"]
    assert [Path(e["image"]).name for e in kept["validation"]] == ["img3.nii.gz"]
    assert kept["test"] == []
    assert len((tmp_path / "run" / "skipped.tsv").read_text().splitlines()) == 3


def test_finetuning_checks_the_channels_a_file_gives(tmp_path):
    datalist = tmp_path / "dataset.json"
    datalist.write_text(json.dumps({"training": [{"image": good(tmp_path / "a.nii.gz"), "label": 0}]}))
    with pytest.raises(DatalistError, match="one 3D volume but the model takes 2 channels"):
        checked_finetune_datalist(datalist, channels=2, progress=False)
    assert len(checked_finetune_datalist(datalist, channels=None, progress=False)["training"]) == 1


def test_the_default_cache_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOV2_CACHE_DIR", str(tmp_path / "c"))
    assert preflight.default_cache_path() == tmp_path / "c" / "preflight.json"
    monkeypatch.delenv("DINOV2_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert preflight.default_cache_path() == tmp_path / "xdg" / "dinov2" / "preflight.json"
