"""Dataset presets: packaged ones validate; multi-label region channels and their decoding."""

from __future__ import annotations

import pytest
import torch

from dinov2.eval.presets import DatasetPreset, load_preset, region_decoding_table
from dinov2.eval.segmentation.data import LabelToRegionsd, intensity_transform

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


def test_intensity_speaks_the_pretraining_vocabulary_and_reads_the_old_spelling_with_a_warning(tmp_path):
    path = tmp_path / "mine.yaml"
    base = "name: mine\nmodalities: [CT]\nclasses: [bg, organ]\nloss: dice_ce\nspacing: [1, 1, 2]\norientation: RAS\n"
    path.write_text(base + "intensity: {mode: ct_window, lower: -100, upper: 200}\nimage_size: 32\n")
    new = DatasetPreset.from_config(load_preset(path)).intensity
    assert new == {"mode": "ct_window", "lower": -100, "upper": 200, "b_min": 0.0, "b_max": 1.0}
    path.write_text(base + "intensity: {mode: window, range: [-100, 200]}\nimage_size: 32\n")
    with pytest.warns(FutureWarning, match="dataset.intensity.mode=ct_window"):
        old = DatasetPreset.from_config(load_preset(path)).intensity
    assert old == new
    # the same transform as before the vocabulary changed: the window mapped to [0, 1], clipped
    image = torch.tensor([[-300.0, -100.0, 50.0, 200.0, 900.0]]).view(1, 5, 1, 1)
    scaled = intensity_transform(DatasetPreset.from_config(load_preset(path)))({"image": image})["image"]
    assert torch.allclose(torch.as_tensor(scaled).flatten(), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


@pytest.mark.parametrize("change, message", [
    ({"loss": "dice_ce", "classes": None}, "needs dataset.classes"),
    ({"classes": ["bg", "x"]}, "exactly one"),
    ({"intensity": {"mode": "percentile", "lower": 99, "upper": 1}}, "lower < upper"),
    ({"intensity": {"mode": "ct_window", "lower": -100}}, "lower < upper"),
    ({"intensity": {"mode": "percentile", "lower": 1, "upper": 120}}, r"\[0, 100\]"),
    ({"intensity": {"mode": "window"}}, "ct_window"),
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
