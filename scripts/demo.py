"""The demo: the whole main job, end to end, on real brain volumes shipped inside PyPI packages.

1. datalists from the embedded volumes (a pretraining list WITHOUT the FSL MNI152 templates that
   the evidence and the segmentation are evaluated on, and the brain-tissue segmentation set);
2. DINO + iBOT + KoLeo pretraining of a tiny 3D ViT with the small recipe that learns
   (``configs/small_cpu.yaml``), then its losses against their uniform (collapsed) lines;
3. the evidence: frozen teacher features against random-init backbones (3 seeds) and raw
   intensities, linear probes on a held-out template (``python -m dinov2.eval.evidence``);
4. UNETR finetuning on brain-tissue segmentation from the pretrained teacher, and the same head
   on a random-init backbone for comparison (Dice and HD95 on the test cases);
5. PCA and last-block attention maps of a real volume, as NIfTI and PNG;
6. a summary of every result and where it is.

Each step calls the same entry point a user runs, and prints that command first::

    python scripts/demo.py [--output-dir demo_output] [--quick]

``--quick`` (a few minutes on 2 CPU cores) is what the test suite runs: it only proves the
pipeline works, and says so. The default runs a shorter cut of the small recipe (its whole
schedule is in docs/experiments/small_scale_recipe.md) and takes about a quarter of an hour.
Re-running reuses finished steps (every entry point resumes).
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
SMALL_CONFIG = REPO / "configs" / "small_cpu.yaml"


# Iterations of the small recipe the full demo runs (its whole schedule is longer; the LR and
# temperature schedules keep their length, so this is the start of that run, not a shrunk copy).
PRETRAIN_CUT = 1500


@dataclass(frozen=True)
class Profile:
    """How long each stage runs. The quick profile only proves the pipeline works."""

    pretrain_iterations: int      # of configs/small_cpu.yaml (batch 16); its schedules keep their length
    seg_image_size: int           # training crop and sliding window side
    seg_feature_size: int         # UNETR decoder width (convolutions at full resolution dominate on CPU)
    seg_overlap: float            # sliding-window overlap of validation and test
    seg_epochs: int
    seg_epoch_length: int
    seg_eval_iters: int
    evidence_seeds: int           # random-init backbones the teacher is compared with


PROFILES = {
    "full": Profile(pretrain_iterations=PRETRAIN_CUT, seg_image_size=40, seg_feature_size=16, seg_overlap=0.5,
                    seg_epochs=6, seg_epoch_length=25, seg_eval_iters=75, evidence_seeds=3),
    "quick": Profile(pretrain_iterations=20, seg_image_size=32, seg_feature_size=8, seg_overlap=0.25,
                     seg_epochs=1, seg_epoch_length=10, seg_eval_iters=10, evidence_seeds=1),
}


def banner(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}", flush=True)


def run_step(title: str, module: str, argv: list[str]) -> float:
    """Run an entry point's ``main(argv)`` in this process after printing the equivalent command."""
    banner(title)
    print("$ python -m " + module + " " + " ".join(shlex.quote(a) for a in argv), flush=True)
    start = time.perf_counter()
    entry = __import__(module, fromlist=["main"])
    main = entry.main if hasattr(entry, "main") else __import__(module + ".__main__", fromlist=["main"]).main
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
    from dinov2.sample_data import write_pretraining_datalist, write_segmentation_dataset

    # The FSL MNI152 templates are what the evidence and the segmentation are evaluated on:
    # pretraining never sees them (nor 4D series), so the comparison below is on unseen data.
    pretrain_list = write_pretraining_datalist(out / "data" / "pretrain_datalist.json", hold_out_evaluation=True)
    n_volumes = len(json.loads(pretrain_list.read_text()))
    seg_list = write_segmentation_dataset(out / "data" / "brain_tissue", labels="tissue")
    print(f"pretraining datalist: {pretrain_list} ({n_volumes} volumes; FSL MNI152 templates held out)")
    print(f"segmentation set:     {seg_list}")

    pretrain_dir = out / "pretrain"
    iterations = profile.pretrain_iterations
    run_step("2/6  Pretraining a tiny 3D ViT with DINO + iBOT + KoLeo (configs/small_cpu.yaml)",
             "dinov2.train.train3d", [
                 "--config-file", str(SMALL_CONFIG), "--output-dir", str(pretrain_dir),
                 f"train.datalist={pretrain_list}", f"train.max_iterations={iterations}",
                 f"evaluation.eval_period_iterations={iterations}", "train.progress_bar=true",
             ])
    teacher = latest_teacher(pretrain_dir)
    print(f"teacher checkpoint: {teacher}")
    learning = show_learning(pretrain_dir)

    evidence_dir = out / "evidence"
    run_step("3/6  Evidence: frozen teacher vs random init vs raw intensities on a held-out template",
             "dinov2.eval.evidence", ["--teacher", str(teacher), "--output-dir", str(evidence_dir),
                                      "--random-seeds", str(profile.evidence_seeds)])

    seg_common = [
        "--dataset-name", "brain_tissue", "--base-data-dir", str(seg_list.parent),
        "--segmentation-head", "UNETR", "--epochs", str(profile.seg_epochs),
        "--epoch-length", str(profile.seg_epoch_length), "--eval-period-iterations", str(profile.seg_eval_iters),
        "--warmup-iters", str(max(1, profile.seg_epoch_length // 2)), "--batch-size", "1",
        "--num-workers", "0", "--learning-rate", "1e-3", "--image-size", str(profile.seg_image_size),
        f"model.unetr.feature_size={profile.seg_feature_size}", f"evaluation.overlap={profile.seg_overlap}",
        "evaluation.sw_batch_size=4", "--device", "cpu", "train.log_period_iterations=10",
    ]
    seg_runs = {"pretrained": teacher, "random init": "none"}
    seg_dirs = {}
    for i, (name, weights) in enumerate(seg_runs.items()):
        seg_dirs[name] = out / "segmentation" / name.replace(" ", "_")
        extra = [] if weights != "none" else random_init_backbone_flags(teacher)
        run_step(f"4/6  UNETR brain-tissue segmentation, {name} backbone ({i + 1}/2)",
                 "dinov2.eval.segmentation",
                 ["--pretrained-weights", str(weights), "--output-dir", str(seg_dirs[name]), *seg_common, *extra])

    test_image = json.loads(seg_list.read_text())["test"][0]["image"]
    test_image = str((seg_list.parent / test_image).resolve())
    vis_dirs = {}
    for vis in ("pca", "mhsa"):
        vis_dirs[vis] = out / "visualisation" / vis
        run_step(f"5/6  {'PCA of patch features' if vis == 'pca' else 'Last-block attention per head'}",
                 "dinov2.eval.visualisation", [
                     "--pretrained-weights", str(teacher), "--image-path", test_image,
                     "--output-dir", str(vis_dirs[vis]), "--vis-type", vis, "--input-type", "full_image",
                 ])

    banner("6/6  Results")
    print(summarise(out, teacher, learning, evidence_dir, seg_dirs, vis_dirs, args.quick,
                    time.perf_counter() - start))
    return 0


def random_init_backbone_flags(teacher: Path) -> list[str]:
    """Flags that build the teacher's architecture with random weights (the baseline backbone)."""
    from dinov2.checkpoints.layouts import read_checkpoint
    from dinov2.models.build import backbone_kwargs_from_config

    arch, kwargs = backbone_kwargs_from_config(read_checkpoint(teacher).config)
    kwargs.pop("img_size", None)  # segmentation finetuning sets the input size itself

    def text(value) -> str:  # as a key=value override reads it back
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    return [f"model.arch={arch}", *(f"model.backbone_kwargs.{k}={text(v)}" for k, v in kwargs.items())]


def show_learning(pretrain_dir: Path) -> dict:
    """Print the losses against their uniform lines, write the SVG plot; return the final ratios."""
    from dinov2.train.curves import learning_svg, learning_table, ratio_series, read_metrics

    records = read_metrics(pretrain_dir)
    print("\nDid pretraining learn? Each loss against the value of a uniform (collapsed) prediction:")
    print(learning_table(records))
    svg = pretrain_dir / "learning_curves.svg"
    svg.write_text(learning_svg(records, title="small_cpu pretraining: losses / their uniform lines"))
    print(f"plot: {svg}")
    tail = {label: [v for _, v in points[-max(1, len(points) // 10):]] for label, points in ratio_series(records).items()}
    return {"svg": svg, "final": {label: sum(v) / len(v) for label, v in tail.items()}}


def summarise(out: Path, teacher: Path, learning: dict, evidence_dir: Path, seg_dirs: dict[str, Path],
              vis_dirs: dict[str, Path], quick: bool, elapsed: float) -> str:
    """A plain-text report of the metrics, of what they show (or cannot show), and of where everything is."""
    lines = ["Pretraining (last 10 % of logging periods; 1.00 = uniform, i.e. collapsed)"]
    lines += [f"  {label:<24} {value:.3f}" for label, value in learning["final"].items()]
    evidence = json.loads((evidence_dir / "evidence.json").read_text())
    lines += ["", "Evidence (balanced accuracy on the held-out template's test hemisphere)"]
    for name, task in evidence["tasks"].items():
        margins = task["margins"]
        lines.append(f"  {name:<12} teacher {fmt(task['teacher']['mean'])}  random init {fmt(task['random_init']['mean'])}"
                     f" (std {fmt(task['random_init']['std'])})  raw {fmt(task['raw']['test_balanced_accuracy'])}  "
                     f"-> teacher - random {fmt(margins['teacher_minus_random'], '+.3f')}, "
                     f"teacher - raw {fmt(margins['teacher_minus_raw'], '+.3f')}")
    if quick:
        lines.append("  (--quick pretrains for a few iterations only: these numbers check the pipeline and show no "
                     "learning; run the demo without --quick)")
    else:
        lines.append("  (one pretraining seed at the demo's cut of the schedule; docs/experiments/small_scale_recipe.md "
                     "has the full schedule over several seeds)")
    lines += ["", "Brain-tissue segmentation (UNETR, test cases; Dice higher is better, HD95 in mm lower is better)", ""]
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
    lines.append("  (a short finetuning on 5 training cases derived from one subject: a pipeline check, not a "
                 "benchmark; the evidence above is the test of the features)")
    lines += ["", "What the pictures show:",
              "  pca maps:  the first 3 principal components of the teacher's patch tokens, fitted on the brain's "
              "(foreground) tokens only, shown as RGB over axial / coronal / sagittal slices; tokens of the same "
              "colour have similar features. At the demo's scale (16 mm tokens, about 8 x 10 x 8 of them over the "
              "brain) the map is coarse and shows no parcellation you could read off: the evidence table above, "
              "not this picture, is what shows that the features learned",
              "  mhsa maps: how much the CLS token attends to each patch in the last block, one panel per head",
              "", "Where everything is:",
              f"  pretraining run       {teacher.parents[2]}  (training_metrics.json, log.txt, learning_curves.svg)",
              f"  teacher checkpoint    {teacher}",
              f"  evidence              {evidence_dir}  (evidence.json, evidence.md)"]
    for name, d in seg_dirs.items():
        lines.append(f"  segmentation ({name}) {d}  (results.json, best_model.pth)")
    for vis, d in vis_dirs.items():
        pngs = sorted(d.rglob("*.png"))
        lines.append(f"  {vis + ' maps':<21} {d}  ({len(list(d.rglob('*.nii*')))} NIfTI, "
                     f"{len(pngs)} PNG{': ' + pngs[0].name if pngs else ''})")
    lines += ["", "Predict on your own volume with the best segmentation model:",
              f"  python -m dinov2.eval.segmentation.predict --checkpoint {seg_dirs['pretrained']}/best_model.pth "
              f"--input YOUR.nii.gz --output predictions/",
              "", f"demo finished in {elapsed / 60:.1f} min; outputs under {out}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
