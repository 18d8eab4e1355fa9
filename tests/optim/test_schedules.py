"""Per-iteration schedules: values at iteration 0, end of warm-up, middle and end."""

import math

import pytest
from omegaconf import OmegaConf

from dinov2.optim.schedules import CosineScheduler, build_schedulers, scaled_lr


def test_cosine_with_warmup_key_iterations():
    s = CosineScheduler(base_value=1.0, final_value=0.1, total_iters=110, warmup_iters=10, start_warmup_value=0.2)
    assert s[0] == pytest.approx(0.2)
    assert s[5] == pytest.approx(0.2 + 0.8 * 5 / 10)
    assert s[10] == pytest.approx(1.0)  # end of warm-up = peak
    assert s[60] == pytest.approx(0.55)  # half way through the cosine: the mean of peak and final
    assert s[109] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 99 / 100)))
    assert s[110] == pytest.approx(0.1) and s[10_000] == pytest.approx(0.1)
    assert len(s) == 110
    assert all(s[i] >= s[i + 1] for i in range(10, 109))


def test_freeze_then_warmup():
    s = CosineScheduler(base_value=1.0, final_value=0.0, total_iters=20, warmup_iters=4, freeze_iters=5)
    assert [s[i] for i in range(5)] == [0.0] * 5
    assert s[5] == pytest.approx(0.0) and s[7] == pytest.approx(0.5) and s[9] == pytest.approx(1.0)


def test_scheduler_errors():
    with pytest.raises(ValueError, match="exceed total_iters"):
        CosineScheduler(1.0, 0.0, total_iters=5, warmup_iters=4, freeze_iters=2)
    with pytest.raises(IndexError):
        CosineScheduler(1.0, 0.0, total_iters=5)[-1]


def test_scaled_lr():
    assert scaled_lr(1e-3, 1024) == pytest.approx(1e-3)
    assert scaled_lr(1e-3, 256) == pytest.approx(5e-4)
    assert scaled_lr(2e-3, 4096) == pytest.approx(4e-3)


CFG = {
    "optim": {
        "epochs": 10,
        "base_lr": 4e-3,
        "scaling_rule": "sqrt_wrt_1024",
        "min_lr": 1e-6,
        "warmup_epochs": 2,
        "weight_decay": 0.04,
        "weight_decay_end": 0.4,
        "freeze_last_layer_epochs": 1,
    },
    "teacher": {
        "momentum_teacher": 0.992,
        "final_momentum_teacher": 1.0,
        "warmup_teacher_temp": 0.04,
        "teacher_temp": 0.07,
        "warmup_teacher_temp_epochs": 3,
    },
}


def test_build_schedulers_from_config():
    s = build_schedulers(OmegaConf.create(CFG), iters_per_epoch=10, total_batch_size=256)
    peak = 4e-3 * 0.5  # sqrt(256 / 1024)
    assert s["lr"][0] == 0.0 and s["lr"][20] == pytest.approx(peak)
    assert s["lr"][100] == pytest.approx(1e-6)
    assert s["wd"][0] == pytest.approx(0.04) and s["wd"][50] == pytest.approx(0.22)
    assert s["wd"][100] == pytest.approx(0.4)
    assert s["momentum"][0] == pytest.approx(0.992) and s["momentum"][100] == pytest.approx(1.0)
    assert s["teacher_temp"][0] == pytest.approx(0.04)
    assert s["teacher_temp"][15] == pytest.approx(0.055)
    assert s["teacher_temp"][30] == pytest.approx(0.07) and s["teacher_temp"][99] == pytest.approx(0.07)
    # Prototype layer: zero for the first epoch, then the same warm-up shifted by one epoch.
    assert all(s["last_layer_lr"][i] == 0.0 for i in range(10))
    assert s["last_layer_lr"][30] == pytest.approx(peak)
    assert s["last_layer_lr"][100] == pytest.approx(1e-6)


def test_build_schedulers_without_scaling_and_missing_key():
    cfg = {"optim": dict(CFG["optim"], scaling_rule="none"), "teacher": CFG["teacher"]}
    assert build_schedulers(cfg, iters_per_epoch=10, total_batch_size=256)["lr"][20] == pytest.approx(4e-3)
    broken = {"optim": {k: v for k, v in CFG["optim"].items() if k != "min_lr"}, "teacher": CFG["teacher"]}
    with pytest.raises(KeyError, match="optim.min_lr"):
        build_schedulers(broken, iters_per_epoch=10, total_batch_size=256)
    with pytest.raises(ValueError, match="scaling_rule"):
        build_schedulers({"optim": dict(CFG["optim"], scaling_rule="linear"), "teacher": CFG["teacher"]}, 10, 256)
