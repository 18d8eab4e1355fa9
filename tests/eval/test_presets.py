"""Dataset presets: packaged ones validate; multi-label region channels and their decoding."""

from __future__ import annotations

import pytest
import torch

from dinov2.eval.presets import DatasetPreset, load_preset, region_decoding_table
from dinov2.eval.segmentation.data import LabelToRegionsd

pytestmark = pytest.mark.usefixtures("one_thread")  # as every segmentation test (tests/eval/conftest.py)


@pytest.mark.parametrize("name, channels, out", [("btcv", 1, 14), ("brats", 4, 3), ("la", 1, 2), ("brain_tissue", 1, 4)])
def test_packaged_presets(name, channels, out):
    preset = DatasetPreset.from_config(load_preset(name))
    assert preset.in_channels == channels and preset.out_channels == out
    assert preset.multilabel == (name == "brats")
    assert preset.foreground_channels == (list(range(out)) if preset.multilabel else list(range(1, out)))


def test_preset_from_a_yaml_path_and_resize_scale(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nmodalities: [CT]\nclasses: [bg, organ]\nloss: dice_ce\nspacing: [1, 1, 2]\n"
                    "orientation: RAS\nintensity: {mode: window, range: [-100, 200]}\nroi_size: 32\nresize_scale: 2\n")
    preset = DatasetPreset.from_config(load_preset(path))
    assert preset.spacing == (0.5, 0.5, 1.0) and preset.roi_size == (32, 32, 32)
    assert preset.datalist == "dataset.json"


@pytest.mark.parametrize("change, message", [
    ({"loss": "dice_ce", "classes": None}, "needs dataset.classes"),
    ({"classes": ["bg", "x"]}, "exactly one"),
    ({"intensity": {"mode": "percentile", "range": [99, 1]}}, "low < high"),
    ({"spacing": [1, 1]}, "3 values"),
])
def test_inconsistent_presets_are_rejected(change, message):
    raw = dict(load_preset("brats"))
    raw.update(change)
    with pytest.raises(ValueError, match=message):
        DatasetPreset.from_config(raw)


def test_brats_regions_and_their_decoding():
    preset = DatasetPreset.from_config(load_preset("brats"))
    label = torch.tensor([0, 1, 2, 4]).view(1, 4, 1, 1).float()
    regions = LabelToRegionsd("label", preset.regions)({"label": label})["label"]
    # channels TC, WT, ET for labels 0, 1, 2, 4
    assert regions[:, :, 0, 0].T.tolist() == [[0, 0, 0], [1, 1, 0], [0, 1, 0], [1, 1, 1]]
    table = region_decoding_table(preset.regions)
    code = lambda tc, wt, et: tc + 2 * wt + 4 * et  # noqa: E731
    assert table[code(0, 0, 0)] == 0 and table[code(1, 1, 1)] == 4
    assert table[code(1, 1, 0)] == 1 and table[code(0, 1, 0)] == 2
