"""The demo: the whole main job, end to end, on real brain volumes shipped inside PyPI packages.

1. datalists from the embedded volumes (a pretraining list WITHOUT the FSL MNI152 templates that
   the evidence and the segmentation are evaluated on, and the brain-tissue segmentation set);
2. DINO + iBOT + KoLeo pretraining of a tiny 3D ViT with the small recipe that learns
   (``configs/small_cpu.yaml``), then its losses against their uniform (collapsed) lines;
3. the evidence: frozen teacher features against random-init backbones (3 seeds) and raw
   intensities, linear probes on a held-out template (``python -m dinov2.eval.evidence``);
4. the comparison (``python -m dinov2.eval.compare``) of the pretrained teacher with a random-init
   backbone of the same architecture: UNETR finetuning on brain-tissue segmentation (one seed;
   Dice, NSD and HD95 on the test cases) and linear probes of brain lobes (several seeds), one
   table with mean ± std over seeds and paired bootstrap intervals;
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
    probe_stride: int             # brain-lobe patch spacing in voxels: 4 gives ~1450 test patches, 8 ~200
    probe_seeds: int              # seeds of the comparison's probe (segmentation runs one: the costly task)


PROFILES = {
    "full": Profile(pretrain_iterations=PRETRAIN_CUT, seg_image_size=40, seg_feature_size=16, seg_overlap=0.5,
                    seg_epochs=6, seg_epoch_length=25, seg_eval_iters=75, evidence_seeds=3,
                    probe_stride=4, probe_seeds=3),
    "quick": Profile(pretrain_iterations=20, seg_image_size=32, seg_feature_size=8, seg_overlap=0.25,
                     seg_epochs=1, seg_epoch_length=10, seg_eval_iters=10, evidence_seeds=1,
                     probe_stride=8, probe_seeds=2),
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
    logging.getLogger("dinov2.eval.compare").setLevel(logging.INFO)  # the comparison's line per run, with ETA
    start = time.perf_counter()

    banner("1/6  Datalists from the real brain volumes shipped in the sample-data packages")
    from dinov2.sample_data import write_pretraining_datalist, write_segmentation_dataset
    from dinov2.sample_data.classification import PatchTaskParams, write_classification_dataset

    # The FSL MNI152 templates are what the evidence and the segmentation are evaluated on:
    # pretraining never sees them (nor 4D series), so the comparison below is on unseen data.
    pretrain_list = write_pretraining_datalist(out / "data" / "pretrain_datalist.json", hold_out_evaluation=True)
    n_volumes = len(json.loads(pretrain_list.read_text()))
    seg_list = write_segmentation_dataset(out / "data" / "brain_tissue", labels="tissue")
    lobe_list = write_classification_dataset(out / "data" / "brain_lobes", PatchTaskParams(stride=profile.probe_stride))
    print(f"pretraining datalist: {pretrain_list} ({n_volumes} volumes; FSL MNI152 templates held out)")
    print(f"segmentation set:     {seg_list}")
    print(f"brain-lobe patches:   {lobe_list}")

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

    compare_dir = out / "comparison"
    run_step("4/6  Comparison: pretrained teacher vs random init (UNETR segmentation, brain-lobe probe)",
             "dinov2.eval.compare", comparison_argv(profile, teacher, compare_dir, seg_list, lobe_list))
    seg_dirs = comparison_seg_dirs(compare_dir, teacher)

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
    print(summarise(out, teacher, learning, evidence_dir, seg_dirs, compare_dir, vis_dirs, args.quick,
                    time.perf_counter() - start))
    return 0


SEG_TASK = "seg:brain_tissue:UNETR"


def comparison_argv(profile: Profile, teacher: Path, compare_dir: Path, seg_list: Path, lobe_list: Path) -> list[str]:
    """The comparison's command line: the teacher vs random init of its architecture (read from the
    teacher), one segmentation seed (the costly task) and ``probe_seeds`` probe seeds."""
    seg_args = [
        "--epochs", str(profile.seg_epochs), "--epoch-length", str(profile.seg_epoch_length),
        "--eval-period-iterations", str(profile.seg_eval_iters),
        "--warmup-iters", str(max(1, profile.seg_epoch_length // 2)), "--batch-size", "1",
        "--num-workers", "0", "--learning-rate", "1e-3", "--image-size", str(profile.seg_image_size),
        f"model.unetr.feature_size={profile.seg_feature_size}", f"evaluation.overlap={profile.seg_overlap}",
        "evaluation.sw_batch_size=4", "--device", "cpu", "train.log_period_iterations=10",
    ]
    return ["--output-dir", str(compare_dir), "--backbones", f"pretrained={teacher}", "random",
            "--tasks", SEG_TASK, "probe:brain_lobes",
            "--data-dir", f"brain_tissue={seg_list.parent}", f"brain_lobes={lobe_list.parent}",
            "--seeds", str(profile.probe_seeds), "seg:1", "--reference", "random",
            "--task-args", "seg:" + shlex.join(seg_args), "probe:--device cpu"]


def comparison_seg_dirs(compare_dir: Path, teacher: Path) -> dict[str, Path]:
    """The comparison's segmentation run folders (seed 0, whole training set), by backbone label."""
    from dinov2.eval.compare.plan import run_folder
    from dinov2.eval.compare.spec import Backbone, parse_task

    task = parse_task(SEG_TASK)
    return {"pretrained": run_folder(compare_dir, task, Backbone("pretrained", str(teacher)), 100, 0),
            "random init": run_folder(compare_dir, task, Backbone("random", "none"), 100, 0)}


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


def segmentation_table(results: dict[str, dict]) -> list[str]:
    """Lines of the test-set table: Dice per class, then the foreground means and the missed classes.

    Args:
        results: ``{backbone label: results.json}`` of the segmentation runs.
    """
    lines, classes = [], None
    for name, res in results.items():
        summary = (res.get("test") or {}).get("summary") or {}
        if classes is None:
            classes = list(summary.get("dice", {}))
            lines.append(f"  {'backbone':<12} " + " ".join(f"{c[:12]:>12}" for c in classes)
                         + f" {'mean fg Dice':>13} {'mean fg NSD':>12} {'mean fg HD95':>13} {'missed':>7}")
        foreground = set(res.get("foreground_channels", []))
        missed = sum((summary.get("missed") or {}).get(c, 0) for k, c in enumerate(classes) if k in foreground)
        lines.append(f"  {name:<12} " + " ".join(f"{fmt(summary.get('dice', {}).get(c)):>12}" for c in classes)
                     + f" {fmt(summary.get('mean_dice')):>13} {fmt(summary.get('mean_nsd')):>12}"
                     f" {fmt(summary.get('mean_hd95'), '.2f'):>13} {missed:>7}")
    # How absent classes are counted (dinov2/eval/segmentation/metrics.py), so the means can be read right.
    lines += ["  (means over test cases, then over foreground classes. A class absent from both a case's reference "
              "and its prediction is left out (n/a: never present);",
              "   a missed class counts Dice 0 and NSD 0 and has no HD95 ('missed' counts those case-class pairs); "
              "a class predicted where the reference has none counts Dice 0.",
              "   NSD at dataset.nsd_tolerance_mm; every case and class in summary.json beside results.json)"]
    return lines


def comparison_lines(compare_dir: Path, quick: bool) -> list[str]:
    """The comparison's tables (from comparison.md, without its reading notes) and what they can and cannot say."""
    text = (compare_dir / "comparison.md").read_text(encoding="utf-8")
    tables = text[text.index("## "):text.index("## How to read")].strip().splitlines()
    lines = ["", "Comparison: pretrained teacher vs random init of the same ViT (python -m dinov2.eval.compare; "
             "mean ± std over seeds, bold = best, paired difference vs random with a bootstrap 95 % interval)", ""]
    lines += [f"  {line}" if line else "" for line in tables]
    if quick:
        lines.append("  (--quick: a few pretraining iterations and a very short finetuning. These rows only show that "
                     "the comparison runs end to end; any difference between them is noise, whatever the verdict "
                     "column says)")
    else:
        lines.append(f"  (demo scale, not a benchmark: one tiny ViT pretrained once for {PRETRAIN_CUT} iterations on a "
                     "few dozen volumes; segmentation finetuned once and scored on 2 test cases, too few for any "
                     "verdict; the probe's test entries are overlapping patches of the same held-out templates, not "
                     "independent subjects, so its interval is narrower than it would be over patients. The interval "
                     "covers the choice of test cases, not the pretraining seed, which the demo does not vary. Read a "
                     "'better' as 'this teacher's features carry more lobe information than random ones here', not "
                     "as a claim about the method)")
    return lines + [f"  (reading notes, CSV and PNG plots in {compare_dir})"]


def summarise(out: Path, teacher: Path, learning: dict, evidence_dir: Path, seg_dirs: dict[str, Path],
              compare_dir: Path, vis_dirs: dict[str, Path], quick: bool, elapsed: float) -> str:
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
    lines += ["", "Brain-tissue segmentation (UNETR, test cases; Dice and NSD higher is better, HD95 in mm lower "
              "is better)", ""]
    results = {name: json.loads((d / "results.json").read_text()) for name, d in seg_dirs.items()}
    lines += segmentation_table(results)
    lines.append("  (a short finetuning on 5 training cases derived from one subject: a pipeline check, not a "
                 "benchmark; the evidence above is the test of the features)")
    lines += comparison_lines(compare_dir, quick)
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
              f"  evidence              {evidence_dir}  (evidence.json, evidence.md)",
              f"  comparison            {compare_dir}  (comparison.md, comparison.csv, plots/, runs/)"]
    for name, d in seg_dirs.items():
        lines.append(f"  segmentation ({name}) {d}  (results.json, summary.json, best_model.pth)")
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
