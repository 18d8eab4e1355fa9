"""TensorBoard events of every training entry point, read back; without the package a run warns once."""

from __future__ import annotations

import builtins
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.checkpoints.teacher_export import save_teacher_checkpoint
from dinov2.eval.linear import run as linear_run
from dinov2.eval.segmentation import finetune
from dinov2.models import build_model
from dinov2.sample_data import write_segmentation_dataset
from dinov2.train import train3d
from dinov2.train.metrics import MetricsLogger
from dinov2.train.previews import TeacherPreviews
from dinov2.train.ssl_meta_arch import backbone_from_config
from dinov2.utils.tensorboard import INSTALL_HINT, TENSORBOARD_DIR, TensorBoard

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml")
PRETRAIN_TAGS = {
    "loss/total_loss", "loss/dino_loss", "loss/ibot_loss", "loss/koleo_loss", "loss/dino_uniform_loss",
    "loss/ibot_uniform_loss", "schedule/lr", "schedule/wd", "schedule/momentum", "schedule/teacher_temp",
    "schedule/last_layer_lr", "train/epoch", "train/grad_norm", "throughput/samples_per_s",
    "throughput/iterations_per_s", "throughput/data_wait_s", "throughput/data_wait_share",
    "collapse/teacher_entropy", "collapse/teacher_prototype_entropy", "collapse/teacher_cls_effective_rank",
    "collapse/active_conditions",
}
# The tiny settings of tests/eval/test_segmentation_finetune.py, 4 iterations: 2 logs, 2 validations.
SEGMENTATION_RUN = [
    "--pretrained-weights", "none", "--dataset-name", "brain_tissue", "--segmentation-head", "UNETR",
    "--epochs", "1", "--epoch-length", "4", "--eval-iters", "2", "--warmup-iters", "1", "--batch-size", "1",
    "--num-workers", "0", "--learning-rate", "3e-3", "--image-size", "32", "--resize-scale", "0.5",
    "model.arch=vit_tiny_3d", "model.backbone_kwargs={embed_dim: 32, depth: 4, num_heads: 2, patch_size: 8}",
    "model.unetr.feature_size=8", "train.log_period_iterations=2", "evaluation.overlap=0.25",
]


def read_events(log_dir) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """``({scalar tag: steps}, {image tag: steps})`` of the event files in ``log_dir``, as TensorBoard reads them."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    scalars = {tag: [e.step for e in events.Scalars(tag)] for tag in tags["scalars"]}
    images = {tag: [e.step for e in events.Images(tag)] for tag in tags["images"]}
    return scalars, images


@pytest.fixture()
def no_tensorboard(monkeypatch):
    """The tensorboard package looks uninstalled: importing it (or torch's writer) fails."""
    real_import = builtins.__import__

    def fail(name, *args, **kwargs):
        if name.startswith(("tensorboard", "torch.utils.tensorboard")):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fail)


def _install_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if INSTALL_HINT in line]


# ------------------------------------------------------------------------------------ the writer
def test_writer_scalars_and_images_read_back(tmp_path):
    with TensorBoard(tmp_path, enabled=True) as tb:
        assert tb.active and tb.log_dir == tmp_path / TENSORBOARD_DIR
        for step in (1, 2):
            tb.scalar("train/loss", 1.0 / step, step)
            values = {"lr": torch.tensor(0.1), "note": "text", "collapse": ["x"], "flag": True}
            tb.scalars(values, step, group="schedule")
            tb.image("preview/pil", Image.new("RGB", (8, 6), (255, 0, 0)), step)
            tb.image("preview/array", np.linspace(0, 1, 20).reshape(4, 5), step)
    assert not tb.active  # closed: later calls are no-ops
    tb.scalar("train/loss", 0.0, 3)
    scalars, images = read_events(tmp_path / TENSORBOARD_DIR)
    assert scalars == {"train/loss": [1, 2], "schedule/lr": [1, 2]}  # texts, lists and bools are skipped
    assert images == {"preview/pil": [1, 2], "preview/array": [1, 2]}


def test_a_writer_that_was_not_asked_for_imports_nothing_and_says_nothing(tmp_path, no_tensorboard, caplog):
    tb = TensorBoard(tmp_path, enabled=False)
    tb.scalar("a", 1.0, 0)
    tb.close()
    assert not tb.active and not (tmp_path / TENSORBOARD_DIR).exists() and not caplog.records


def test_without_the_package_one_warning_names_the_extra_and_calls_do_nothing(tmp_path, no_tensorboard, caplog):
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        tb = TensorBoard(tmp_path, enabled=True, setting="train.tensorboard")
        tb.scalar("a", 1.0, 0)
        tb.image("b", np.zeros((2, 2)), 0)
        tb.flush()
        tb.close()
    assert len(_install_lines(caplog.text)) == 1 and "train.tensorboard" in caplog.text
    assert not tb.active and not (tmp_path / TENSORBOARD_DIR).exists()


def test_a_resumed_run_hides_the_recomputed_steps_of_the_killed_one(tmp_path):
    first = MetricsLogger(tmp_path, tensorboard=True)
    for it in range(4):
        first.log(it, {"total_loss": 1.0})
    first.close()
    resumed = MetricsLogger(tmp_path, start_iteration=2, tensorboard=True)
    for it in (2, 3):
        resumed.log(it, {"total_loss": 2.0})
    resumed.close()
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss/total_loss")] == [(0, 1.0), (1, 1.0), (2, 2.0), (3, 2.0)]


# ------------------------------------------------------------------------------------ pretraining
@pytest.fixture(scope="module")
def pretrain_argv(tmp_path_factory):
    """``argv(output_dir, *extra)`` of a tiny CPU pretraining run on 4 small real volumes (as tests/train)."""
    from dinov2.data.datalist import header_entry, write_datalist
    from dinov2.data.image_io import read_header
    from dinov2.sample_data import find_pretraining_volumes

    headers = [read_header(p) for p in find_pretraining_volumes()]
    entries = [header_entry(h) for h in headers if max(h.shape[:3]) <= 128][:4]
    datalist = write_datalist(entries, tmp_path_factory.mktemp("data") / "pretrain.json")
    cache = tmp_path_factory.mktemp("cache")
    return lambda out, *extra: ["--config-file", TINY_CONFIG, "--output-dir", str(out), "--cache-dir", str(cache),
                                f"train.datalist={datalist}", *extra]


def test_pretraining_writes_every_metric_and_the_teacher_images_at_each_export(tmp_path, pretrain_argv):
    argv = pretrain_argv(tmp_path, "--tensorboard", "train.max_iterations=2", "evaluation.eval_period_iterations=1")
    assert train3d.main(argv) == 0
    scalars, images = read_events(tmp_path / TENSORBOARD_DIR)
    assert set(scalars) == PRETRAIN_TAGS and all(steps == [0, 1] for steps in scalars.values()), scalars
    assert images == {"teacher/pca": [0, 1], "teacher/attention": [0, 1]}  # exports after 1 and 2 iterations


def test_teacher_images_that_fail_are_a_warning_never_an_error(tmp_path, caplog):
    class UnreadableDataset:
        def record(self, index):
            raise OSError("disk gone")

    cfg = train3d.build_config(TINY_CONFIG, ["train.datalist=x.json"])
    teacher = {f"backbone.{k}": v for k, v in backbone_from_config(cfg, teacher=True).state_dict().items()}
    with TensorBoard(tmp_path) as tb, caplog.at_level(logging.WARNING):
        TeacherPreviews(tb, UnreadableDataset(), cfg).write(teacher, step=4)
    assert "No TensorBoard images of the teacher at step 4 (OSError: disk gone)" in caplog.text


def test_pretraining_without_the_package_warns_once_and_trains(tmp_path, pretrain_argv, no_tensorboard):
    assert train3d.main(pretrain_argv(tmp_path, "--tensorboard", "train.max_iterations=1")) == 0
    assert len(_install_lines((tmp_path / "log.txt").read_text())) == 1
    assert (tmp_path / "training_metrics.json").is_file() and not (tmp_path / TENSORBOARD_DIR).exists()


# ------------------------------------------------------------------------------------ segmentation
def test_segmentation_writes_training_and_validation_scalars_and_a_preview(tmp_path):
    data = tmp_path / "data"
    write_segmentation_dataset(data, labels="tissue", seed=0)
    out = tmp_path / "run"
    assert finetune.main(SEGMENTATION_RUN + ["--base-data-dir", str(data), "--output-dir", str(out),
                                            "--tensorboard"]) == 0
    scalars, images = read_events(out / TENSORBOARD_DIR)
    dice = {f"validation/dice_{c}" for c in ("background", "ventricles", "grey_matter", "other_brain")}
    expected = {"train/loss", "train/lr", "train/iterations_per_s", "train/samples_per_s", "validation/mean_dice"}
    assert set(scalars) == expected | dice and all(steps == [2, 4] for steps in scalars.values()), scalars
    assert images == {"validation/preview": [2, 4]}


# ------------------------------------------------------------------------------------ linear probe
@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("vit_tiny_3d", patch_size=8, img_size=16)
    config = {"student": {"arch": "vit_tiny_3d", "patch_size": 8}, "crops": {"global_crops_size": 16}}
    path = tmp_path_factory.mktemp("ckpt") / "teacher_checkpoint.pth"
    return save_teacher_checkpoint(path, {f"backbone.{k}": v for k, v in model.state_dict().items()}, config, 0)


def _probe_args(lobe_data, teacher, out) -> list[str]:
    return ["--pretrained-weights", str(teacher), "--output-dir", str(out), "--dataset-name", "brain_lobes",
            "--base-data-dir", str(lobe_data.parent), "--epochs", "2", "--learning-rates", "0.01", "0.1",
            "--tensorboard"]


def test_linear_probe_writes_each_heads_loss_and_accuracy(tmp_path, lobe_data, tiny_teacher):
    assert linear_run.main(_probe_args(lobe_data, tiny_teacher, tmp_path)) == 0
    scalars, images = read_events(tmp_path / TENSORBOARD_DIR)
    heads = {f"blocks{n}_{p}_lr{lr}" for n in (1, 4) for p in ("cls", "cls_avgpool", "cls_avgpool_blocks") for lr in ("0.01", "0.1")}
    expected = ({f"train_loss/{h}" for h in heads} | {f"val_accuracy/{h}" for h in heads}
                | {"train/loss", "validation/best_accuracy"})
    assert set(scalars) == expected and all(steps == [1, 2] for steps in scalars.values()), scalars
    assert not images


def test_linear_probe_without_the_package_warns_once_and_probes(tmp_path, lobe_data, tiny_teacher, no_tensorboard,
                                                               caplog):
    with caplog.at_level(logging.WARNING):
        assert linear_run.main(_probe_args(lobe_data, tiny_teacher, tmp_path)) == 0
    assert len(_install_lines(caplog.text)) == 1
    assert (tmp_path / "results.json").is_file() and not (tmp_path / TENSORBOARD_DIR).exists()
