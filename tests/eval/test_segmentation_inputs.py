"""Bad inputs of segmentation prediction and finetuning data: one line naming the file, the others go on.

predict: every bad case is skipped with one line naming its file and the reason, listed in
skipped.tsv, leaves no output file, and makes the exit code 1; the good cases are still predicted.
Finetuning data: label maps are checked against the preset's classes and their image's grid before
training.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dinov2.checkpoints.finetuned import save_finetuned
from dinov2.data.datalist.format import DatalistError
from dinov2.data.validation import InputVolumeError
from dinov2.eval.presets import DatasetPreset, load_preset
from dinov2.eval.segmentation import predict
from dinov2.eval.segmentation.data import label_classes, load_splits
from dinov2.eval.segmentation.model import build_segmentation_model
from dinov2.models import build_model

SHAPE = (16, 16, 16)


def tiny_preset(**changes) -> DatasetPreset:
    raw = dict(load_preset("brain_tissue"))
    size_key = "image_size" if "image_size" in raw else "roi_size"
    raw.update({size_key: [16, 16, 16], "classes": ["background", "bright"],
                "intensity": {"mode": "percentile", "lower": 0, "upper": 100}, "datalist": "dataset.json"})
    raw.update(changes)
    return DatasetPreset.from_config(raw)


def volume(seed: int = 0, shape=SHAPE) -> np.ndarray:
    """A box brighter than its surroundings, plus noise."""
    data = np.random.default_rng(seed).uniform(0, 10, size=shape).astype(np.float32)
    data[4:12, 4:12, 4:12] += 100
    return data


def save(path: Path, data: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def good(path: Path) -> Path:
    return save(path, volume())


def truncated(path: Path) -> Path:
    full = gzip.compress(nib.Nifti1Image(volume(), np.eye(4)).to_bytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(full[: len(full) // 2])
    return path


def random_bytes(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    return path


def empty(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def all_nan(path: Path) -> Path:
    return save(path, np.full(SHAPE, np.nan, dtype=np.float32))


def two_d(path: Path) -> Path:
    return save(path, volume(shape=(16, 16, 1))[..., 0])


def four_d(path: Path) -> Path:
    """Three frames; frame 1 is the only one with the bright box."""
    frames = [np.zeros(SHAPE, np.float32) + 5, volume(), np.zeros(SHAPE, np.float32) + 5]
    return save(path, np.stack(frames, axis=-1))


def five_d(path: Path) -> Path:
    return save(path, np.stack([volume()] * 2, axis=-1)[..., None, :])


BAD = {"empty": (empty, "empty"), "truncated_gzip": (truncated, "truncated"),
       "random_bytes": (random_bytes, "not gzip"), "two_d": (two_d, "2D"),
       "four_d_without_frame": (four_d, "--frame"), "five_d": (five_d, "5D"), "all_nan": (all_nan, "no finite voxel")}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A finetuned checkpoint of a tiny random UNETR (1 channel, 2 classes)."""
    torch.manual_seed(0)
    kwargs = {"embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 8, "img_size": 16}
    model = build_segmentation_model(build_model("vit_tiny_3d", **kwargs), "UNETR", 1, 2, {"feature_size": 4})
    config = {"model": {"unetr": {"feature_size": 4}, "modality_merge": "concat"}, "evaluation": {"overlap": 0.25}}
    path = tmp_path_factory.mktemp("ckpt") / "best_model.pth"
    return save_finetuned(path, model, {"arch": "vit_tiny_3d", "kwargs": kwargs}, config, tiny_preset(), 7,
                          {"name": "x", "value": 0.5})


def run(checkpoint, inputs, out: Path, *extra: str) -> int:
    inputs = inputs if isinstance(inputs, list) else [inputs]
    return predict.main(["--checkpoint", str(checkpoint), "--input", *map(str, inputs), "--output", str(out),
                         "--device", "cpu", *extra])


def skipped_rows(out: Path) -> list[dict]:
    with open(out / "skipped.tsv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def assert_no_traceback(capsys, caplog) -> str:
    captured = capsys.readouterr()
    text = captured.err + captured.out + caplog.text
    assert "Traceback" not in text, text
    return text


@pytest.mark.parametrize("kind", list(BAD))
def test_predict_skips_a_bad_input_with_one_line(kind, checkpoint, tmp_path, capsys, caplog):
    make, words = BAD[kind]
    bad = make(tmp_path / "in" / f"{kind}.nii.gz")
    out = tmp_path / "out"
    assert run(checkpoint, bad, out) == 1
    text = assert_no_traceback(capsys, caplog)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and str(bad) in r.getMessage()]
    assert len(lines) == 1 and words in lines[0], lines  # one line: the file and the reason
    assert "Traceback" not in text
    assert [(row["path"], words in row["reason"]) for row in skipped_rows(out)] == [(str(bad), True)]
    assert sorted(p.name for p in out.iterdir()) == ["skipped.tsv"]  # no output (nor temporary) file


def test_predict_4d_input_with_frame(checkpoint, tmp_path, capsys, caplog):
    series = four_d(tmp_path / "in" / "series.nii.gz")
    out = tmp_path / "out"
    assert run(checkpoint, series, out, "--frame", "1") == 0
    assert_no_traceback(capsys, caplog)
    written = nib.load(out / "series_seg.nii.gz")
    assert written.shape == SHAPE
    assert (out / "series_seg.png").is_file() and not (out / "skipped.tsv").exists()
    assert run(checkpoint, series, tmp_path / "out9", "--frame", "9") == 1
    assert "has 3 frames" in skipped_rows(tmp_path / "out9")[0]["reason"]
    assert not (tmp_path / "out9" / "series_seg.nii.gz").exists()


def test_predict_tolerates_some_infinite_voxels_with_one_warning(checkpoint, tmp_path, capsys, caplog):
    data = volume()
    data[0, 0, 0], data[1, 2, 3], data[5, 5, 5] = np.inf, -np.inf, np.nan
    path = save(tmp_path / "in" / "inf.nii.gz", data)
    caplog.set_level(logging.WARNING)
    assert run(checkpoint, path, tmp_path / "out", "--no-preview") == 0
    assert_no_traceback(capsys, caplog)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and str(path) in r.getMessage()]
    assert len(warnings) == 1 and "3 of 4096 voxels" in warnings[0], warnings
    labels = np.asarray(nib.load(tmp_path / "out" / "inf_seg.nii.gz").dataobj)
    assert labels.shape == SHAPE and set(np.unique(labels)) <= {0, 1}


def test_predict_on_a_folder_predicts_the_good_and_lists_the_bad(checkpoint, tmp_path, capsys, caplog):
    folder = tmp_path / "in"
    good(folder / "a_good.nii.gz")
    save(folder / "b_good.nii.gz", volume(seed=3))
    bad = [truncated(folder / "c_truncated.nii.gz"), all_nan(folder / "d_nan.nii.gz")]
    out = tmp_path / "out"
    assert run(checkpoint, folder, out, "--no-preview") == 1
    text = assert_no_traceback(capsys, caplog)
    assert sorted(p.name for p in out.iterdir()) == ["a_good_seg.nii.gz", "b_good_seg.nii.gz", "skipped.tsv"]
    assert [row["path"] for row in skipped_rows(out)] == [str(p) for p in bad]
    assert "2 of 4 case(s) skipped" in text
    # A later run without bad cases removes the stale table.
    for path in bad:
        path.unlink()
    assert run(checkpoint, folder, out, "--no-preview") == 0
    assert not (out / "skipped.tsv").exists()


def test_predict_several_inputs_and_a_three_frame_file_for_a_one_channel_model(checkpoint, tmp_path, capsys, caplog):
    first, series = good(tmp_path / "one.nii.gz"), four_d(tmp_path / "three_frames.nii.gz")
    out = tmp_path / "out"
    assert run(checkpoint, [first, series], out, "--no-preview") == 1
    assert_no_traceback(capsys, caplog)
    (row,) = skipped_rows(out)
    assert row["path"] == str(series) and "3 frames" in row["reason"] and "takes one 3D volume" in row["reason"]
    assert sorted(p.name for p in out.iterdir()) == ["one_seg.nii.gz", "skipped.tsv"]


def test_predict_case_raises_the_input_error(tmp_path):
    from dinov2.eval.segmentation.inference import predict_case

    bad = random_bytes(tmp_path / "noise.nii.gz")
    with pytest.raises(InputVolumeError) as raised:
        predict_case(torch.nn.Identity(), tiny_preset(), [str(bad)], tmp_path / "pred.nii.gz")
    assert str(bad) in str(raised.value) and not (tmp_path / "pred.nii.gz").exists()
    three = tiny_preset(modalities=["a", "b", "c"])
    with pytest.raises(InputVolumeError, match="takes 3 channels"):
        predict_case(torch.nn.Identity(), three, [str(good(tmp_path / "g.nii.gz"))], tmp_path / "pred.nii.gz")


class MeanThreshold(torch.nn.Module):
    """Class 1 where the channels' mean normalised intensity exceeds 0.5."""

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        return torch.cat([0.5 - mean, mean - 0.5], dim=1) * 20


def test_a_4d_file_gives_a_multi_channel_model_its_channels(tmp_path):
    from dinov2.eval.segmentation.inference import predict_case

    series = save(tmp_path / "two.nii.gz", np.stack([volume(), volume(seed=1)], axis=-1))
    out = predict_case(MeanThreshold(), tiny_preset(modalities=["a", "b"]), [str(series)], tmp_path / "p.nii.gz",
                       overlap=0.25)
    labels = np.asarray(nib.load(out).dataobj)
    assert labels.shape == SHAPE and labels[8, 8, 8] == 1 and labels[0, 0, 0] == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


# ------------------------------------------------------------------------------------------------
# Finetuning data: label maps against the preset's classes and their image's grid
# ------------------------------------------------------------------------------------------------


def write_dataset(root: Path, label: np.ndarray, label_affine=None) -> Path:
    """A datalist with one good validation case and a training case whose label map is ``label``."""
    image = save(root / "img.nii.gz", volume())
    ok_label = np.zeros(SHAPE, np.uint8)
    ok_label[4:12, 4:12, 4:12] = 1
    save(root / "val_img.nii.gz", volume(seed=5))
    save(root / "val_lab.nii.gz", ok_label)
    save(root / "lab.nii.gz", label, label_affine)
    entries = {"training": [{"image": "img.nii.gz", "label": "lab.nii.gz"}],
               "validation": [{"image": "val_img.nii.gz", "label": "val_lab.nii.gz"}]}
    (root / "dataset.json").write_text(json.dumps(entries))
    return image


def test_label_values_outside_the_classes_are_an_error_naming_the_file(tmp_path):
    label = np.zeros(SHAPE, np.uint8)
    label[2:4, 2:4, 2:4], label[8, 8, 8] = 3, 7
    write_dataset(tmp_path, label)
    with pytest.raises(DatalistError) as raised:
        load_splits(tiny_preset(), tmp_path)
    message = str(raised.value)
    assert str(tmp_path / "lab.nii.gz") in message and "value(s) 3, 7" in message
    assert "0 background, 1 bright" in message and "val_lab" not in message


def test_a_remapped_label_value_is_accepted(tmp_path):
    label = np.zeros(SHAPE, np.uint8)
    label[2:4, 2:4, 2:4] = 9
    write_dataset(tmp_path, label)
    splits = load_splits(tiny_preset(remap={9: 1}), tmp_path)
    assert len(splits["training"]) == 1
    assert label_classes(tiny_preset(remap={9: 1}))[0] == {0, 1, 9}


def test_label_shape_mismatch_names_both_files(tmp_path):
    image = write_dataset(tmp_path, np.zeros((16, 16, 12), np.uint8))
    with pytest.raises(DatalistError) as raised:
        load_splits(tiny_preset(), tmp_path)
    assert str(tmp_path / "lab.nii.gz") in str(raised.value) and str(image) in str(raised.value)


def test_label_affine_mismatch_names_both_files(tmp_path):
    image = write_dataset(tmp_path, np.zeros(SHAPE, np.uint8), label_affine=np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(DatalistError) as raised:
        load_splits(tiny_preset(), tmp_path)
    message = str(raised.value)
    assert str(tmp_path / "lab.nii.gz") in message and str(image) in message and "affine" in message


def test_regions_allow_background_and_every_region_value():
    brats = DatasetPreset.from_config(dict(load_preset("brats")))
    allowed, words = label_classes(brats)
    assert allowed == {0, 1, 2, 4} and "TC = [1, 4]" in words


# ------------------------------------------------------------------------------------------------
# Visualisation entry: a bad image is one ERROR line naming it
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["truncated_gzip", "four_d_without_frame", "all_nan"])
def test_visualisation_cli_names_a_bad_image(kind, tmp_path, error_line):
    from dinov2.eval.visualisation import run as vis_run

    make, words = BAD[kind]
    path = make(tmp_path / f"{kind}.nii.gz")
    frame = ["--frame", "7"] if kind == "four_d_without_frame" else []  # vis defaults to frame 0: ask for a missing one
    words = "has 3 frames" if kind == "four_d_without_frame" else words
    out = tmp_path / "vis"
    assert vis_run.main(["--pretrained-weights", "none", "--arch", "vit_tiny_3d", "--backbone-kwarg", "patch_size=8",
                         "--image-path", str(path), "--output-dir", str(out), *frame]) == 1
    line = error_line()
    assert str(path) in line and words in line, line
    assert not out.exists() or not any(out.iterdir())
