"""The demo: the whole main job, end to end, on real brain volumes shipped inside PyPI packages.

1. datalists from the embedded volumes (pretraining list, brain-tissue segmentation set,
   brain-lobe patch classification set);
2. DINO + iBOT + KoLeo pretraining of a tiny 3D ViT (``configs/tiny_cpu.yaml``), teacher export;
3. UNETR finetuning on brain-tissue segmentation from the pretrained teacher, and the same head
   on a random-init backbone for comparison (Dice and HD95 on the test cases);
4. a linear probe of the frozen teacher on the lobe task;
5. PCA and last-block attention maps of a real volume, as NIfTI and PNG;
6. a summary of every result and where it is.

Each step calls the same entry point a user runs, and prints that command first::

    python scripts/demo.py [--output-dir demo_output] [--quick]

``--quick`` (a few minutes on 2 CPU cores) is what the test suite runs; the default takes
about a quarter of an hour. Re-running reuses finished steps (every entry point resumes).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny_cpu.yaml"


@dataclass(frozen=True)
class Profile:
    """How long each stage runs. The quick profile only proves the pipeline works."""

    pretrain_epochs: int          # x 10 iterations of batch 4 (configs/tiny_cpu.yaml)
    seg_image_size: int           # training crop and sliding window side
    seg_feature_size: int         # UNETR decoder width (convolutions at full resolution dominate on CPU)
    seg_overlap: float            # sliding-window overlap of validation and test
    seg_epochs: int
    seg_epoch_length: int
    seg_eval_iters: int
    linear_epochs: int
    linear_epoch_length: int


PROFILES = {
    "full": Profile(pretrain_epochs=30, seg_image_size=40, seg_feature_size=16, seg_overlap=0.5,
                    seg_epochs=6, seg_epoch_length=25, seg_eval_iters=75, linear_epochs=10, linear_epoch_length=50),
    "quick": Profile(pretrain_epochs=2, seg_image_size=32, seg_feature_size=8, seg_overlap=0.25,
                     seg_epochs=1, seg_epoch_length=10, seg_eval_iters=10, linear_epochs=2, linear_epoch_length=20),
}


def banner(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}", flush=True)


def run_step(title: str, module: str, argv: list[str]) -> float:
    """Run an entry point's ``main(argv)`` in this process after printing the equivalent command."""
    banner(title)
    print("$ python -m " + module + " " + " ".join(shlex.quote(a) for a in argv), flush=True)
    start = time.perf_counter()
    main = __import__(module, fromlist=["main"]).main
    code = main(argv)
    if code not in (0, None):
        raise SystemExit(f"demo: step '{title}' failed with exit code {code}")
    elapsed = time.perf_counter() - start
    print(f"[{title}: {elapsed:.0f} s]", flush=True)
    return elapsed


def latest_teacher(pretrain_dir: Path) -> Path:
    """The newest ``eval/training_<iter>/teacher_checkpoint.pth`` of a pretraining run."""
    exports = sorted(pretrain_dir.glob("eval/training_*/teacher_checkpoint.pth"),
                     key=lambda p: int(p.parent.name.split("_")[-1]))
    if not exports:
        raise SystemExit(f"demo: pretraining wrote no teacher export under {pretrain_dir}/eval")
    return exports[-1]


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="End-to-end demo on embedded real brain volumes.")
    parser.add_argument("--output-dir", default=str(REPO / "demo_output"), help="where everything is written")
    parser.add_argument("--quick", action="store_true", help="short stages (a few minutes): the test suite runs this")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the demo's models are tiny: 1 is fastest on 2 cores)")
    args = parser.parse_args(argv)
    profile = PROFILES["quick" if args.quick else "full"]
    import torch

    # The demo's models are tiny: intra-op threads only add synchronisation, and on a busy
    # machine they make each step many times slower (0.4 s against 12 s per segmentation step).
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()

    banner("1/6  Datalists from the real brain volumes shipped in the sample-data packages")
    from dinov2.data.classification_sample import write_classification_dataset
    from dinov2.data.sample_data import write_pretraining_datalist, write_segmentation_dataset

    pretrain_list = write_pretraining_datalist(out / "data" / "pretrain_datalist.json")
    n_volumes = len(json.loads(pretrain_list.read_text()))
    seg_list = write_segmentation_dataset(out / "data" / "brain_tissue", labels="tissue")
    lobes_list = write_classification_dataset(out / "data" / "brain_lobes")
    print(f"pretraining datalist: {pretrain_list} ({n_volumes} volumes)")
    print(f"segmentation set:     {seg_list}")
    print(f"classification set:   {lobes_list}")

    pretrain_dir = out / "pretrain"
    iterations = profile.pretrain_epochs * 10
    run_step("2/6  Pretraining a tiny 3D ViT with DINO + iBOT + KoLeo", "dinov2.train.train3d", [
        "--config-file", str(TINY_CONFIG), "--output-dir", str(pretrain_dir),
        f"train.datalist={pretrain_list}", f"optim.epochs={profile.pretrain_epochs}",
        f"evaluation.eval_period_iterations={iterations}", "train.progress_bar=true",
        "train.log_period_iterations=10",
    ])
    teacher = latest_teacher(pretrain_dir)
    print(f"teacher checkpoint: {teacher}")

    seg_common = [
        "--dataset-name", "brain_tissue", "--base-data-dir", str(seg_list.parent),
        "--segmentation-head", "UNETR", "--epochs", str(profile.seg_epochs),
        "--epoch-length", str(profile.seg_epoch_length), "--eval-iters", str(profile.seg_eval_iters),
        "--warmup-iters", str(max(1, profile.seg_epoch_length // 2)), "--batch-size", "1",
        "--num-workers", "0", "--learning-rate", "1e-3", "--image-size", str(profile.seg_image_size),
        f"model.unetr.feature_size={profile.seg_feature_size}", f"evaluation.overlap={profile.seg_overlap}",
        "evaluation.sw_batch_size=4", "train.device=cpu", "train.log_every=10",
    ]
    seg_runs = {"pretrained": teacher, "random init": "none"}
    seg_dirs = {}
    for i, (name, weights) in enumerate(seg_runs.items()):
        seg_dirs[name] = out / "segmentation" / name.replace(" ", "_")
        extra = [] if weights != "none" else ["model.arch=vit_tiny_3d", "model.backbone_kwargs.patch_size=8"]
        run_step(f"3/6  UNETR brain-tissue segmentation, {name} backbone ({i + 1}/2)",
                 "dinov2.eval.segmentation3d",
                 ["--pretrained-weights", str(weights), "--output-dir", str(seg_dirs[name]), *seg_common, *extra])

    linear_dir = out / "linear_probe"
    run_step("4/6  Linear probe of the frozen teacher: brain lobe of real MRI patches", "dinov2.eval.linear3d", [
        "--pretrained-weights", str(teacher), "--output-dir", str(linear_dir), "--dataset-name", "brain_lobes",
        "--base-data-dir", str(lobes_list.parent), "--epochs", str(profile.linear_epochs),
        "--epoch-length", str(profile.linear_epoch_length), "--device", "cpu",
    ])

    test_image = json.loads(seg_list.read_text())["test"][0]["image"]
    test_image = str((seg_list.parent / test_image).resolve())
    vis_dirs = {}
    for vis in ("pca", "mhsa"):
        vis_dirs[vis] = out / "visualisation" / vis
        run_step(f"5/6  {'PCA of patch features' if vis == 'pca' else 'Last-block attention per head'}",
                 "dinov2.eval.vis_pca", [
                     "--pretrained-weights", str(teacher), "--image-path", test_image,
                     "--output-dir", str(vis_dirs[vis]), "--vis-type", vis, "--input-type", "full_image",
                 ])

    banner("6/6  Results")
    print(summarise(out, teacher, seg_dirs, linear_dir, vis_dirs, time.perf_counter() - start))
    return 0


def summarise(out: Path, teacher: Path, seg_dirs: dict[str, Path], linear_dir: Path,
              vis_dirs: dict[str, Path], elapsed: float) -> str:
    """A plain-text report of the metrics and of where every output is."""
    lines = ["Brain-tissue segmentation (UNETR, test cases; Dice higher is better, HD95 in mm lower is better)", ""]
    results = {name: json.loads((d / "results.json").read_text()) for name, d in seg_dirs.items()}
    classes = None
    for name, res in results.items():
        summary = (res.get("test") or {}).get("summary") or {}
        if classes is None:
            classes = list(summary.get("dice", {}))
            lines.append(f"  {'backbone':<12} " + " ".join(f"{c[:12]:>12}" for c in classes)
                         + f" {'mean fg Dice':>13} {'mean fg HD95':>13}")
        lines.append(f"  {name:<12} " + " ".join(f"{fmt(summary.get('dice', {}).get(c)):>12}" for c in classes)
                     + f" {fmt(summary.get('mean_dice')):>13} {fmt(summary.get('mean_hd95'), '.2f'):>13}")
    lines.append("  (a few hundred iterations of tiny pretraining on 14 volumes check the pipeline; they are not "
                 "expected to beat random init)")
    lin = json.loads((linear_dir / "results.json").read_text())
    test = lin.get("test") or lin["validation"]
    lines += ["", "Linear probe (brain lobe of 32 mm patches, test hemisphere)",
              f"  best head: {lin['best_classifier']['name']} (chance balanced accuracy "
              f"{fmt(lin.get('chance_balanced_accuracy'))})",
              f"  accuracy {fmt(test.get('accuracy'))}, balanced accuracy {fmt(test.get('balanced_accuracy'))}, "
              f"macro AUROC {fmt(test.get('auroc_macro'))}",
              "", "Where everything is:",
              f"  pretraining run       {teacher.parents[2]}  (training_metrics.json, checkpoints/, log.txt)",
              f"  teacher checkpoint    {teacher}"]
    for name, d in seg_dirs.items():
        lines.append(f"  segmentation ({name}) {d}  (results.json, best_model.pth)")
    lines.append(f"  linear probe          {linear_dir}/results.json")
    for vis, d in vis_dirs.items():
        pngs = sorted(d.rglob("*.png"))
        lines.append(f"  {vis + ' maps':<21} {d}  ({len(list(d.rglob('*.nii*')))} NIfTI, "
                     f"{len(pngs)} PNG{': ' + pngs[0].name if pngs else ''})")
    lines += ["", f"Predict on your own volume with the best segmentation model:",
              f"  python -m dinov2.eval.predict --checkpoint {seg_dirs['pretrained']}/best_model.pth "
              f"--input YOUR.nii.gz --output predictions/",
              "", f"demo finished in {elapsed / 60:.1f} min; outputs under {out}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
