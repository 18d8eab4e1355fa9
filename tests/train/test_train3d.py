"""The pretraining entry point end to end on CPU: outputs, NaN stop, config handling, loss falls."""

from __future__ import annotations

import json
import re

import pytest
import torch
from omegaconf import OmegaConf

from dinov2.checkpoints.backbone_reader import load_pretrained_backbone
from dinov2.checkpoints.training_state import TrainingCheckpointer
from dinov2.data.collate import make_collate_fn
from dinov2.data.loader import build_train_loader
from dinov2.train import train3d
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils import cpus


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "training_metrics.json").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_iteration_run(tmp_path_factory, tiny_argv):
    run = tmp_path_factory.mktemp("run")
    argv = tiny_argv(run, "train.max_iterations=2", "checkpointing.period_iterations=1",
                     "checkpointing.max_to_keep=1", "evaluation.eval_period_iterations=1")
    assert train3d.main(argv) == 0
    return run


def test_two_iterations_write_every_output(two_iteration_run):
    run = two_iteration_run
    lines = _metrics(run)
    assert [line["iteration"] for line in lines] == [0, 1]
    for key in ("total_loss", "dino_loss", "ibot_loss", "koleo_loss", "lr", "wd", "momentum", "teacher_temp",
                "samples_per_s", "data_wait_s", "data_wait_share", "teacher_entropy", "teacher_cls_effective_rank"):
        assert all(isinstance(line[key], float) and line[key] == line[key] for line in lines), key
    assert lines[0]["teacher_temp"] == pytest.approx(0.04) and lines[1]["teacher_temp"] > 0.04
    assert OmegaConf.load(run / "config.yaml").student.arch == "vit_tiny_3d"
    assert (run / "log.txt").read_text().count("Saved training state") == 2
    # the run draws its curves when it ends (python -m dinov2.plot)
    assert {p.name for p in (run / "plots").glob("*.png")} >= {"losses.png", "learning.png", "collapse_monitors.png"}
    # max_to_keep=1: only the latest full state survives.
    checkpointer = TrainingCheckpointer(run)
    assert [it for it, _ in checkpointer.list()] == [2]
    state = TrainingCheckpointer.load(checkpointer.latest())
    assert state["iteration"] == 2 and state["sampler"]["global_position"] == 2 * 4
    assert {"optimizer", "scaler", "rng", "config", "model"} <= set(state)
    # Teacher exports at each eval period, loadable by the backbone loader alone.
    for it in (1, 2):
        assert (run / "eval" / f"training_{it}" / "teacher_checkpoint.pth").is_file()
    model, report = load_pretrained_backbone(run / "eval" / "training_2" / "teacher_checkpoint.pth")
    assert report.built_from == "config" and not report.missing_keys
    assert torch.equal(model.blocks[0].attn.qkv.weight, state["model"]["teacher.backbone.blocks.0.attn.qkv.weight"])
    assert not torch.equal(state["model"]["student.backbone.blocks.0.attn.qkv.weight"],
                           state["model"]["teacher.backbone.blocks.0.attn.qkv.weight"])


def test_no_resume_refuses_to_mix_with_an_earlier_run(two_iteration_run, tiny_config):
    cfg = train3d.build_config(str(tiny_config), ["train.datalist=x.json"])
    with pytest.raises(ValueError, match="--no-resume"):
        train3d.train(cfg, two_iteration_run, resume=False)


def test_highres_stage_starts_from_a_teacher_export(two_iteration_run, tiny_config):
    cfg = train3d.build_config(str(tiny_config), ["train.datalist=x.json", "crops.global_crops_size=48",
                                                  "crops.local_crops_size=24"])
    arch = SSLMetaArch(cfg)
    export = two_iteration_run / "eval" / "training_2" / "teacher_checkpoint.pth"
    train3d._load_pretrained(arch, str(export))
    teacher = torch.load(export, weights_only=True)["teacher"]
    assert arch.student.backbone.pos_embed.shape[1] == 1 + 6**3  # 48 / 8 per side
    assert torch.equal(arch.student.ibot_head.mlp[0].weight, teacher["ibot_head.mlp.0.weight"])
    assert torch.equal(arch.teacher.backbone.norm.weight, teacher["backbone.norm.weight"])


@pytest.mark.parametrize("final_saves", [True, False])
def test_final_saves_off_leaves_no_training_state_and_no_teacher_export(tmp_path, tiny_config, small_datalist,
                                                                         cache_dir, final_saves):
    # Periods beyond the run: only the end of training would save.
    cfg = train3d.build_config(str(tiny_config), [f"train.datalist={small_datalist}", "train.max_iterations=2",
                                                  "train.num_workers=0", "checkpointing.period_iterations=100",
                                                  "evaluation.eval_period_iterations=100"], cache_dir=str(cache_dir))
    result = train3d.train(cfg, tmp_path, resume=False, final_saves=final_saves)
    assert [line["iteration"] for line in _metrics(tmp_path)] == [0, 1]  # trained all the same
    checkpoints = [it for it, _ in TrainingCheckpointer(tmp_path).list()]
    exports = [p.parent.name for p in (tmp_path / "eval").glob("*/teacher_checkpoint.pth")]
    assert checkpoints == ([2] if final_saves else [])
    assert exports == (["training_2"] if final_saves else [])
    assert (result["checkpoint"] is not None, result["teacher_export"] is not None) == (final_saves, final_saves)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_argv, monkeypatch, error_line):
    real = SSLMetaArch.forward_backward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # the third iteration, index 2
            out["ibot_loss"] = torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(SSLMetaArch, "forward_backward", poisoned)
    argv = tiny_argv(tmp_path, "train.max_iterations=5", "checkpointing.period_iterations=2",
                     "train.num_workers=0")
    assert train3d.main(argv) == 1  # one ERROR line (log.txt keeps it too), no traceback
    assert re.search(r"iteration 2:.*ibot_loss=nan.*model_0000002\.pth", error_line())
    assert [it for it, _ in TrainingCheckpointer(tmp_path).list()] == [2]
    assert [line["iteration"] for line in _metrics(tmp_path)] == [0, 1]


def test_config_errors_name_the_key(small_datalist, tiny_config):
    with pytest.raises(ValueError, match="optim.base_lrr"):
        train3d.build_config(str(tiny_config), [f"train.datalist={small_datalist}", "optim.base_lrr=1"])
    with pytest.raises(ValueError, match="train.datalist"):
        train3d.build_config(str(tiny_config))
    # A packaged stage config by name; it requires the teacher to start from.
    with pytest.raises(ValueError, match="student.pretrained_weights"):
        train3d.build_config("train/vit3d_highres", [f"train.datalist={small_datalist}"])
    cfg = train3d.build_config("train/vit3d_highres", [f"train.datalist={small_datalist}", "student.pretrained_weights=t.pth"],
                               cache_dir="/c")
    assert cfg.crops.global_crops_size == 112 and cfg.student.arch == "vit_large_3d"
    assert cfg.preprocessing.cache.dir == "/c" and cfg.crops.local_crops_number == 8
    with pytest.raises(FileNotFoundError, match="no_such.yaml"):
        train3d.build_config("no_such.yaml")


def test_help_shows_launch_examples_and_the_config_merge_order(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train3d.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "torchrun --standalone --nproc_per_node" in text and "--nnodes" in text
    assert "python -m dinov2.run.submit train3d" in text
    flat = " ".join(text.split())
    assert ("data_defaults.yaml <- ssl3d_default_config.yaml <- --config-file (a path, or a packaged name such as "
            "train/vit3d_highres) <- the flags (--cache-dir, --device) <- key=value overrides") in flat
    assert "``" not in text and "see the module docstring" not in text


def test_pretraining_loader_workers_are_capped_at_the_cpus(monkeypatch, caplog):
    monkeypatch.setattr(cpus, "available_cpus", lambda: 2)
    cfg = train3d.default_config()
    collate = make_collate_fn(cfg.ibot, 8, 32)

    def loader(workers):
        return build_train_loader(list(range(4)), collate, batch_size=2, run_seed=0, start_position=0, rank=0,
                                  world_size=1, num_workers=workers)

    with caplog.at_level("INFO", logger="dinov2"):
        assert loader(10).num_workers == 1  # built only: no worker process starts before iteration
    assert "train.num_workers=10 lowered to 1" in caplog.text
    assert loader(0).num_workers == 0


@pytest.mark.slow
def test_loss_falls_over_60_iterations_on_real_volumes(tmp_path, tiny_argv):
    argv = tiny_argv(tmp_path, "train.max_iterations=60", "train.log_period_iterations=5",
                     "checkpointing.period_iterations=60", "evaluation.eval_period_iterations=60")
    train3d.main(argv)
    lines = _metrics(tmp_path)
    first, last = lines[:2], lines[-4:]
    for key, margin in (("total_loss", 1.0), ("dino_loss", 0.2), ("ibot_loss", 0.1)):
        before = sum(line[key] for line in first) / len(first)
        after = sum(line[key] for line in last) / len(last)
        assert after < before - margin, (key, before, after)
    # The CLS embeddings spread out (a collapsed run stays at effective rank 1).
    assert lines[-1]["teacher_cls_effective_rank"] > lines[0]["teacher_cls_effective_rank"] + 0.2


def test_collapse_monitors_tell_collapse_from_spread():
    from dinov2.train.metrics import effective_rank, mean_row_entropy, prototype_usage_entropy

    k = 16
    uniform = torch.full((8, k), 1.0 / k)
    one_hot = torch.nn.functional.one_hot(torch.zeros(8, dtype=torch.long), k).float()
    spread = torch.nn.functional.one_hot(torch.arange(8), k).float()
    assert mean_row_entropy(uniform) == pytest.approx(torch.log(torch.tensor(k)).item(), rel=1e-5)
    assert mean_row_entropy(one_hot) == pytest.approx(0.0, abs=1e-6)
    assert prototype_usage_entropy(one_hot) == pytest.approx(0.0, abs=1e-6)  # one prototype takes all
    assert prototype_usage_entropy(spread) == pytest.approx(torch.log(torch.tensor(8.0)).item(), rel=1e-5)
    same = torch.ones(8, 4)
    assert effective_rank(same) == pytest.approx(1.0, abs=1e-3)
    assert effective_rank(torch.eye(4)) == pytest.approx(4.0, rel=1e-3)


def test_metrics_of_a_resumed_run_drop_the_recomputed_iterations(tmp_path):
    from dinov2.train.metrics import METRICS_FILE, MetricsLogger

    logger = MetricsLogger(tmp_path)
    for it in range(5):
        logger.log(it, {"total_loss": torch.tensor(1.0 / (it + 1)), "lr": 0.1})
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"iteration": 5, "total_l')  # a line cut short by a kill
    MetricsLogger(tmp_path, start_iteration=3)
    assert [line["iteration"] for line in _metrics(tmp_path)] == [0, 1, 2]
    assert MetricsLogger(tmp_path / "other", enabled=False).path.parent.exists() is False


# ------------------------------------------------------------------------------- one config path
def test_unknown_key_in_the_config_file_or_an_override_is_one_error_line(tmp_path, tiny_config, small_datalist,
                                                                         error_line):
    bad = tmp_path / "bad.yaml"
    bad.write_text(tiny_config.read_text() + "\ncentering:\n  student_tempp: 0.1\n")
    argv = ["--config-file", str(bad), "--output-dir", str(tmp_path / "run"), f"train.datalist={small_datalist}"]
    assert train3d.main(argv) == 1
    line = error_line()
    assert "'centering.student_tempp'" in line and str(bad) in line and "closest known key: 'centering.student_temp'" in line
    argv = ["--config-file", str(tiny_config), "--output-dir", str(tmp_path / "run"), f"train.datalist={small_datalist}",
            "train.batch_size_per_gpuu=2"]
    assert train3d.main(argv) == 1
    line = error_line()
    assert ("'train.batch_size_per_gpuu' (closest known key: 'train.batch_size_per_gpu') on the command line"
            in line)
    assert not (tmp_path / "run").exists()


def test_old_train_device_spelling_still_works_and_warns(tiny_config):
    from dinov2.utils.deprecation import DeprecatedConfigKeyWarning

    with pytest.warns(DeprecatedConfigKeyWarning, match="'train.device' is deprecated .* use 'device'"):
        cfg = train3d.build_config(str(tiny_config), ["train.datalist=x.json", "train.device=cpu"])
    assert cfg.device == "cpu" and "device" not in cfg.train
    assert train3d.build_config(str(tiny_config), ["train.datalist=x.json"], device="auto").device == "auto"
    args = train3d.get_args_parser().parse_args(["--output-dir", "o", "--device", "cuda:1"])
    assert args.device == "cuda:1"
