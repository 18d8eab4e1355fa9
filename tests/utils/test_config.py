"""Config: the one strict builder (default <- preset <- file <- flags <- key=value), errors that name
the key, its source and the closest known key, and the deprecated spellings."""

import warnings

import pytest
from omegaconf import DictConfig, OmegaConf

from dinov2.utils.config import (
    COMMAND_LINE,
    DEPRECATED_KEYS,
    ConfigError,
    closest_key,
    config_to_dict,
    known_keys,
    load_config,
    load_yaml,
    merge_configs,
    packaged_config_path,
    save_config,
    unknown_keys,
)
from dinov2.utils.deprecation import DeprecatedConfigKeyWarning


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


# ------------------------------------------------------------------------------- load_config
def test_unknown_key_in_a_file_names_key_file_and_closest_key(default, tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("optim:\n  epochs: 10\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(default, user)
    message = str(info.value)
    assert "'optim.lrr'" in message and str(user) in message and "closest known key: 'optim.lr'" in message
    assert "\n" not in message and isinstance(info.value, ValueError)


def test_unknown_key_in_an_override_names_the_command_line(default):
    with pytest.raises(ConfigError, match=r"'student.archh' \(closest known key: 'student.arch'\) on the command line"):
        load_config(default, overrides=["student.archh=vit_small_3d"])
    with pytest.raises(ConfigError, match=r"'nothing_like_it' \(no known key is close\)"):
        load_config(default, overrides=["nothing_like_it=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(default, overrides=["optim.lr"])


def test_merge_order_default_preset_file_flags_overrides(tmp_path):
    default = tmp_path / "d.yaml"
    default.write_text("dataset:\n  name: null\n  a: 0\n  b: 0\n  c: 0\n  d: 0\n")
    user = tmp_path / "u.yaml"
    user.write_text("dataset:\n  name: p\n  b: 2\n  c: 2\n  d: 2\n")
    presets = {"p": OmegaConf.create({"a": 1, "b": 1, "c": 1, "d": 1})}
    cfg = load_config(default, user, {"dataset.c": 3, "dataset.d": 3}, ["dataset.d=4"], preset_loader=presets.__getitem__)
    assert dict(cfg.dataset) == {"name": "p", "a": 1, "b": 2, "c": 3, "d": 4}


def test_the_preset_named_last_wins_and_its_unknown_keys_name_it(tmp_path):
    default = tmp_path / "d.yaml"
    default.write_text("dataset:\n  name: null\n  image_size: 1\n")
    loaded = []

    def loader(name):
        loaded.append(name)
        return OmegaConf.create({"image_sise": 2} if name == "bad" else {"image_size": 2})

    cfg = load_config(default, flags={"dataset.name": "first"}, overrides=["dataset.name=second"], preset_loader=loader)
    assert loaded == ["second"] and cfg.dataset.image_size == 2
    with pytest.raises(ConfigError, match=r"'dataset.image_sise' \(closest known key: 'dataset.image_size'\) in "
                                          r"dataset preset 'bad'"):
        load_config(default, overrides=["dataset.name=bad"], preset_loader=loader)


def test_open_sections_take_any_key_and_null_sections_any_mapping(tmp_path):
    default = tmp_path / "d.yaml"
    default.write_text("model:\n  backbone_kwargs: {}\n  regions: null\n")
    cfg = load_config(default, overrides=["model.backbone_kwargs.depth=2", "model.regions={TC: [1, 4]}"],
                      open_keys=("model.backbone_kwargs",))
    assert cfg.model.backbone_kwargs.depth == 2 and list(cfg.model.regions.TC) == [1, 4]
    with pytest.raises(ConfigError, match="model.backbone_kwargs.depth"):
        load_config(default, overrides=["model.backbone_kwargs.depth=2"])


def test_a_required_value_in_a_later_file_stays_required(default, tmp_path):
    stage = tmp_path / "stage.yaml"
    stage.write_text("student:\n  arch: ???\n")
    assert OmegaConf.missing_keys(load_config(default, stage)) == {"student.arch"}
    assert not OmegaConf.missing_keys(load_config(default, stage, overrides=["student.arch=vit_small_3d"]))


def test_config_file_may_be_a_packaged_name():
    cfg = load_config(["data_defaults", "ssl3d_default_config"], "train/vit3d_highres", overrides=["train.datalist=x"])
    assert cfg.crops.global_crops_size == 112
    with pytest.raises(FileNotFoundError, match="no_such.yaml: no such file, nor a packaged config"):
        load_config("ssl3d_default_config", "no_such.yaml")


def test_closest_key_prefers_the_same_section_then_the_leaf_name():
    known = ["optim.lr", "optim.min_lr", "train.batch_size", "evaluation.eval_period_iterations"]
    assert closest_key("optim.lrr", known) == "optim.lr"
    assert closest_key("train.eval_period_iterations", known) == "evaluation.eval_period_iterations"
    assert closest_key("zzz", known) is None


# One case per old spelling, each through the segmentation defaults (which know every new key).
SEGMENTATION = "eval/segmentation_default"
OLD_VALUES = {"train.device": "cpu", "train.amp": "fp32", "train.eval_iters": 7, "train.log_every": 3,
              "dataset_name": "brain_tissue", "base_data_dir": "/data", "dataset_percent": 50,
              "dataset.roi_size": [32, 32, 32]}


def test_every_deprecated_spelling_has_a_case():
    assert set(OLD_VALUES) == set(DEPRECATED_KEYS)
    assert set(DEPRECATED_KEYS.values()) <= set(known_keys(load_yaml(packaged_config_path(SEGMENTATION))))


@pytest.mark.parametrize("old", list(DEPRECATED_KEYS))
def test_deprecated_spelling_in_an_override_works_and_warns_naming_the_new_key(old):
    new, value = DEPRECATED_KEYS[old], OLD_VALUES[old]
    item = f"{old}={value}" if not isinstance(value, list) else f"{old}=[{','.join(map(str, value))}]"
    with pytest.warns(DeprecatedConfigKeyWarning) as record:
        cfg = load_config(SEGMENTATION, overrides=[item])
    (warning,) = [w for w in record if issubclass(w.category, DeprecatedConfigKeyWarning)]
    assert f"'{old}' is deprecated" in str(warning.message) and f"use '{new}'" in str(warning.message)
    assert warning.filename == COMMAND_LINE
    got = OmegaConf.select(cfg, new)
    assert (OmegaConf.to_container(got) if OmegaConf.is_config(got) else got) == value
    assert OmegaConf.select(cfg, old) is None  # moved, not copied


@pytest.mark.parametrize("old", list(DEPRECATED_KEYS))
def test_deprecated_spelling_in_a_file_works_and_warns_naming_the_file(old, tmp_path):
    new, value = DEPRECATED_KEYS[old], OLD_VALUES[old]
    user = tmp_path / "old.yaml"
    OmegaConf.save(_nested(old, value), user)
    with pytest.warns(DeprecatedConfigKeyWarning, match=f"use '{new}'") as record:
        cfg = load_config(SEGMENTATION, user)
    assert any(w.filename == str(user) for w in record)
    got = OmegaConf.select(cfg, new)
    assert (OmegaConf.to_container(got) if OmegaConf.is_config(got) else got) == value


def _nested(dotted: str, value) -> DictConfig:
    cfg = OmegaConf.create()
    OmegaConf.update(cfg, dotted, value, force_add=True)
    return cfg


def test_old_and_new_spelling_together_is_an_error():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecatedConfigKeyWarning)
        with pytest.raises(ConfigError, match="Both 'train.amp' \\(deprecated\\) and 'compute_precision.dtype' are set "
                                              "on the command line"):
            load_config(SEGMENTATION, overrides=["train.amp=fp32", "compute_precision.dtype=bf16"])


def test_an_old_spelling_where_the_new_key_is_unknown_stays_unknown():
    # Linear probing has no compute_precision: train.amp is reported, not moved.
    with pytest.raises(ConfigError, match="'train.amp'"):
        load_config("eval/linear_default", overrides=["train.amp=fp32"])


def test_a_misspelt_old_spelling_points_to_the_new_key():
    with pytest.raises(ConfigError, match=r"'dataset.roi_sise' \(closest known key: 'dataset.image_size'\)"):
        load_config(SEGMENTATION, overrides=["dataset.roi_sise=3"])


def test_packaged_defaults_of_every_entry_point_load_strictly():
    for default in (["data_defaults", "ssl3d_default_config"], "eval/segmentation_default", "eval/linear_default"):
        assert isinstance(load_config(default), DictConfig)
