"""Datalists: building from NIfTI/DICOM folders, finetuning matching/splits/subsets, validation."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dinov2.data import datalist as dl
from dinov2.data.datalist import build as dl_build
from dinov2.data.image_io import load_dicom_multiframe, read_header


def _by_name(entries):
    return {Path(e["image"]).name: e for e in entries}


# ------------------------------------------------------------------ pretraining: building


def test_build_pretrain_reads_nifti_and_dicom_headers(mixed_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="dinov2.data.datalist"):
        entries, skipped = dl.build_pretrain_datalist([mixed_folder], progress=False)
    found = _by_name(entries)
    assert set(found) == {"big.nii.gz", "four_d.nii.gz", "plain.nii", "tiny.nii.gz", "series1", "volume.dcm"}
    assert found["big.nii.gz"]["shape"] == [20, 18, 16] and found["big.nii.gz"]["spacing"] == [1.5, 1.5, 2.0]
    assert found["four_d.nii.gz"]["shape"] == [20, 20, 20, 2] and len(found["four_d.nii.gz"]["spacing"]) == 3
    assert found["plain.nii"]["spacing"] == [0.5, 0.5, 0.5]
    # DICOM axis order is (columns, rows, slices); PixelSpacing is (row, column) spacing.
    assert found["series1"]["shape"] == [10, 12, 6] and found["series1"]["spacing"] == [0.9, 0.8, 2.5]
    assert found["volume.dcm"]["shape"] == [14, 16, 5] and found["volume.dcm"]["spacing"] == [0.6, 0.7, 3.0]
    assert all(Path(e["image"]).is_absolute() for e in entries)
    assert [s.path for s in skipped] == [str(mixed_folder / "a" / "broken.nii.gz")]
    assert "broken.nii.gz" in caplog.text and "not gzip-compressed" in caplog.text


def test_worker_processes_give_the_same_datalist(mixed_folder, monkeypatch):
    monkeypatch.setattr(dl_build, "MIN_FILES_FOR_PROCESSES", 0)
    monkeypatch.setattr(dl_build, "_START_METHOD", "fork")  # spawn would spend seconds importing per worker
    monkeypatch.setattr(dl_build, "_BATCH", 2)
    serial = dl.build_pretrain_datalist([mixed_folder], progress=False)
    assert dl.build_pretrain_datalist([mixed_folder], progress=False, workers=2) == serial
    with pytest.raises(ValueError, match="workers"):
        dl.build_pretrain_datalist([mixed_folder], workers=0)


def test_min_size_filter_per_axis(mixed_folder):
    entries, skipped = dl.build_pretrain_datalist([mixed_folder], min_size=16, progress=False)
    assert set(_by_name(entries)) == {"big.nii.gz", "four_d.nii.gz", "plain.nii"}
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert "min-size" in reasons["tiny.nii.gz"] and "axis 0: 4 < 16" in reasons["tiny.nii.gz"]
    assert "series1" in reasons and "volume.dcm" in reasons
    entries, _ = dl.build_pretrain_datalist([mixed_folder], min_size=[1, 1, 6], progress=False)
    assert "series1" in _by_name(entries) and "volume.dcm" not in _by_name(entries)
    with pytest.raises(ValueError, match="min_size"):
        dl.build_pretrain_datalist([mixed_folder], min_size=[1, 2], progress=False)


def test_glob_and_missing_inputs(mixed_folder):
    entries, skipped = dl.build_pretrain_datalist(
        [str(mixed_folder / "**" / "*.nii.gz"), str(mixed_folder / "nothing_*.nii"), mixed_folder / "absent"],
        progress=False,
    )
    assert set(_by_name(entries)) == {"big.nii.gz", "four_d.nii.gz", "tiny.nii.gz"}
    reasons = " ".join(s.reason for s in skipped)
    assert "pattern matched no file" in reasons and "no such file or folder" in reasons


def test_dicom_folder_problems_are_skipped_with_reasons(tmp_path, dicom_series_writer):
    dicom_series_writer(tmp_path / "two", rows=8, columns=8, n_slices=3, name="A{:03d}")
    dicom_series_writer(tmp_path / "two", rows=8, columns=8, n_slices=3, name="B{:03d}")
    dicom_series_writer(tmp_path / "gap", rows=8, columns=8, n_slices=5)
    (tmp_path / "gap" / "IM0002").unlink()  # a missing slice makes the spacing uneven
    dicom_series_writer(tmp_path / "no_position", rows=8, columns=8, n_slices=4, slice_spacing=3.5, positions=False)
    dicom_series_writer(tmp_path / "single", rows=8, columns=8, n_slices=1)
    entries, skipped = dl.build_pretrain_datalist([tmp_path], progress=False)
    reasons = {Path(s.path).name: s.reason for s in skipped}
    # Two series in one folder are two volumes, FOLDER::SeriesInstanceUID each.
    assert sorted(e["image"].split("::")[0] for e in entries if "::" in e["image"]) == [str(tmp_path / "two")] * 2
    assert "slice(s) missing" in reasons["gap"]
    assert "at least 2" in reasons["single"]
    # Without ImagePositionPatient the slice spacing comes from SliceThickness.
    assert _by_name(entries)["no_position"]["spacing"] == [0.9, 0.8, 3.5]


def test_multiframe_loader_follows_the_header_axis_convention(mixed_folder):
    # MONAI's PydicomReader gives series folders the same (columns, rows, slices) order and
    # affine as read_header (checked by hand with MONAI 1.6.1), but not multi-frame files.
    path = mixed_folder / "dicom" / "mf" / "volume.dcm"
    array, affine = load_dicom_multiframe(path)
    assert array.shape == read_header(path).shape == (14, 16, 5)
    np.testing.assert_allclose(np.diag(affine)[:3], [-0.6, -0.7, 3.0])
    import pydicom

    frames = pydicom.dcmread(path).pixel_array  # (frames, rows, columns)
    assert array[3, 7, 2] == frames[2, 7, 3]
    with pytest.raises(ValueError, match="not a multi-frame"):
        load_dicom_multiframe(mixed_folder / "a" / "big.nii.gz")


def test_relative_paths_resolve_against_the_datalist_folder(mixed_folder, tmp_path):
    entries, _ = dl.build_pretrain_datalist([mixed_folder / "a", mixed_folder / "dicom"], progress=False)
    out = dl.write_datalist(entries, mixed_folder / "lists" / "pretrain.json", relative=True)
    raw = json.loads(out.read_text())
    assert all(not Path(e["image"]).is_absolute() and e["image"].startswith("..") for e in raw)
    assert [e["image"] for e in dl.load_pretrain_datalist(out, progress=False)] == [e["image"] for e in entries]
    moved = tmp_path / "moved"
    shutil.copytree(mixed_folder, moved)
    reloaded = dl.load_pretrain_datalist(moved / "lists" / "pretrain.json", progress=False)
    assert all(e["image"].startswith(str(moved)) for e in reloaded)
    absolute = json.loads(dl.write_datalist(entries, tmp_path / "abs.json").read_text())
    assert all(Path(e["image"]).is_absolute() for e in absolute)


def test_load_pretrain_computes_missing_shape_and_spacing(mixed_folder, tmp_path):
    path = tmp_path / "list.json"
    images = [mixed_folder / "a" / "big.nii.gz", mixed_folder / "dicom" / "series1"]
    path.write_text(json.dumps([{"image": str(image)} for image in images]))
    for validate in (True, False):
        loaded = dl.load_pretrain_datalist(path, validate=validate, progress=False)
        assert loaded[0]["shape"] == [20, 18, 16] and loaded[0]["spacing"] == [1.5, 1.5, 2.0]
        assert loaded[1]["shape"] == [10, 12, 6]


def test_cli_pretrain_and_validate(mixed_folder, tmp_path, capsys):
    out = tmp_path / "p.json"
    # 4 files skipped: the datalist of the others is written, the exit code says something was skipped
    assert dl.main(["pretrain", str(mixed_folder), "-o", str(out), "--min-size", "16", "--no-progress"]) == 1
    assert len(json.loads(out.read_text())) == 3 and "Wrote 3 volumes" in capsys.readouterr().out
    report = Path(str(out) + ".skipped.tsv").read_text().splitlines()
    assert report[0] == "path\treason" and len(report) == 5 and any("broken.nii.gz" in line for line in report)
    assert dl.main(["validate", str(out), "--no-progress"]) == 0
    assert dl.main(["pretrain", str(mixed_folder / "a" / "broken.nii.gz"), "-o", str(tmp_path / "none.json")]) == 1
    assert not (tmp_path / "none.json").exists()


# ------------------------------------------------------------------ finetuning: matching


def _write_cases(write_nifti, folder: Path, names, modalities=("",), shape=(8, 8, 8)):
    for name in names:
        for modality in modalities:
            write_nifti(folder / "images" / f"{name}{modality}.nii.gz", shape)
        write_nifti(folder / "labels" / f"{name}.nii.gz", shape, dtype=np.uint8)


def test_match_by_name_reports_unpaired_cases(tmp_path, nifti_writer):
    _write_cases(nifti_writer, tmp_path, ["case1", "case2", "case3"])
    (tmp_path / "labels" / "case3.nii.gz").rename(tmp_path / "labels" / "orphan.nii.gz")
    entries, skipped = dl.match_cases(tmp_path / "images", tmp_path / "labels")
    assert [(e["name"], Path(e["image"]).name, Path(e["label"]).name) for e in entries] == [
        ("case1", "case1.nii.gz", "case1.nii.gz"), ("case2", "case2.nii.gz", "case2.nii.gz")]
    reasons = " | ".join(f"{s.path}: {s.reason}" for s in skipped)
    assert "case3: no label found" in reasons and "label without an image for case 'orphan'" in reasons


def test_modalities_group_into_one_entry_and_labels_may_share_the_folder(tmp_path, nifti_writer):
    folder = tmp_path / "brats"
    for case in ("BraTS_001", "BraTS_002", "BraTS_003"):
        for modality in ("t1", "flair", "t2"):
            nifti_writer(folder / f"{case}_{modality}.nii.gz", (8, 8, 8))
        nifti_writer(folder / f"{case}_seg.nii.gz", (8, 8, 8), dtype=np.uint8)
    (folder / "BraTS_003_flair.nii.gz").unlink()
    entries, skipped = dl.match_cases(folder, folder, label_suffix="_seg", modalities=["t1", "flair"])
    assert [e["name"] for e in entries] == ["BraTS_001", "BraTS_002"]
    assert [Path(p).name for p in entries[0]["image"]] == ["BraTS_001_t1.nii.gz", "BraTS_001_flair.nii.gz"]
    assert Path(entries[0]["label"]).name == "BraTS_001_seg.nii.gz"
    assert any(s.path == "BraTS_003" and "missing modality" in s.reason and "flair" in s.reason for s in skipped)


def test_label_csv_for_classification(tmp_path, nifti_writer):
    _write_cases(nifti_writer, tmp_path, ["a", "b"])
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("name,label\na.nii.gz,1\nb,0\n")
    entries, _ = dl.match_cases(tmp_path / "images", label_csv=csv_path)
    assert [(e["name"], e["label"]) for e in entries] == [("a", 1), ("b", 0)]
    csv_path.write_text("name,label\na,x\n")
    with pytest.raises(ValueError, match="line 2"):
        dl.match_cases(tmp_path / "images", label_csv=csv_path)


# ------------------------------------------------------------------ finetuning: splits and subsets


def _entries(n, folder="/data/set"):
    return [{"image": f"{folder}/img{i:03d}.nii.gz", "label": f"{folder}/lab{i:03d}.nii.gz"} for i in range(n)]


def test_split_fractions_and_seed_determinism():
    entries = _entries(20)
    split = dl.split_entries(entries, (0.7, 0.15, 0.15), seed=0)
    assert [len(split[s]) for s in dl.SPLITS] == [14, 3, 3]
    images = [e["image"] for s in dl.SPLITS for e in split[s]]
    assert sorted(images) == sorted(e["image"] for e in entries)  # a partition: disjoint and complete
    assert split == dl.split_entries(entries, (0.7, 0.15, 0.15), seed=0)
    assert split != dl.split_entries(entries, (0.7, 0.15, 0.15), seed=1)
    assert [len(v) for v in dl.split_entries(_entries(5), (0.7, 0.15, 0.15)).values()] == [3, 1, 1]
    with pytest.raises(ValueError, match="summing to 1"):
        dl.split_entries(entries, (0.7, 0.2, 0.2))


def test_dataset_percent_subsets_are_nested_and_stable():
    entries = _entries(40)
    sizes, previous = [], set()
    for percent in (10, 25, 50, 100):
        subset = {e["image"] for e in dl.subset_training(entries, percent, seed=3)}
        assert previous <= subset
        previous = subset
        sizes.append(len(subset))
    assert sizes == [4, 10, 20, 40]
    quarter = [e["image"] for e in dl.subset_training(entries, 25, seed=3)]
    shuffled = entries[:]
    random.Random(0).shuffle(shuffled)
    assert sorted(e["image"] for e in dl.subset_training(shuffled, 25, seed=3)) == sorted(quarter)
    moved = [e["image"] for e in dl.subset_training(_entries(40, "/elsewhere/copy"), 25, seed=3)]
    assert moved == [q.replace("/data/set", "/elsewhere/copy") for q in quarter]
    assert set(quarter) != {e["image"] for e in dl.subset_training(entries, 25, seed=4)}
    with pytest.raises(ValueError, match="percent"):
        dl.subset_training(entries, 0, seed=0)


def test_cli_finetune_end_to_end(tmp_path, nifti_writer):
    _write_cases(nifti_writer, tmp_path, [f"case{i:02d}" for i in range(10)])
    nifti_writer(tmp_path / "labels" / "case09.nii.gz", (8, 8, 9), dtype=np.uint8)  # off-grid: dropped
    out = tmp_path / "list.json"
    argv = ["finetune", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"),
            "--split", "0.6", "0.2", "0.2", "--seed", "0", "--dataset-percent", "50",
            "-o", str(out), "--relative", "--no-progress"]
    assert dl.main(argv) == 1  # case09 skipped (listed in list.json.skipped.tsv); the other nine written
    assert "case09" in Path(str(out) + ".skipped.tsv").read_text()
    data = dl.load_finetune_datalist(out, progress=False)
    assert [len(data[s]) for s in dl.SPLITS] == [3, 2, 2]  # 9 good cases -> 5/2/2, half of 5 training -> 3
    assert "case09" not in json.dumps(data) and data["meta"]["dataset_percent"] == 50
    assert not Path(json.loads(out.read_text())["training"][0]["image"]).is_absolute()


# ------------------------------------------------------------------ validation


def test_every_finetune_problem_is_reported_in_one_error(tmp_path, nifti_writer):
    good = nifti_writer(tmp_path / "good.nii.gz", (8, 8, 8))
    label = nifti_writer(tmp_path / "good_label.nii.gz", (8, 8, 8), dtype=np.uint8)
    shifted_affine = np.eye(4)
    shifted_affine[:3, 3] = [5.0, 0, 0]
    nifti_writer(tmp_path / "moved_label.nii.gz", (8, 8, 8), affine=shifted_affine, dtype=np.uint8)
    nifti_writer(tmp_path / "small_label.nii.gz", (8, 8, 7), dtype=np.uint8)
    nifti_writer(tmp_path / "other_modality.nii.gz", (8, 8, 6))
    nifti_writer(tmp_path / "flat.nii.gz", (8, 8))
    (tmp_path / "corrupt.nii.gz").write_bytes(b"\x00" * 10)
    datalist = {
        "training": [
            {"image": "good.nii.gz", "label": "good_label.nii.gz"},
            {"image": "missing.nii.gz", "label": "good_label.nii.gz"},
            {"image": "corrupt.nii.gz", "label": "good_label.nii.gz"},
            {"image": "flat.nii.gz", "label": "good_label.nii.gz"},
            {"image": "good.nii.gz", "label": "small_label.nii.gz"},
            {"image": "good.nii.gz", "label": "moved_label.nii.gz"},
            {"image": ["good.nii.gz", "other_modality.nii.gz"], "label": "good_label.nii.gz"},
            {"image": "good.nii.gz"},
            {"image": "good.nii.gz", "label": -1},
            "good.nii.gz",
        ],
        "validation": [{"image": str(good), "label": str(label)}],
    }
    path = tmp_path / "list.json"
    path.write_text(json.dumps(datalist))
    with pytest.raises(dl.DatalistError) as info:
        dl.load_finetune_datalist(path, progress=False)
    message = str(info.value)
    expected = [
        ("training[1].image", "file not found"),
        ("training[2].image", "header unreadable"),
        ("training[3].image", "2D volume"),
        ("training[4].label", "spatial shape"),
        ("training[5].label", "affine differs"),
        ("training[6].image[1]", "modality grid differs"),
        ("training[7].label", "no 'label'"),
        ("training[8].label", "negative"),
        ("training[9]", "not an object"),
        ("validation[0]", "same image as training[0]"),
    ]
    for where, reason in expected:
        assert any(p.where == where and reason in p.reason for p in info.value.problems), (where, reason, message)
        assert where in message and reason in message
    assert len(info.value.problems) == len(expected) and "hint:" in message and str(path) in message
    assert isinstance(info.value, ValueError)


def test_every_pretrain_problem_is_reported_in_one_error(tmp_path, nifti_writer):
    nifti_writer(tmp_path / "v.nii.gz", (8, 8, 8), spacing=(2.0, 2.0, 2.0))
    nifti_writer(tmp_path / "five_d.nii.gz", (4, 4, 4, 2, 2))
    entries = [
        {"image": "v.nii.gz", "shape": [8, 8, 8], "spacing": [2.0, 2.0, 2.0]},
        {"image": "v.nii.gz", "shape": [9, 8, 8]},
        {"image": "v.nii.gz", "spacing": [1.0, 1.0, 1.0]},
        {"image": "gone.nii.gz"},
        {"image": "five_d.nii.gz"},
        {"path": "v.nii.gz"},
    ]
    path = tmp_path / "pre.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(dl.DatalistError) as info:
        dl.load_pretrain_datalist(path, progress=False)
    got = {(p.where, p.reason.split(" ")[0]) for p in info.value.problems}
    assert got == {("[1]", "stated"), ("[2]", "stated"), ("[3]", "file"), ("[4]", "5D"), ("[5]", "entry")}
    assert "shape [9, 8, 8]" in str(info.value) and "spacing [1.0, 1.0, 1.0]" in str(info.value)


def test_malformed_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"training": [\n  {"image": "a.nii.gz",}\n]}')
    for loader in (dl.load_finetune_datalist, dl.load_pretrain_datalist, dl.load_datalist):
        with pytest.raises(dl.DatalistError, match=r"broken\.json is not valid JSON \(line 2"):
            loader(path)
    with pytest.raises(dl.DatalistError, match="must hold a JSON list"):
        path.write_text("{}")
        dl.load_pretrain_datalist(path)
    with pytest.raises(dl.DatalistError, match="not found"):
        dl.load_finetune_datalist(tmp_path / "absent.json")


def test_valid_finetune_datalist_loads_with_absolute_paths(tmp_path, nifti_writer):
    _write_cases(nifti_writer, tmp_path, ["a", "b", "c"], modalities=("_t1", "_t2"))
    entries = [
        {"image": [f"images/{n}_t1.nii.gz", f"images/{n}_t2.nii.gz"], "label": f"labels/{n}.nii.gz"} for n in "abc"
    ]
    path = tmp_path / "list.json"
    test = [{"image": entries[2]["image"]}]
    path.write_text(json.dumps({"training": entries[:2], "test": test, "labels": {"0": "bg"}}))
    data = dl.load_finetune_datalist(path, progress=False)
    assert data["validation"] == [] and data["labels"] == {"0": "bg"}
    assert data["training"][0]["image"][1] == str(tmp_path / "images" / "a_t2.nii.gz")
    assert data["training"][1]["label"] == str(tmp_path / "labels" / "b.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.diag([2.0, 1, 1, 1])), tmp_path / "labels" / "a.nii.gz")
    with pytest.raises(dl.DatalistError, match=r"training\[0\]\.label"):
        dl.load_finetune_datalist(path, progress=False)
    assert dl.load_finetune_datalist(path, validate=False, progress=False)["training"][0]["label"].endswith("a.nii.gz")


def test_cli_build_without_skips_exits_0_and_writes_no_skip_report(tmp_path, nifti_writer):
    for name in ("a", "b"):
        nifti_writer(tmp_path / "scans" / f"{name}.nii.gz", (16, 16, 16))
    out = tmp_path / "p.json"
    assert dl.main(["pretrain", str(tmp_path / "scans"), "-o", str(out), "--min-size", "16", "--no-progress"]) == 0
    assert len(json.loads(out.read_text())) == 2 and not Path(str(out) + ".skipped.tsv").exists()
