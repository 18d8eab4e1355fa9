"""Config merge: default <- file <- key=value, errors that name the file."""

import pytest
from omegaconf import OmegaConf

from dinov2.utils.config import config_to_dict, merge_configs, save_config, unknown_keys


@pytest.fixture()
def default(tmp_path):
    path = tmp_path / "default.yaml"
    path.write_text("optim:\n  lr: 0.001\n  epochs: 100\nstudent:\n  arch: vit_large_3d\n  patch_size: 16\n")
    return path


def test_file_then_overrides_win(default, tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("optim:\n  epochs: 10\nstudent:\n  arch: vit_small_3d\n")
    cfg = merge_configs(default, user, ["optim.epochs=3", "train.new_key=5"])
    assert cfg.optim.lr == 0.001          # from the default
    assert cfg.student.arch == "vit_small_3d"  # from the file
    assert cfg.optim.epochs == 3          # from the override, last wins
    assert unknown_keys(cfg, OmegaConf.load(default)) == ["train"]


def test_required_values_are_known_keys():
    reference = OmegaConf.create({"train": {"datalist": "???", "batch": 2}})
    cfg = OmegaConf.create({"train": {"datalist": "a.json", "batchh": 3}})
    assert unknown_keys(cfg, reference) == ["train.batchh"]


def test_interpolations_are_resolved(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: 2\nb: ${a}\n")
    cfg = merge_configs(path)
    assert config_to_dict(cfg) == {"a": 2, "b": 2}


def test_saved_config_round_trips(default, tmp_path):
    cfg = merge_configs(default, overrides=["optim.lr=0.5"])
    out = save_config(cfg, tmp_path / "run")
    assert OmegaConf.load(out) == cfg


def test_errors_name_the_file_and_the_fix(default, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml.*--config-file"):
        merge_configs(default, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        merge_configs(default, bad)
    with pytest.raises(ValueError, match="key=value"):
        merge_configs(default, overrides=["optim.lr"])
    with pytest.raises(FileNotFoundError, match="No packaged config"):
        merge_configs("no_such_packaged_config")
