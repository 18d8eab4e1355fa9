"""The quick demo runs end to end on the embedded real data and reports every result."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--quick", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = proc.stdout[proc.stdout.index("6/6  Results"):]

    teacher = sorted(out.glob("pretrain/eval/training_*/teacher_checkpoint.pth"))
    assert teacher, "pretraining exported no teacher"
    metrics = [json.loads(line) for line in (out / "pretrain" / "training_metrics.json").read_text().splitlines()]
    assert metrics and all("dino_loss" in m and "ibot_loss" in m and "koleo_loss" in m for m in metrics)

    # the segmentation runs are the comparison's (python -m dinov2.eval.compare): one seed each
    for run in ("pretrained", "random"):
        run_dir = out / "comparison" / "runs" / "seg-brain_tissue-UNETR" / run / "f100_s0"
        results = json.loads((run_dir / "results.json").read_text())
        summary = results["test"]["summary"]
        assert 0.0 <= summary["mean_dice"] <= 1.0
        assert set(summary["dice"]) == {"background", "ventricles", "grey matter", "other brain"}
    table = list(csv.DictReader(open(out / "comparison" / "comparison.csv", encoding="utf-8")))
    assert {(r["task"], r["backbone"]) for r in table} == {
        (t, b) for t in ("seg:brain_tissue:UNETR", "probe:brain_lobes") for b in ("pretrained", "random")}
    probe = next(r for r in table if r["task"] == "probe:brain_lobes" and r["backbone"] == "pretrained"
                 and r["metric"] == "accuracy")
    assert probe["seeds"] == "2" and probe["reference"] == "random" and probe["verdict"]
    assert sorted(p.name for p in (out / "comparison" / "plots").glob("*.png")) == [
        "probe-brain_lobes_bars.png", "seg-brain_tissue-UNETR_bars.png"]
    evidence = json.loads((out / "evidence" / "evidence.json").read_text())
    for task in ("patch", "dense"):
        assert 0.0 <= evidence["tasks"][task]["teacher"]["mean"] <= 1.0
        assert evidence["tasks"][task]["random_init"]["n"] >= 1
    # the demo pretrains on a datalist without the evaluation templates, and the evidence checked it
    overlap = evidence["pretraining_overlap"][0]
    assert overlap["checked"] and not overlap["held_out_in_datalist"] and not evidence["evaluation_data_in_pretraining"]
    assert (out / "pretrain" / "learning_curves.svg").read_text().startswith("<svg")
    assert "uniform" in proc.stdout[:proc.stdout.index("6/6  Results")]  # the learning table was shown

    test_image = nib.load(sorted((out / "data" / "brain_tissue").rglob("*.nii.gz"))[0])
    for vis in ("pca", "mhsa"):
        niftis = sorted((out / "visualisation" / vis).rglob("*.nii.gz"))
        assert niftis and sorted((out / "visualisation" / vis).rglob("*.png"))
        assert nib.load(niftis[0]).shape[:3] == test_image.shape[:3]

    # The report names every result so a user can find it.
    for needle in ("mean fg Dice", "random init", "Evidence", "teacher - random", "show no learning",
                   "teacher checkpoint", "pca maps", "mhsa maps", "dinov2.eval.segmentation.predict",
                   "Comparison: pretrained teacher vs random init", "paired diff vs random [95 % CI]",
                   "any difference between them is noise", "comparison.csv"):
        assert needle in report
