"""What each stage of the GPU check measures; ``scripts/gpu_check.py`` runs one stage per process.

``python scripts/gpu_check_stages.py STAGE SPEC.json ROWS.jsonl``: reads the check's settings
and this stage's cases from ``SPEC.json`` (written by ``gpu_check.py``), measures each case and
appends one JSON row per case to ``ROWS.jsonl`` as soon as it is measured, so a stage killed at
its time budget keeps the rows it finished. A case that fails (out of memory included) is a
row; only an error outside the cases (building the model, say) ends the process, and the
driver turns the cases left into rows.

Stages (the driver fixes the cases):

* ``peak``: the matmul peak of the recipe's compute dtype (:func:`dinov2.benchmarking.perf.
  matmul_peak_gflops`), and the machine.
* ``step``: training iterations of the packaged recipe (``SSLMetaArch``: teacher + student
  forward, DINO/iBOT/KoLeo, backward, AdamW, EMA) on one synthetic batch kept on the device,
  per batch size, eager then with every transformer block and head under ``torch.compile``.
  No data loading: this is the model's speed.
* ``loop``: the real training loop (``dinov2.train.train3d.train``: loader workers,
  augmentation, step, logging) on synthetic volumes, with ``crops.augment_on_device`` off and on.
* ``loader``: the data loader alone (``scripts/benchmark_data.py``'s ``loader_throughput``) per
  worker count.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

SCRIPTS = Path(__file__).resolve().parent
AUGMENT_KEY = "crops.augment_on_device"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
Emit = Callable[[dict], None]


def load_script(name: str):
    """A sibling script as a module (``scripts/`` is not a package); its ``__main__`` block does not run."""
    path = SCRIPTS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_gpu_check_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gib(value: int) -> float:
    return value / 2 ** 30


def _peak_memory(device: torch.device) -> float | None:
    """GiB allocated at most since the last reset (None off CUDA: the CPU has no such counter)."""
    return _gib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _synchronize(device: torch.device) -> Callable[[], None] | None:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def flops_per_iteration(cfg) -> float:
    """Model FLOPs of one training iteration: ``benchmark.py train``'s analytic count."""
    return float(load_script("benchmark_train").iteration_flops(cfg))


def recipe_config(spec: dict, *overrides: str):
    """The resolved training config of the check: the packaged recipe (or the smoke config) + overrides."""
    from dinov2.train.train3d import build_config

    return build_config(spec["config_file"], [*spec["overrides"], *overrides], device=spec["device"])


# ------------------------------------------------------------------------------- peak
def machine(device: torch.device) -> dict[str, str]:
    """The CPU description of :func:`~dinov2.benchmarking.perf.machine_description`, plus the GPU's."""
    from dinov2.benchmarking.perf import machine_description

    info = machine_description()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=f"{_gib(props.total_memory):.0f}", cuda=str(torch.version.cuda),
                    gpu_capability=f"{props.major}.{props.minor}")
    return info


def stage_peak(spec: dict, cases: list[dict], emit: Emit) -> None:
    """The GEMM peak MFU is quoted against: ``F.linear`` of two square matrices of the compute dtype."""
    from dinov2.benchmarking.perf import matmul_peak_gflops

    device = torch.device(spec["device"])
    for case in cases:
        gflops = matmul_peak_gflops(DTYPES[spec["peak_dtype"]], size=spec["peak_size"], repeats=spec["peak_repeats"],
                                    device=device)
        emit({"case": case["case"], "status": "ok", "peak_gflops": gflops, "machine": machine(device),
              "detail": f"{gflops / 1000:.1f} TFLOP/s"})


# ------------------------------------------------------------------------------- step
def synthetic_batch(cfg, batch_size: int, device: torch.device, seed: int = 0) -> dict:
    """A collated batch of random crops (the collate's dict) with every tensor already on ``device``.

    Crops: ``2·B`` global ``(1, G, G, G)`` and ``n_local·B`` local ``(1, L, L, L)``; iBOT masks
    drawn by the real collate with the config's mask settings.
    """
    from dinov2.data.collate import collate_data_and_cast

    gen = torch.Generator(device=device).manual_seed(seed)
    g, l = int(cfg.crops.global_crops_size), int(cfg.crops.local_crops_size)
    chans = int(cfg.student.in_chans)

    def crop(side: int) -> torch.Tensor:
        return torch.randn(chans, side, side, side, generator=gen, device=device)

    samples = [{"global_crops": [crop(g) for _ in range(2)],
                "local_crops": [crop(l) for _ in range(int(cfg.crops.local_crops_number))]}
               for _ in range(batch_size)]
    side = g // int(cfg.student.patch_size)
    with device:  # the collate's output tensors are made on the default device: no round trip through the CPU
        batch = collate_data_and_cast(samples, tuple(cfg.ibot.mask_ratio_min_max),
                                      float(cfg.ibot.mask_sample_probability), (side,) * 3,
                                      rng=np.random.default_rng(seed))
    # Every tensor on the device (whatever the collate made where): a step then copies nothing.
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def compile_networks(arch, backend: str) -> None:
    """``torch.compile`` every transformer block (both entry points) and head of student and teacher.

    Block by block rather than the whole network: the crop groups, masks and stochastic-depth
    subsets vary between iterations, which would recompile a whole-network graph; the blocks see
    the same shapes every iteration and share one compiled graph.
    """
    for network in (arch.student, arch.teacher):
        for block in network.backbone.blocks:
            block.forward = torch.compile(block.forward, backend=backend)
            block.forward_list = torch.compile(block.forward_list, backend=backend)
        for head in (network.dino_head, network.ibot_head):
            head.forward = torch.compile(head.forward, backend=backend)


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def time_training_steps(arch, optimizer, cfg, batch_size: int, spec: dict, inject_oom: bool) -> dict:
    """Time ``warmup + steps`` iterations at ``batch_size``; the row's measurements.

    Returns:
        ``it_per_s`` (1 / median step), ``samples_per_s``, ``flops_per_it`` (analytic, the
        ``benchmark.py train`` convention), ``peak_mem_gib`` and ``first_step_s`` (compilation
        under ``torch.compile``).
    """
    from dinov2.benchmarking.perf import time_callable

    device = arch.device
    if inject_oom:  # --inject step=oom: the path a real out-of-memory takes, on any machine
        raise torch.cuda.OutOfMemoryError("injected out-of-memory (--inject step=oom)")
    batch = synthetic_batch(cfg, batch_size, device)
    sync = _synchronize(device)

    def step() -> None:
        arch.forward_backward(batch, teacher_temp=float(cfg.teacher.teacher_temp))
        arch.optimizer_step(optimizer)
        arch.update_teacher(float(cfg.teacher.momentum_teacher))

    _reset_memory(device)
    start = time.perf_counter()
    step()
    if sync is not None:
        sync()
    first = time.perf_counter() - start
    timing = time_callable(step, repeats=spec["steps"], warmup=spec["warmup"] - 1, synchronize=sync)
    return {"it_per_s": 1.0 / timing.median, "samples_per_s": batch_size / timing.median,
            "flops_per_it": flops_per_iteration(cfg),
            "peak_mem_gib": _peak_memory(device), "first_step_s": first}


def stage_step(spec: dict, cases: list[dict], emit: Emit) -> None:
    """One model for every case (eager cases first, then compiled in place); a failing case is a row.

    Under ``torch.compile`` the first batch size compiles static shapes and the next one
    recompiles with a dynamic batch dimension, which the third reuses (the detail column counts
    the graphs).
    """
    from dinov2.optim.param_groups import apply_optim_scheduler
    from dinov2.train.ssl_meta_arch import SSLMetaArch

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    with device:  # initialise ViT-L's weights on the GPU: seconds instead of a minute on the CPU
        arch = SSLMetaArch(recipe_config(spec), device).train()
    optimizer = arch.build_optimizer()
    # A small real update: the step's cost does not depend on the values, only on doing them.
    apply_optim_scheduler(optimizer, lr=1e-5, wd=0.04, last_layer_lr=1e-5)
    largest = max(case["batch"] for case in cases)
    compiled = False
    # Eager cases first (compiling is in place); compiled ones from the recipe's batch down, so that
    # the first, longest compilation is the one that matters most if the budget ends the stage.
    for case in sorted(cases, key=lambda c: (c["compile"], -c["batch"] if c["compile"] else c["batch"])):
        row = {"case": case["case"]}
        try:
            if case["compile"] and not compiled:
                compile_networks(arch, spec["compile_backend"])
                compiled = True
            cfg = recipe_config(spec, f"train.batch_size_per_gpu={case['batch']}")
            inject_oom = spec["inject"].get("step") == "oom" and case["batch"] == largest
            row.update(status="ok", **time_training_steps(arch, optimizer, cfg, case["batch"], spec, inject_oom))
            row["detail"] = f"first step {row['first_step_s']:.1f} s" + (
                f"; {_compiled_graphs()} compiled graphs ({spec['compile_backend']})" if compiled else "")
        except torch.cuda.OutOfMemoryError:
            row.update(status="OOM", detail=f"out of memory at batch {case['batch']}")
        except Exception as exc:  # noqa: BLE001 - a case that fails is a row of the table, not the end of it
            row.update(status=f"failed: {type(exc).__name__}: {exc}")
        finally:
            optimizer.zero_grad(set_to_none=True)
            _reset_memory(device)
        emit(row)


# ------------------------------------------------------------------------------- data
def synthetic_datalist(spec: dict) -> Path:
    """The check's synthetic volumes (written once per run, shared by the data stages)."""
    from dinov2.sample_data.synthetic import write_synthetic_datalist

    folder = Path(spec["work_dir"]) / "volumes"
    datalist = folder / "pretrain.json"
    if not datalist.is_file():
        write_synthetic_datalist(folder, count=spec["volume_count"], shape=spec["volume_shape"])
    return datalist


def _volumes_note(spec: dict) -> str:
    return f"{spec['volume_count']} synthetic {'x'.join(map(str, spec['volume_shape']))} volumes"


def run_training_loop(spec: dict, case: dict, datalist: Path, work: Path) -> dict:
    """``train3d.train`` for ``loop_warmup + loop_iterations`` iterations; the row's measurements."""
    from dinov2.train.train3d import train

    bench = load_script("benchmark_train")
    iterations = spec["loop_warmup"] + spec["loop_iterations"]
    overrides = [f"train.datalist={datalist}", f"train.batch_size_per_gpu={spec['loop_batch']}",
                 f"train.max_iterations={iterations}", "train.log_period_iterations=1", "train.monitor_collapse=false",
                 "train.progress_bar=false", f"checkpointing.period_iterations={10 ** 9}",
                 f"evaluation.eval_period_iterations={10 ** 9}", f"preprocessing.cache.dir={work / 'cache'}",
                 f"{AUGMENT_KEY}={str(case['augment_on_device']).lower()}"]
    if spec["loop_workers"] is not None:
        overrides.append(f"train.num_workers={spec['loop_workers']}")
    cfg = recipe_config(spec, *overrides)
    bench.fill_cache(cfg)  # preprocessing is not a training iteration's cost
    device = torch.device(spec["device"])
    _reset_memory(device)
    out = Path(tempfile.mkdtemp(dir=work, prefix="run_"))
    # The final training state and teacher export are not an iteration's cost, and for ViT-L they
    # write ~7 GB: a good part of the check's time budget spent on the disk.
    train(cfg, out, resume=False, final_saves=False)
    lines = [json.loads(x) for x in (out / "training_metrics.json").read_text().splitlines()][spec["loop_warmup"]:]
    it_per_s = statistics.median(line["iterations_per_s"] for line in lines)
    wait = statistics.fmean(line["data_wait_share"] for line in lines)
    return {"it_per_s": it_per_s, "samples_per_s": it_per_s * spec["loop_batch"],
            "flops_per_it": flops_per_iteration(cfg), "peak_mem_gib": _peak_memory(device),
            "detail": f"data wait {wait:.0%}; {bench.started_workers(int(cfg.train.num_workers))} workers; "
                      f"{len(lines)} timed iterations; {_volumes_note(spec)}"}


def stage_loop(spec: dict, cases: list[dict], emit: Emit) -> None:
    """The training loop per case (the driver's: ``crops.augment_on_device`` off and on); a failing case is a row."""
    datalist = synthetic_datalist(spec)
    work = Path(spec["work_dir"])
    for case in cases:
        row = {"case": case["case"]}
        try:
            row.update(status="ok", **run_training_loop(spec, case, datalist, work))
        except torch.cuda.OutOfMemoryError:
            row.update(status="OOM", detail=f"out of memory at batch {spec['loop_batch']}")
        except Exception as exc:  # noqa: BLE001 - a case that fails is a row
            row.update(status=f"failed: {type(exc).__name__}: {exc}")
        finally:
            _reset_memory(torch.device(spec["device"]))
        emit(row)


def stage_loader(spec: dict, cases: list[dict], emit: Emit) -> None:
    """Samples/s of the loader alone (recipe crops, in-memory cache, one synthetic volume) per worker count."""
    data_bench = load_script("benchmark_data")
    volume = Path(json.loads(synthetic_datalist(spec).read_text())[0]["image"])
    for case in cases:
        row = {"case": case["case"]}
        try:
            per_cpu, per_wall = data_bench.loader_throughput(volume=volume, workers=case["workers"],
                                                             seconds=spec["loader_seconds"],
                                                             batch_size=spec["loader_batch"])
            row.update(status="ok", samples_per_s=per_wall,
                       detail=f"{per_cpu:.1f} samples per CPU-s; batch {spec['loader_batch']}; "
                              f"{spec['loader_seconds']:g} s window; {_volumes_note(spec)}")
        except Exception as exc:  # noqa: BLE001 - a case that fails is a row
            row.update(status=f"failed: {type(exc).__name__}: {exc}")
        emit(row)


STAGES: dict[str, Callable[[dict, list[dict], Emit], None]] = {
    "peak": stage_peak, "step": stage_step, "loop": stage_loop, "loader": stage_loader,
}


def row_writer(path: Path, stage: str) -> Emit:
    """``emit(row)``: append ``row`` (with its stage) as one JSON line, flushed at once."""

    def emit(row: dict) -> None:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"stage": stage, **row}) + "\n")

    return emit


def main(argv: list[str] | None = None) -> int:
    """Run one stage: ``STAGE SPEC.json ROWS.jsonl``."""
    stage, spec_path, rows_path = sys.argv[1:] if argv is None else argv
    spec: dict[str, Any] = json.loads(Path(spec_path).read_text())
    if spec["threads"] is not None:
        torch.set_num_threads(spec["threads"])
    injected = spec["inject"].get(stage)
    if injected == "error":
        raise RuntimeError(f"injected failure (--inject {stage}=error)")
    if injected == "hang":
        time.sleep(10 ** 6)
    STAGES[stage](spec, spec["cases"][stage], row_writer(Path(rows_path), stage))
    return 0


if __name__ == "__main__":
    sys.exit(main())
