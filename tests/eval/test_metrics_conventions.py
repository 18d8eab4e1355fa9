"""The metric conventions users compare against (nnU-Net's), on hand-made masks with known answers.

Cubes of 4 x 4 x 4 voxels in a 12^3 volume; the spacing is anisotropic (2 mm along the first axis)
so that a distance in voxels and a distance in mm differ.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dinov2.eval.presets import segmentation_preset_defaults
from dinov2.eval.segmentation.metrics import (DEFAULT_NSD_TOLERANCE_MM, SUMMARY_NAMES, build_summary, case_metrics,
                                              nsd_tolerances, overlap_metrics, summarize, write_summary)

SPACING = (2.0, 1.0, 1.0)
NAMES = ["background", "perfect", "shift_2mm", "shift_1mm", "absent", "missed", "spurious"]
FOREGROUND = list(range(1, len(NAMES)))
CUBE = (slice(2, 6), slice(2, 6), slice(2, 6))


def shifted(axis: int, by: int = 1) -> tuple[slice, ...]:
    return tuple(slice(s.start + by, s.stop + by) if i == axis else s for i, s in enumerate(CUBE))


def hand_made_case() -> tuple[torch.Tensor, torch.Tensor]:
    """``(pred, target)`` ``(1, 7, 12, 12, 12)``: one class per situation of :data:`NAMES`."""
    pred, target = torch.zeros(2, 1, len(NAMES), 12, 12, 12)
    pred[0, 1][CUBE] = target[0, 1][CUBE] = 1
    target[0, 2][CUBE], pred[0, 2][shifted(0)] = 1, 1   # one voxel along the 2 mm axis
    target[0, 3][CUBE], pred[0, 3][shifted(2)] = 1, 1   # one voxel along a 1 mm axis
    target[0, 5][8:10, 8:10, 8:10] = 1                  # 8 voxels never predicted
    pred[0, 6][0:2, 0:2, 0:3] = 1                       # 12 voxels predicted, none in the reference
    pred[0, 0] = 1 - pred[0, 1:].amax(0)  # background: the rest (shifted cubes overlap: max, not sum)
    target[0, 0] = 1 - target[0, 1:].amax(0)
    return pred, target


@pytest.fixture(scope="module")
def metrics():
    pred, target = hand_made_case()
    # NSD tolerance 1 mm everywhere but the 2 mm shift, which gets both 1 mm (first call) and 2 mm
    return case_metrics(pred, target, SPACING, 1.0), case_metrics(pred, target, SPACING, [1, 1, 2, 1, 1, 1, 1])


def test_perfect_overlap(metrics):
    m, _ = metrics
    assert m["dice"][1] == m["iou"][1] == m["nsd"][1] == 1.0 and m["hd95"][1] == 0.0
    assert (m["tp"][1], m["fp"][1], m["fn"][1], m["n_ref"][1], m["n_pred"][1]) == (64, 0, 0, 64, 64)


def test_shifted_cube_in_mm_with_anisotropic_spacing(metrics):
    m, m2 = metrics
    # 3 of 4 slices overlap: TP 48, FP = FN = 16; Dice 96/128, IoU 48/80
    for k in (2, 3):
        assert (m["tp"][k], m["fp"][k], m["fn"][k]) == (48, 16, 16)
        assert math.isclose(m["dice"][k], 0.75) and math.isclose(m["iou"][k], 0.6, rel_tol=1e-6)  # MONAI: float32
    # The far face (16 of 56 boundary voxels each way, > 5 %) is one voxel off: 2 mm on axis 0, 1 mm on axis 2
    assert math.isclose(m["hd95"][2], 2.0) and math.isclose(m["hd95"][3], 1.0)
    # NSD at 1 mm: the 16 far-face voxels each way (2 mm off) fail, the other 40 are within 1 mm: 80/112
    assert math.isclose(m["nsd"][2], 80 / 112, rel_tol=1e-6)
    assert m["nsd"][3] == 1.0 and m2["nsd"][2] == 1.0  # within tolerance: 1 mm shift at 1 mm, 2 mm at 2 mm


def test_absent_from_both_is_nan_not_zero_or_one(metrics):
    m, _ = metrics
    assert all(math.isnan(m[k][4]) for k in ("dice", "iou", "hd95", "nsd"))
    assert all(m[k][4] == 0 for k in ("tp", "fp", "fn", "n_ref", "n_pred"))  # counts are facts, never NaN


def test_missed_class_has_no_hd95_and_scores_zero(metrics):
    m, _ = metrics
    assert m["dice"][5] == m["iou"][5] == m["nsd"][5] == 0.0
    assert math.isnan(m["hd95"][5])  # not the image diagonal
    assert (m["tp"][5], m["fn"][5], m["n_pred"][5]) == (0, 8, 0)


def test_spurious_class_scores_zero_without_hd95(metrics):
    m, _ = metrics
    assert m["dice"][6] == m["iou"][6] == m["nsd"][6] == 0.0 and math.isnan(m["hd95"][6])
    assert (m["fp"][6], m["n_ref"][6]) == (12, 0)


def test_dice_and_iou_agree_with_the_voxel_counts(metrics):
    m, _ = metrics
    measured = ~np.isnan(m["dice"])
    tp, fp, fn = m["tp"][measured], m["fp"][measured], m["fn"][measured]
    assert np.allclose(m["dice"][measured], 2 * tp / (2 * tp + fp + fn))
    assert np.allclose(m["iou"][measured], tp / (tp + fp + fn))


def test_outcome_counts_and_nan_means():
    pred, target = hand_made_case()
    first = case_metrics(pred, target, SPACING)
    # second case: "absent" is present and perfect, "missed" is found, the rest as before
    pred[0, 4][CUBE] = target[0, 4][CUBE] = 1
    pred[0, 5] = target[0, 5]
    second = case_metrics(pred, target, SPACING)
    s = summarize([first, second], NAMES, FOREGROUND)
    assert s["missed"]["missed"] == 1 and s["spurious"]["spurious"] == 2 and s["absent"]["absent"] == 1
    assert s["dice"]["absent"] == 1.0                      # the NaN of the first case is left out, not a 0
    assert s["dice"]["missed"] == 0.5                      # the miss counts as Dice 0
    assert s["hd95"]["missed"] == 0.0                      # HD95 from the found case only
    assert math.isnan(s["hd95"]["spurious"])               # never measurable
    fg_hd = [s["hd95"][n] for n in NAMES[1:] if not math.isnan(s["hd95"][n])]
    assert math.isclose(s["mean_hd95"], sum(fg_hd) / len(fg_hd))  # NaN classes are out of the mean
    only_absent = summarize([first], NAMES, FOREGROUND)
    assert math.isnan(only_absent["dice"]["absent"])
    fg_dice = [only_absent["dice"][n] for n in NAMES[1:] if n != "absent"]
    assert math.isclose(only_absent["mean_dice"], sum(fg_dice) / len(fg_dice))


def test_summary_json_structure_and_validity(tmp_path):
    pred, target = hand_made_case()
    case = {"name": "case_0", "reference_file": "labels/case_0.nii.gz", "spacing": list(SPACING),
            **case_metrics(pred, target, SPACING)}
    summary = build_summary([case], NAMES, FOREGROUND, split="test", iteration=7)
    text = write_summary(tmp_path / "summary.json", summary).read_text()

    def no_nan(token):
        raise AssertionError(f"non-standard JSON token {token}")

    data = json.loads(text, parse_constant=no_nan)
    assert {"metric_per_case", "mean", "foreground_mean", "missed", "spurious", "absent"} <= set(data)
    assert data["split"] == "test" and data["iteration"] == 7
    entry = data["metric_per_case"][0]
    assert entry["case"] == "case_0" and entry["reference_file"] == "labels/case_0.nii.gz"
    assert entry["prediction_file"] is None and entry["spacing_mm"] == list(SPACING)
    assert set(entry["metrics"]) == set(NAMES) == set(data["mean"])
    assert all(set(v) == set(SUMMARY_NAMES.values()) for v in entry["metrics"].values())
    assert entry["metrics"]["perfect"]["TP"] == 64 and isinstance(entry["metrics"]["perfect"]["TP"], int)
    assert entry["metrics"]["absent"]["Dice"] is None and entry["metrics"]["missed"]["HD95"] is None
    assert data["mean"]["absent"]["Dice"] is None and data["missed"]["missed"] == 1
    fg_dice = [data["mean"][n]["Dice"] for n in NAMES[1:] if data["mean"][n]["Dice"] is not None]
    assert math.isclose(data["foreground_mean"]["Dice"], sum(fg_dice) / len(fg_dice))
    with pytest.raises(ValueError):  # a NaN that escaped json_safe is refused, never written
        write_summary(tmp_path / "bad.json", {"x": float("nan")})


def test_validation_metrics_share_the_definitions():
    pred, target = hand_made_case()
    cheap, full = overlap_metrics(pred, target), case_metrics(pred, target, SPACING)
    assert set(cheap) == {"dice", "iou", "tp", "fp", "fn", "n_ref", "n_pred"}
    for key, values in cheap.items():
        np.testing.assert_array_equal(values, full[key])


def test_nsd_tolerances():
    assert segmentation_preset_defaults().nsd_tolerance_mm == DEFAULT_NSD_TOLERANCE_MM  # one documented default
    assert nsd_tolerances(2, ["background", "a"]) == [2.0, 2.0]
    assert nsd_tolerances([0, 1.5], ["background", "a"]) == [0.0, 1.5]
    for bad in ([1.0], [1.0, -1.0], [1.0, float("inf")], ["x", 1.0]):
        with pytest.raises(ValueError, match="nsd_tolerance_mm"):
            nsd_tolerances(bad, ["background", "a"])


def test_final_metrics_fall_back_to_validation():
    from dinov2.eval.segmentation.train_loop import _final_split

    labelled = [{"image": "a", "label": "b"}]
    assert _final_split({"test": labelled, "validation": []}) == ("test", labelled)
    assert _final_split({"test": [{"image": "a"}], "validation": [{"image": "v", "label": "w"}]})[0] == "validation"
