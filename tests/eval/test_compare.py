"""python -m dinov2.eval.compare: the plan, resumable runs, the table's numbers, the paired
bootstrap, the plots and the errors that stop it before anything runs."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2.checkpoints.teacher_export import save_teacher_checkpoint
from dinov2.eval.compare import cli, entries, runner
from dinov2.eval.compare.plan import PlanSettings, build_plan
from dinov2.eval.compare.plots import write_plots
from dinov2.eval.compare.report import write_reports
from dinov2.eval.compare.spec import Backbone, parse_task
from dinov2.eval.compare.stats import average_cases, paired_bootstrap
from dinov2.eval.compare.table import aggregate
from dinov2.models import build_model
from dinov2.sample_data import write_segmentation_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_VIT = {"patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}
SEG_ARGS = ("seg:--epochs=1 --epoch-length=4 --eval-iters=4 --warmup-iters=1 --batch-size=1 --num-workers=0 "
            "--image-size=32 --resize-scale=0.5 model.unetr.feature_size=8 evaluation.overlap=0.25")
PROBE_ARGS = "probe:--image-size 16 --epochs 1 --learning-rates 0.1"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny exported teacher (random weights, seed 0) that records its architecture."""
    torch.manual_seed(0)
    model = build_model("vit_tiny_3d", img_size=16, **TINY_VIT)
    config = {"student": {"arch": "vit_tiny_3d", **TINY_VIT}, "crops": {"global_crops_size": 16}}
    path = tmp_path_factory.mktemp("teacher") / "teacher_checkpoint.pth"
    return save_teacher_checkpoint(path, {f"backbone.{k}": v for k, v in model.state_dict().items()}, config, 0)


@pytest.fixture(scope="module")
def tissue_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tissue")
    write_segmentation_dataset(out, labels="tissue", seed=0)
    return out


def _argv(out, teacher, tissue_dir, lobe_data, *extra, probe_args=PROBE_ARGS):
    return ["--output-dir", str(out), "--backbones", f"ours={teacher}", "random",
            "--tasks", "seg:brain_tissue:UNETR", "probe:brain_lobes",
            "--data-dir", f"brain_tissue={tissue_dir}", f"brain_lobes={lobe_data.parent}",
            "--seeds", "2", "--reference", "random", "--task-args", SEG_ARGS, probe_args, *extra]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, teacher, tissue_dir, lobe_data):
    """A whole tiny comparison: 2 backbones x (segmentation + probe) x 2 seeds = 8 runs."""
    out = tmp_path_factory.mktemp("comparison")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: the per-test one_thread fixture does not cover it
    try:
        assert cli.main(_argv(out, teacher, tissue_dir, lobe_data)) == 0
    finally:
        torch.set_num_threads(previous)
    return out


# ------------------------------------------------------------------------------------------ plan
def test_plan_runs_every_backbone_task_fraction_and_seed(teacher, tissue_dir, lobe_data, tmp_path):
    args = cli.get_args_parser().parse_args(_argv(tmp_path / "c", teacher, tissue_dir, lobe_data, "--fractions",
                                                  "10", "100", "--seeds", "3", "seg:1"))
    settings, reference = cli.settings_from_args(args)
    runs = build_plan(settings)
    assert reference == "random"
    # seg: 2 fractions x 1 seed x 2 backbones; probe: 2 fractions x 3 seeds x 2 backbones
    assert len(runs) == 4 + 12
    folders = [r.out_dir.relative_to(tmp_path / "c").as_posix() for r in runs]
    assert folders[:4] == ["runs/seg-brain_tissue-UNETR/ours/f10_s0", "runs/seg-brain_tissue-UNETR/random/f10_s0",
                           "runs/seg-brain_tissue-UNETR/ours/f100_s0", "runs/seg-brain_tissue-UNETR/random/f100_s0"]
    assert "runs/probe-brain_lobes/random/f10_s2" in folders and len(set(folders)) == len(folders)
    for run in runs:
        argv = list(run.argv)
        flag = dict(zip(argv, argv[1:]))
        # every run of a fraction trains on the same nested subset; the run seed varies
        assert flag["--dataset-percent"] == f"{run.fraction:g}" and flag["--dataset-seed"] == "0"
        assert flag["--seed"] == str(run.seed) and flag["--output-dir"] == str(run.out_dir)
        # random init copies the teacher's recorded architecture, its input size left to the task
        assert ("model.arch=vit_tiny_3d" in argv) == (run.backbone.name == "random")
        assert ("model.backbone_kwargs.embed_dim=32" in argv) == (run.backbone.name == "random")
        assert flag["--pretrained-weights"] == ("none" if run.backbone.name == "random" else str(teacher))
    # --isolate runs the same command line as a child process
    assert entries.command("seg", runs[0].argv) == [sys.executable, "-m", "dinov2.eval.segmentation", *runs[0].argv]


# ---------------------------------------------------------------------------------- end to end
def test_comparison_writes_table_csv_and_plots(comparison):
    text = (comparison / "comparison.md").read_text()
    assert "## seg:brain_tissue:UNETR, 100 % of the training set" in text and "## probe:brain_lobes" in text
    assert "accuracy: paired diff vs random [95 % CI]" in text and "| random |" in text and "reference |" in text
    rows = list(csv.DictReader(open(comparison / "comparison.csv")))
    assert len(rows) == 2 * 2 * 3  # tasks x backbones x metrics
    probe = [r for r in rows if r["task"] == "probe:brain_lobes"]
    assert {r["seeds"] for r in rows} == {"2"} and {r["cases"] for r in probe} == {"200"}
    assert {r["cases"] for r in rows if r["task"].startswith("seg")} == {"2"}  # the sample's two test cases
    ours_acc = next(r for r in probe if r["backbone"] == "ours" and r["metric"] == "accuracy")
    assert ours_acc["verdict"] in ("better", "worse", "within noise") and int(ours_acc["paired_cases"]) == 200
    assert float(ours_acc["ci_low"]) <= float(ours_acc["paired_diff"]) <= float(ours_acc["ci_high"])
    for png in ("seg-brain_tissue-UNETR_bars.png", "probe-brain_lobes_bars.png"):
        assert (comparison / "plots" / png).stat().st_size > 5000
    # the probe's results.json now lists every test entry, which the paired difference needs
    results = json.loads((comparison / "runs/probe-brain_lobes/ours/f100_s0/results.json").read_text())
    cases = results["test"]["cases"]
    assert len(cases) == results["test"]["n"] and {"name", "label", "prediction", "correct"} <= set(cases[0])
    assert np.mean([c["correct"] for c in cases]) == pytest.approx(results["test"]["accuracy"])


def test_a_second_run_redoes_only_what_is_missing_or_changed(comparison, teacher, tissue_dir, lobe_data, tmp_path,
                                                             monkeypatch, capsys):
    copy = tmp_path / "moved"
    shutil.copytree(comparison, copy)  # a moved comparison keeps its finished runs
    calls = []
    real_execute = runner.execute

    def counting(run, isolate):
        calls.append(run.out_dir.relative_to(copy).as_posix())
        return real_execute(run, isolate)

    monkeypatch.setattr(runner, "execute", counting)
    (copy / "runs/seg-brain_tissue-UNETR/ours/f100_s1/results.json").unlink()
    assert cli.main(_argv(copy, teacher, tissue_dir, lobe_data)) == 0
    assert calls == ["runs/seg-brain_tissue-UNETR/ours/f100_s1"]
    assert cli.main(_argv(copy, teacher, tissue_dir, lobe_data)) == 0
    assert len(calls) == 1  # everything finished: nothing runs
    capsys.readouterr()
    # a changed task argument makes exactly the runs it changes new; --dry-run shows it without running
    assert cli.main(_argv(copy, teacher, tissue_dir, lobe_data, "--dry-run",
                          probe_args=PROBE_ARGS.replace("--epochs 1", "--epochs 2"))) == 0
    plan = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert [line.rsplit(": ", 1)[1] for line in plan] == ["finished"] * 4 + ["new"] * 4
    assert len(calls) == 1


# -------------------------------------------------------------------------- table from fake runs
SEG_DICE = {"ours": [0.6, 0.7, 0.8], "random": [0.5, 0.5, 0.6]}
SEG_HD95 = {"ours": [9.0, 7.0, 8.0], "random": [6.0, 6.5, 7.0]}


def _fake_seg_results(dice: float, hd95: float, case_dice: list[float]) -> dict:
    """A segmentation results.json with one foreground class and the given per-case Dice."""
    cases = [{"name": f"case{i}", "dice": {"background": 0.99, "tumour": d}} for i, d in enumerate(case_dice)]
    return {"channels": ["background", "tumour"], "foreground_channels": [1],
            "test": {"split": "test", "cases": cases, "summary": {"mean_dice": dice, "mean_nsd": dice / 2,
                                                                   "mean_hd95": hd95}}}


def _fake_plan(tmp_path, fractions=(100.0,)) -> list:
    task = parse_task("seg:brain_tissue:UNETR")
    settings = PlanSettings(backbones=[Backbone("ours", "x.pth"), Backbone("random", "none")], tasks=[task],
                            fractions=list(fractions), seeds={"seg": [0, 1, 2], "probe": []}, output_dir=tmp_path,
                            data_dirs={task.label: tmp_path})
    runs = build_plan(settings)
    for run in runs:
        run.out_dir.mkdir(parents=True)
        name, seed = run.backbone.name, run.seed
        scale = run.fraction / 100  # the Dice curve rises with the label fraction
        shift = 0.1 if name == "ours" else 0.0
        case_dice = [scale * (0.5 + shift + 0.01 * i) for i in range(20)]
        results = _fake_seg_results(scale * SEG_DICE[name][seed], SEG_HD95[name][seed], case_dice)
        (run.out_dir / "results.json").write_text(json.dumps(results))
    return runs


def test_table_mean_std_best_and_paired_difference_from_results_files(tmp_path):
    runs = _fake_plan(tmp_path)
    (group,) = aggregate(runs, reference="random")
    ours, random = group.rows
    assert ours.cells["Dice"][0] == pytest.approx(0.7) and ours.cells["Dice"][1] == pytest.approx(0.1)
    assert random.cells["Dice"][0] == pytest.approx(1.6 / 3)
    assert random.cells["Dice"][1] == pytest.approx(math.sqrt(((0.5 - 1.6 / 3) ** 2 * 2 + (0.6 - 1.6 / 3) ** 2) / 2))
    assert ours.cells["HD95 mm"] == pytest.approx((8.0, 1.0, 3))
    # Dice and NSD: higher is better (ours); HD95: lower is better (random)
    assert ours.best == {"Dice", "NSD"} and random.best == {"HD95 mm"}
    assert ours.n_cases == 20 and random.is_reference and random.paired is None
    assert ours.paired.mean == pytest.approx(0.1) and ours.paired.n == 20
    assert ours.paired.low == pytest.approx(0.1) and ours.paired.high == pytest.approx(0.1)  # constant difference

    md, csv_path, text = write_reports([group], tmp_path, "random")
    assert ("| ours | **0.700 ± 0.100** | **0.350 ± 0.050** | 8.00 ± 1.00 | 3 | 20 | "
            "+0.100 [+0.100, +0.100] better |") in text
    assert "| random | 0.533 ± 0.058 | 0.267 ± 0.029 | **6.50 ± 0.50** | 3 | 20 | reference |" in text
    rows = {(r["backbone"], r["metric"]): r for r in csv.DictReader(open(csv_path))}
    assert float(rows["ours", "Dice"]["mean"]) == pytest.approx(0.7) and rows["ours", "Dice"]["best"] == "1"
    assert rows["random", "HD95 mm"]["best"] == "1" and rows["ours", "HD95 mm"]["higher_is_better"] == "0"
    assert rows["ours", "Dice"]["verdict"] == "better" and rows["ours", "NSD"]["verdict"] == ""


def test_a_run_without_results_is_left_out_and_named(tmp_path):
    runs = _fake_plan(tmp_path)
    (runs[-1].out_dir / "results.json").unlink()  # random, seed 2
    (group,) = aggregate(runs, reference="random")
    assert group.rows[1].seeds == [0, 1] and group.rows[1].cells["Dice"][2] == 2
    _, _, text = write_reports([group], tmp_path, "random", missing=[runs[-1].label])
    assert "1 runs did not finish): seg:brain_tissue:UNETR random 100% seed 2." in text


# ---------------------------------------------------------------------------------- statistics
def test_paired_bootstrap_tells_a_real_difference_from_noise():
    rng = np.random.default_rng(1)
    reference = {f"c{i}": float(v) for i, v in enumerate(rng.uniform(0.4, 0.8, 30))}
    better = {k: v + 0.05 + float(rng.normal(0, 0.01)) for k, v in reference.items()}
    noise = {k: v + float(rng.normal(0, 0.05)) for k, v in reference.items()}
    clear = paired_bootstrap(better, reference, seed=0)
    assert clear.n == 30 and 0 < clear.low < clear.mean < clear.high and clear.verdict() == "better"
    assert clear.verdict(higher_is_better=False) == "worse"  # the same numbers as distances: worse
    unclear = paired_bootstrap(noise, reference, seed=0)
    assert unclear.low < 0 < unclear.high and unclear.verdict() == "within noise"
    assert paired_bootstrap(noise, reference, seed=0) == unclear  # seeded: the same interval every time
    # the interval of a mean difference, by hand: roughly mean +- 1.96 * sd / sqrt(n)
    diffs = np.array([noise[k] - reference[k] for k in reference])
    half = 1.96 * diffs.std(ddof=1) / math.sqrt(diffs.size)
    assert unclear.low == pytest.approx(diffs.mean() - half, abs=0.4 * half)
    assert unclear.high == pytest.approx(diffs.mean() + half, abs=0.4 * half)
    # only the cases both have, NaN left out; below 10 cases no verdict
    few = paired_bootstrap({"a": 0.9, "b": 0.8, "c": math.nan}, {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4})
    assert few.n == 2 and few.verdict() == "too few cases"
    assert average_cases([{"a": 1.0, "b": math.nan}, {"a": 0.0, "b": 0.5}]) == {"a": 0.5, "b": 0.5}


# --------------------------------------------------------------------------------------- plots
def test_plots_bars_and_fraction_curves(tmp_path, caplog, monkeypatch):
    runs = _fake_plan(tmp_path, fractions=(25.0, 50.0, 100.0))
    groups = aggregate(runs, reference="random")
    assert [g.fraction for g in groups] == [25.0, 50.0, 100.0]
    written = write_plots(groups, tmp_path)
    assert [p.name for p in written] == ["seg-brain_tissue-UNETR_bars.png", "seg-brain_tissue-UNETR_fractions.png"]
    assert all(p.stat().st_size > 5000 for p in written)

    from dinov2.eval.compare import plots
    from dinov2.plot.errors import PlotError

    def no_matplotlib():
        raise PlotError("matplotlib is not installed: pip install matplotlib.")

    monkeypatch.setattr(plots, "pyplot", no_matplotlib)
    caplog.set_level(logging.INFO, logger="dinov2.eval.compare")
    assert write_plots(groups, tmp_path / "without") == []
    assert caplog.text.count("No comparison plots: matplotlib is not installed") == 1


# -------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("change, needle", [
    ({"--backbones": ["ours=missing/teacher.pth", "random"]}, "checkpoint not found: missing/teacher.pth"),
    ({"--tasks": ["seg:no_such_preset"]}, "Unknown dataset 'no_such_preset'"),
    ({"--tasks": ["seg"]}, "write seg:<preset>[:<head>] or probe:<preset>"),
    ({"--tasks": ["probe:brain_tissue"]}, "'brain_tissue' is a segmentation preset; write seg:brain_tissue"),
    ({"--tasks": ["seg:brain_tissue:NoHead"]}, "Unknown segmentation head 'NoHead'"),
    ({"--backbones": ["a=none", "a=none"]}, "the name(s) a are given twice"),
    ({"--task-args": ["seg:--seed=3"]}, "the comparison sets --seed itself"),
    ({"--task-args": ["seg:--no-such-flag"]}, "unrecognized arguments: --no-such-flag"),
    ({"--task-args": ["seg:model.hed=UNETR"]}, "model.hed"),
    ({"--reference": ["nobody"]}, "--reference nobody: not one of --backbones"),
    ({"--seeds": ["0"]}, "--seeds 0: write a count >= 1"),
    ({"--backbones": ["random"]}, "only random-init backbones: pass --arch"),
])
def test_a_bad_value_is_one_error_line_before_anything_runs(change, needle, teacher, tissue_dir, lobe_data, tmp_path,
                                                            error_line, monkeypatch):
    argv = _argv(tmp_path / "c", teacher, tissue_dir, lobe_data)
    for flag, values in change.items():
        if flag in argv:
            start = argv.index(flag) + 1
            end = next((i for i in range(start, len(argv)) if argv[i].startswith("--")), len(argv))
            argv[start:end] = values
        else:
            argv += [flag, *values]
    monkeypatch.setattr(runner, "execute", lambda run, isolate: pytest.fail("a run started"))
    assert cli.main(argv) == 1
    assert needle in error_line(only=True)
    assert not (tmp_path / "c").exists()


def test_a_missing_datalist_names_the_command_that_writes_it(teacher, tmp_path, error_line):
    argv = ["--output-dir", str(tmp_path / "c"), "--backbones", str(teacher), "--tasks", "probe:brain_lobes",
            "--data-dir", str(tmp_path / "nothing")]
    assert cli.main(argv) == 1
    line = error_line(only=True)
    assert "datalist not found" in line and "python -m dinov2.sample_data.classification --out" in line
