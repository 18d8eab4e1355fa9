"""Tests of dinov2/benchmarking/perf.py (FLOPs, timing, peak, machine) and the scripts/benchmark.py dispatcher."""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import pytest
import torch

from dinov2.models import vit_tiny_3d
from dinov2.benchmarking import perf

BENCHMARK_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark.py"


def _load_benchmark_script():
    spec = importlib.util.spec_from_file_location("benchmark_under_test", BENCHMARK_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ FLOPs
@pytest.mark.parametrize("kwargs, shape", [
    (dict(), (2, 1, 32, 32, 32)),
    (dict(num_register_tokens=2, in_chans=2), (1, 2, 32, 24, 16)),  # anisotropic, registers
    (dict(ffn_layer="swiglu"), (2, 1, 16, 32, 24)),
])
def test_analytic_flops_match_flop_counter(kwargs, shape):
    model = vit_tiny_3d(img_size=32, patch_size=8, **kwargs).eval()
    x = torch.randn(*shape)
    assert perf.model_forward_flops(model, x.shape) == perf.counted_forward_flops(model, x)


def test_counted_flops_include_attention():
    # Attention FLOPs grow with the square of the token count; linears grow linearly. A counter
    # that missed attention would give exactly 2x for twice the tokens.
    model = vit_tiny_3d(img_size=32, patch_size=8).eval()
    small = perf.counted_forward_flops(model, torch.randn(1, 1, 32, 32, 16))
    large = perf.counted_forward_flops(model, torch.randn(1, 1, 32, 32, 32))
    assert large > 2 * small


def test_vit_forward_flops_formula_by_hand():
    # ViT-B/16 on 96³: 216 patches, 217 tokens, 12 blocks, width 768, GELU MLP ratio 4.
    e, t, n = 768, 217, 216
    per_sample = n * 16 ** 3 * e + 12 * (t * 12 * e * e + 2 * t * t * e)
    got = perf.vit_forward_flops(batch=4, num_patches=n, patch_voxels=16 ** 3, in_chans=1, embed_dim=e,
                                 depth=12, block_linear_macs_per_token=12 * e * e)
    assert got == 2 * 4 * per_sample


def test_model_forward_flops_rejects_bad_shape():
    with pytest.raises(ValueError, match="B, C, H, W, D"):
        perf.model_forward_flops(vit_tiny_3d(img_size=32, patch_size=8), (1, 1, 32, 32))


# ----------------------------------------------------------------------------- timing
def test_time_callable_counts_calls_and_orders_statistics():
    calls = []

    def work():
        calls.append(1)
        time.sleep(0.002)

    result = perf.time_callable(work, repeats=4, warmup=2)
    assert len(calls) == 6 and len(result.times) == 4
    assert all(t >= 0.002 for t in result.times)  # sleep never returns early
    assert result.min <= result.median <= max(result.times)
    assert result.min <= result.mean <= max(result.times)
    assert result.spread >= 0
    assert len(result.cpu_times) == 4 and all(c >= 0 for c in result.cpu_times)
    assert result.cores_used < 0.5  # sleeping uses almost no CPU


def test_time_callable_cpu_time_tracks_busy_work():
    def busy():  # spins until it has used 10 ms of CPU, however busy the machine is
        end = time.process_time() + 0.01
        while time.process_time() < end:
            pass

    result = perf.time_callable(busy, repeats=2, warmup=0)
    assert all(c >= 0.01 for c in result.cpu_times)
    assert all(w >= 0.9 * c for w, c in zip(result.times, result.cpu_times))  # one thread: wall >= CPU


@pytest.mark.parametrize("repeats, warmup", [(0, 1), (1, -1)])
def test_time_callable_validates(repeats, warmup):
    with pytest.raises(ValueError):
        perf.time_callable(lambda: None, repeats=repeats, warmup=warmup)


def test_matmul_peak_is_positive_and_finite():
    for dtype in (torch.float32, torch.bfloat16):
        value = perf.matmul_peak_gflops(dtype, size=128, repeats=2)
        assert math.isfinite(value) and value > 0
    with pytest.raises(ValueError):
        perf.matmul_peak_gflops(size=8)


def test_machine_description_names_the_threads():
    info = perf.machine_description()
    assert info["torch_threads"] == str(torch.get_num_threads())
    assert {"cpu", "cpu_capability", "native_bf16", "torch"} <= set(info)


# ------------------------------------------------------------------ benchmark script
def test_model_benchmark_smoke_reports_speed_and_accuracy(capsys):
    bench = _load_benchmark_script()
    rows = bench.main([
        "model", "--arch", "vit_tiny_3d", "--img-size", "32", "--batch-size", "1", "--steps", "1",
        "--warmup", "1", "--peak-size", "64", "--dtypes", "fp32,bf16",
    ])
    assert [r["mode"] for r in rows] == ["fp32", "bf16"]
    assert all(r["gflops"] > 0 and r["s_per_step"] > 0 for r in rows)
    assert 0 < rows[1]["out_rel_err"] < 5e-2 and rows[1]["grad_cos"] > 0.99
    assert "| mode | s/step (median) |" in capsys.readouterr().out


def test_dispatcher_rejects_unknown_command():
    bench = _load_benchmark_script()
    with pytest.raises(SystemExit) as info:
        bench.main(["nonsense"])
    assert info.value.code == 2


@pytest.mark.parametrize("command, script", [("data", "benchmark_data.py"), ("train", "benchmark_train.py")])
def test_dispatcher_explains_a_missing_sibling_benchmark(command, script, tmp_path, monkeypatch, capsys):
    bench = _load_benchmark_script()
    monkeypatch.setattr(bench, "__file__", str(tmp_path / "benchmark.py"))
    with pytest.raises(SystemExit) as info:
        bench.main([command])
    assert info.value.code == 2
    assert f"{script} is missing" in capsys.readouterr().err


def test_dispatcher_runs_a_sibling_main_with_its_arguments(tmp_path, monkeypatch):
    (tmp_path / "benchmark_data.py").write_text("def main(argv):\n    return ['got'] + argv\n")
    bench = _load_benchmark_script()
    monkeypatch.setattr(bench, "__file__", str(tmp_path / "benchmark.py"))
    assert bench.main(["data", "--seconds", "1"]) == ["got", "--seconds", "1"]


def test_drop_path_benchmark_times_both_implementations_and_switches_every_block(capsys):
    spec = importlib.util.spec_from_file_location("benchmark_drop_path",
                                                  BENCHMARK_SCRIPT.parent / "benchmark_drop_path.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = vit_tiny_3d(img_size=16, patch_size=8, drop_path_rate=0.3, drop_path_uniform=True)
    module._set_mode(model, False)
    assert not any(block.subset_drop_path for block in model.blocks)
    module._set_mode(model, True)
    assert all(block.subset_drop_path for block in model.blocks)
    rows = _load_benchmark_script().main(["drop-path", "--arch", "vit_tiny_3d", "--patch-size", "8",
                                          "--global-size", "16", "--local-size", "8", "--batch-size", "2",
                                          "--local-crops", "2", "--rounds", "1"])
    assert [r["measure"] for r in rows] == ["backbone", "iteration"]
    assert all(r["subset_s"] > 0 and r["mask_s"] > 0 and r["speedup"] == r["mask_s"] / r["subset_s"] for r in rows)
    assert "| backbone |" in capsys.readouterr().out
