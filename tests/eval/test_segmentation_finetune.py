"""End to end: a short finetune on the embedded real brain-tissue set, results.json, checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dinov2.checkpoints.finetuned import load_finetuned
from dinov2.eval.segmentation import finetune
from dinov2.eval.segmentation.train_loop import build_train_loader
from dinov2.sample_data import write_segmentation_dataset
from dinov2.utils import cpus
from dinov2.utils.config import ConfigError, packaged_config_path
from dinov2.utils.deprecation import DeprecatedConfigKeyWarning

REPO_DATASETS = packaged_config_path("datasets/brain_tissue").parent

TINY_RUN = [
    "--pretrained-weights", "none", "--dataset-name", "brain_tissue", "--segmentation-head", "UNETR",
    "--epochs", "1", "--epoch-length", "40", "--eval-iters", "20", "--warmup-iters", "3", "--batch-size", "1",
    "--num-workers", "0", "--learning-rate", "3e-3", "--image-size", "32", "--resize-scale", "0.5",
    "model.arch=vit_tiny_3d", "model.backbone_kwargs={embed_dim: 32, depth: 4, num_heads: 2, patch_size: 8}",
    "model.unetr.feature_size=8", "train.log_period_iterations=10", "evaluation.overlap=0.25",
]


@pytest.fixture(scope="module")
def tissue_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("tissue")
    write_segmentation_dataset(out, labels="tissue", seed=0)
    return out


@pytest.fixture(scope="module")
def finetuned(tissue_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped fixture: the autouse per-test fixture does not cover it
    try:
        assert finetune.main(TINY_RUN + ["--base-data-dir", str(tissue_data), "--output-dir", str(out)]) == 0
    finally:
        torch.set_num_threads(previous)
    return out


def test_short_finetune_learns_tissue(finetuned):
    results = json.loads((finetuned / "results.json").read_text())
    train = results["curves"]["train"]
    assert [p["iteration"] for p in train] == [10, 20, 30, 40]
    assert train[-1]["loss"] < 0.85 * train[0]["loss"], train
    summary = results["test"]["summary"]
    gm, other = summary["dice"]["grey matter"], summary["dice"]["other brain"]
    # Thresholds from the label statistics of this set (4 mm grid: --resize-scale 0.5), with a
    # margin below what 40 iterations reach (GM ~0.78-0.81, other brain ~0.43-0.49):
    # * labelling every voxel "grey matter" gives GM Dice ~0.32, so GM > 0.65 needs brain/background;
    # * a perfect brain mask called all-GM gives GM 0.83 but other-brain 0, and a perfect brain mask
    #   split at random in the true proportions (71 % GM) gives GM + other ~= 0.71 + 0.29 = 1.0;
    #   GM + other > 1.1 therefore needs grey/white-matter contrast, not only the brain outline.
    assert gm > 0.65, summary
    assert gm + other > 1.1, summary
    assert summary["dice"]["background"] > 0.9


def test_the_run_draws_its_curves_when_it_ends(finetuned):
    assert (finetuned / "plots" / "finetuning.png").stat().st_size > 5000


def test_results_hold_curves_and_per_case_metrics(finetuned):
    results = json.loads((finetuned / "results.json").read_text())
    assert [v["iteration"] for v in results["curves"]["validation"]] == [20, 40]
    assert results["best"]["iteration"] in (20, 40)
    cases = results["test"]["cases"]
    assert len(cases) == 2  # the sample set's two test cases
    for case in cases:
        assert set(case["dice"]) == set(case["hd95"]) == {"background", "ventricles", "grey matter", "other brain"}
        assert all(v is None or 0.0 <= v <= 1.0 for v in case["dice"].values())
        assert all(v is None or v >= 0.0 for v in case["hd95"].values())
    summary = results["test"]["summary"]
    fg = [summary["dice"][k] for k in ("ventricles", "grey matter", "other brain")]
    assert math.isclose(summary["mean_dice"], sum(fg) / 3, rel_tol=1e-9)
    assert math.isclose(summary["mean_dice_with_background"], (sum(fg) + summary["dice"]["background"]) / 4,
                        rel_tol=1e-9)
    assert (finetuned / "config.yaml").is_file() and (finetuned / "last_checkpoint.pth").is_file()


def test_summary_json_beside_results_holds_the_same_final_evaluation(finetuned):
    results = json.loads((finetuned / "results.json").read_text())
    assert results["summary_json"] == {"file": "summary.json", "split": "test"}
    summary = json.loads((finetuned / "summary.json").read_text())  # strict JSON: null, never NaN
    channels = {"background", "ventricles", "grey matter", "other brain"}
    assert summary["split"] == "test" and summary["iteration"] == results["test"]["iteration"]
    assert len(summary["metric_per_case"]) == 2 and set(summary["mean"]) == channels
    for entry, case in zip(summary["metric_per_case"], results["test"]["cases"]):
        assert entry["case"] == case["name"] and entry["reference_file"].endswith(".nii.gz")
        assert set(entry["metrics"]) == channels
        for name, m in entry["metrics"].items():
            assert m["Dice"] == case["dice"][name] and m["HD95"] == case["hd95"][name] and m["NSD"] == case["nsd"][name]
            assert m["n_ref"] == m["TP"] + m["FN"] and m["n_pred"] == m["TP"] + m["FP"]
    assert summary["foreground_mean"]["Dice"] == results["test"]["summary"]["mean_dice"]


def test_best_checkpoint_is_self_describing(finetuned):
    model, preset, info = load_finetuned(finetuned / "best_model.pth")
    assert preset.name == "brain_tissue" and preset.out_channels == 4
    assert info["head"] == "UNETR" and info["iteration"] == json.loads((finetuned / "results.json").read_text())["best"]["iteration"]
    assert model.taps == [0, 1, 2, 3]
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 4, 32, 32, 32)


def test_wrong_pretrained_path_is_an_error(tissue_data, tmp_path, error_line):
    args = TINY_RUN.copy()
    args[1] = str(tmp_path / "missing.pth")
    assert finetune.main(args + ["--base-data-dir", str(tissue_data), "--output-dir", str(tmp_path / "out")]) == 1
    assert "missing.pth" in error_line()


def test_unknown_dataset_is_an_error(tmp_path, error_line):
    assert finetune.main(["--pretrained-weights", "none", "--dataset-name", "no_such_dataset",
                                "--base-data-dir", str(tmp_path), "--output-dir", str(tmp_path)]) == 1
    assert "brain_tissue" in error_line()  # the message lists the presets there are


def test_dataset_percent_subsets_training_only(tissue_data):
    from dinov2.eval.presets import DatasetPreset, load_preset
    from dinov2.eval.segmentation.data import load_splits

    preset = DatasetPreset.from_config(load_preset("brain_tissue"))
    full = load_splits(preset, tissue_data, 100.0, seed=0)
    part = load_splits(preset, tissue_data, 40.0, seed=0)
    assert len(full["training"]) == 5 and len(part["training"]) == 2
    assert {e["name"] for e in part["training"]} <= {e["name"] for e in full["training"]}
    assert part["validation"] == full["validation"] and part["test"] == full["test"]


def test_image_size_that_does_not_fit_the_patch_names_the_flag(tissue_data, tmp_path, error_line):
    args = list(TINY_RUN)
    args += ["--image-size", "36", "--base-data-dir", str(tissue_data), "--output-dir", str(tmp_path / "out")]
    assert finetune.main(args) == 1
    line = error_line()
    assert "--image-size" in line and "multiple of" in line


def test_flags_land_on_their_config_keys(tmp_path):
    parser = finetune.get_args_parser()
    args = parser.parse_intermixed_args([
        "--pretrained-weights", "none", "--dataset-name", "brain_tissue", "--base-data-dir", str(tmp_path),
        "--output-dir", str(tmp_path / "out"), "--device", "cpu", "--epochs", "3", "--image-size", "48",
        "--segmentation-head", "Linear", "optim.lr=0.5"])
    cfg = finetune.build_config(args)
    assert cfg.device == "cpu" and cfg.optim.epochs == 3 and cfg.model.head == "Linear"
    assert cfg.dataset.image_size == 48 and cfg.optim.lr == 0.5


def test_finetuning_loader_workers_are_capped_at_the_cpus(monkeypatch, caplog):
    monkeypatch.setattr(cpus, "available_cpus", lambda: 2)
    with caplog.at_level("INFO", logger="dinov2"):
        loader = build_train_loader(list(range(4)), batch_size=2, num_workers=4)
    assert loader.num_workers == 1 and loader.persistent_workers
    assert "--num-workers/train.num_workers=4 lowered to 1: 2 CPUs" in caplog.text
    assert build_train_loader(list(range(4)), batch_size=2, num_workers=0).num_workers == 0


# ------------------------------------------------------------------------------- one config path
def test_unknown_key_in_the_config_file_or_an_override_is_one_error_line(tmp_path, error_line):
    base = ["--pretrained-weights", "none", "--dataset-name", "brain_tissue", "--base-data-dir", str(tmp_path),
            "--output-dir", str(tmp_path / "out")]
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  epochs: 1\n  warmup_iter: 3\n")
    assert finetune.main(base + ["--config-file", str(bad)]) == 1
    line = error_line()
    assert "'optim.warmup_iter'" in line and str(bad) in line and "closest known key: 'optim.warmup_iters'" in line
    assert finetune.main(base + ["dataset.sampling.num_sample=2"]) == 1
    assert ("'dataset.sampling.num_sample' (closest known key: 'dataset.sampling.num_samples') on the command line"
            in error_line())
    assert not (tmp_path / "out").exists()


def test_unknown_key_in_a_preset_names_the_preset(tmp_path):
    preset = tmp_path / "my_set.yaml"
    preset.write_text((REPO_DATASETS / "brain_tissue.yaml").read_text() + "crop_foregrond: false\n")
    args = finetune.get_args_parser().parse_intermixed_args([
        "--pretrained-weights", "none", "--dataset-name", str(preset), "--base-data-dir", str(tmp_path),
        "--output-dir", str(tmp_path / "out")])
    with pytest.raises(ConfigError, match=r"'dataset.crop_foregrond' \(closest known key: 'dataset.crop_foreground'\) "
                                          rf"in dataset preset '{preset}'"):
        finetune.build_config(args)


def test_old_segmentation_spellings_still_work_and_warn(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(f"dataset_name: brain_tissue\nbase_data_dir: {tmp_path}\ndataset_percent: 40\n"
                   "train:\n  device: cpu\n  amp: fp32\n  eval_iters: 7\n  log_every: 3\n")
    preset = tmp_path / "old_preset.yaml"
    preset.write_text((REPO_DATASETS / "brain_tissue.yaml").read_text().replace("image_size:", "roi_size:"))
    args = finetune.get_args_parser().parse_intermixed_args([
        "--pretrained-weights", "none", "--output-dir", str(tmp_path / "out"), "--config-file", str(old)])
    with pytest.warns(DeprecatedConfigKeyWarning) as record:
        cfg = finetune.build_config(args)
    messages = " ".join(str(w.message) for w in record)
    for new in ("dataset.name", "dataset.base_data_dir", "dataset.percent", "device", "compute_precision.dtype",
                "evaluation.eval_period_iterations", "train.log_period_iterations"):
        assert f"use '{new}'" in messages
    assert (cfg.dataset.name, cfg.dataset.base_data_dir, cfg.dataset.percent) == ("brain_tissue", str(tmp_path), 40)
    assert (cfg.device, cfg.compute_precision.dtype, cfg.evaluation.eval_period_iterations,
            cfg.train.log_period_iterations) == ("cpu", "fp32", 7, 3)
    args = finetune.get_args_parser().parse_intermixed_args([
        "--pretrained-weights", "none", "--output-dir", str(tmp_path / "out"), "--dataset-name", str(preset),
        "--base-data-dir", str(tmp_path), "--eval-iters", "9"])  # the 3DINO flag, same key as --eval-period-iterations
    with pytest.warns(DeprecatedConfigKeyWarning, match=f"'dataset.roi_size' .* use 'dataset.image_size'"):
        cfg = finetune.build_config(args)
    assert list(cfg.dataset.image_size) == [64, 64, 64] and cfg.evaluation.eval_period_iterations == 9


def test_dataset_seed_defaults_to_the_run_seed(tmp_path):
    base = ["--pretrained-weights", "none", "--dataset-name", "brain_tissue", "--base-data-dir", str(tmp_path),
            "--output-dir", str(tmp_path / "out")]
    parse = finetune.get_args_parser().parse_intermixed_args
    assert finetune.build_config(parse(base + ["--seed", "5"])).dataset.seed == 5
    assert finetune.build_config(parse(base + ["--seed", "5", "--dataset-seed", "2"])).dataset.seed == 2
    cfg = finetune.build_config(parse(base + ["--precision", "bf16", "--device", "cpu"]))
    assert cfg.compute_precision.dtype == "bf16" and cfg.device == "cpu"


def test_a_non_finite_loss_is_one_error_line(tissue_data, tmp_path, monkeypatch, error_line):
    from dinov2.eval.segmentation import train_loop

    def nan_loss(preset):
        return lambda prediction, target: prediction.sum() * float("nan")

    monkeypatch.setattr(train_loop, "build_loss", nan_loss)
    args = TINY_RUN + ["--base-data-dir", str(tissue_data), "--output-dir", str(tmp_path / "out")]
    assert finetune.main(args) == 1
    line = error_line()
    assert "Loss is nan at iteration" in line and "--learning-rate" in line
    assert not (tmp_path / "out" / "best_model.pth").exists()
