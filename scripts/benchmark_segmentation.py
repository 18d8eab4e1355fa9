"""Sliding-window segmentation speed: our UNETR (ViT-B backbone) against MONAI's ``UNETR``.

Both networks segment the same real volume (the 1 mm MNI152 T1 shipped by nilearn, centre-cropped
or padded to ``--volume``) with the same window (``--roi``) and Gaussian blending, in one process,
one after the other. Reported: seconds, voxels per second, the speed-up over MONAI, and for each
of our faster settings its agreement with our own fp32 result at the reference overlap (fraction
of voxels with the same label, and the largest probability difference): what a setting costs in
accuracy. Weights are random (seeded): speed does not depend on them, and agreement measures
numerical/blending differences only.

With random weights the label agreement is a harsh measure (near-uniform probabilities flip their
argmax easily). ``--accuracy-checkpoint`` adds what matters: the test Dice of a *finetuned*
checkpoint (e.g. on the embedded brain-tissue set) at the reference and at the fast overlap.

Process memory: MONAI's row runs first with glibc's default allocator, as a MONAI user runs it;
then the toolkit's allocator tuning is switched on (``dinov2.utils.allocator``; every entry point
of the toolkit does this), and MONAI runs again under it ("MONAI + tuned allocator") so the table
separates what the allocator gives from what the rest of our settings give. ``--no-tuning``
keeps glibc's defaults for every row.

Settings of ours (``--variants``):
    ref        fp32, reference overlap, ``--sw-batch-size`` windows per forward pass
    cl         + channels-last-3d memory format for the convolutions
    bf16       + bf16 autocast (pays off only with AMX / AVX512-BF16 or on a GPU)
    fewer      fp32 with ``--fast-overlap`` (fewer windows; Gaussian blending hides the seams);
               its default 0.25 is also the default overlap of MONAI's ``sliding_window_inference``

MONAI's ``UNETR`` imports ``einops`` (not a toolkit dependency): install it to run the
comparison (``pip install einops``) or pass ``--skip-monai``.

Measure only on a quiet machine (``uptime`` load below 1); the load is printed with the results.

Usage::

    python scripts/benchmark_segmentation.py                     # 160x192x160, roi 96, overlap 0.5
    python scripts/benchmark_segmentation.py --volume 96 96 96 --variants ref,fewer
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dinov2.benchmarking.perf import machine_description
from dinov2.eval.segmentation.inference import predict_probabilities
from dinov2.eval.segmentation.model import build_segmentation_model
from dinov2.models import build_model
from dinov2.sample_data import package_dir
from dinov2.utils.allocator import tune_cpu_allocator
from dinov2.utils.precision import autocast_context, native_bf16_support

VARIANTS = ("ref", "cl", "bf16", "fewer")
MNI_T1 = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def load_volume(shape: Sequence[int]) -> torch.Tensor:
    """The nilearn MNI152 1 mm T1, scaled to [0, 1], centre-cropped / zero-padded to ``shape`` → ``(1, 1, *shape)``."""
    import nibabel as nib

    root = package_dir("nilearn")
    if root is None or not (root / MNI_T1).is_file():
        raise FileNotFoundError(f"nilearn's {MNI_T1} not found: pip install --no-deps -r requirements-data.txt")
    data = np.asarray(nib.load(root / MNI_T1).dataobj, dtype=np.float32)
    data = (data - data.min()) / max(float(data.max() - data.min()), 1e-6)
    out = np.zeros(shape, dtype=np.float32)
    src, dst = [], []
    for n_in, n_out in zip(data.shape, shape):
        take = min(n_in, n_out)
        a, b = (n_in - take) // 2, (n_out - take) // 2
        src.append(slice(a, a + take))
        dst.append(slice(b, b + take))
    out[tuple(dst)] = data[tuple(src)]
    return torch.from_numpy(out)[None, None]


class ChannelsLast(torch.nn.Module):
    """Runs the wrapped model on a channels-last-3d copy of its input (oneDNN's preferred layout)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last_3d)

    def forward(self, x):
        return self.model(x.contiguous(memory_format=torch.channels_last_3d))


def count_windows(volume: Sequence[int], roi: int, overlap: float) -> int:
    """Windows MONAI's sliding window places (per axis: ceil((n - roi) / step) + 1, step = roi * (1 - overlap))."""
    step = max(int(roi * (1 - overlap)), 1)
    return math.prod(max(math.ceil((n - roi) / step), 0) + 1 for n in volume)


def warm_up(model: torch.nn.Module, roi: int) -> None:
    """One untimed window, so no timed row pays one-off costs (oneDNN kernel creation, first allocations)."""
    with torch.no_grad():
        model(torch.zeros(1, 1, roi, roi, roi))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def accuracy_by_overlap(checkpoint: str, datalist: str | None, overlaps: Sequence[float]) -> dict:
    """Mean foreground test Dice of a finetuned checkpoint at each overlap (Gaussian blending)."""
    from dinov2.checkpoints.finetuned import load_finetuned
    from dinov2.data.datalist import load_finetune_datalist
    from dinov2.eval.segmentation.data import eval_transforms
    from dinov2.eval.segmentation.metrics import discretize, label_to_masks

    if not datalist:
        raise SystemExit("--accuracy-checkpoint needs --accuracy-datalist (the datalist with labelled test cases)")
    model, preset, info = load_finetuned(checkpoint)
    cases = [e for e in load_finetune_datalist(datalist, progress=False)["test"] if "label" in e]
    transform = eval_transforms(preset)
    out = {}
    for overlap in overlaps:
        dices = []
        for entry in cases:
            item = transform({"image": entry["image"], "label": entry["label"]})
            probs = predict_probabilities(model, item["image"][None], preset.roi_size, preset.multilabel, overlap=overlap)
            pred = discretize(probs, preset.multilabel)
            target = label_to_masks(torch.as_tensor(item["label"])[None], preset.out_channels, preset.multilabel)
            inter = (pred * target).flatten(2).sum(-1)[0]
            sums = pred.flatten(2).sum(-1)[0] + target.flatten(2).sum(-1)[0]
            fg = preset.foreground_channels
            dices.append(float((2 * inter[fg] / sums[fg].clamp_min(1)).mean()))
        out[str(overlap)] = float(np.mean(dices))
    print(f"\naccuracy of {checkpoint} ({preset.name}, {info['head']}): mean foreground test Dice by overlap: "
          + ", ".join(f"{k}: {v:.4f}" for k, v in out.items()))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; prints a Markdown table and (``--json``) writes the figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--volume", type=int, nargs=3, default=[160, 192, 160])
    p.add_argument("--roi", type=int, default=96)
    p.add_argument("--overlap", type=float, default=0.5, help="reference overlap (MONAI and our 'ref')")
    p.add_argument("--fast-overlap", type=float, default=0.25, help="overlap of the 'fewer' variant")
    p.add_argument("--sw-batch-size", type=int, default=4, help="windows per forward pass of ours")
    p.add_argument("--monai-sw-batch-size", type=int, default=1)
    p.add_argument("--out-channels", type=int, default=14)
    p.add_argument("--variants", default="ref,fewer", help=f"comma list of {VARIANTS}")
    p.add_argument("--skip-monai", action="store_true")
    p.add_argument("--no-tuning", action="store_true", help="keep glibc's default allocator for every row")
    p.add_argument("--skip-monai-tuned", action="store_true", help="do not re-run MONAI under the tuned allocator")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--accuracy-checkpoint", default=None, help="finetuned best_model.pth: report its test Dice per overlap")
    p.add_argument("--accuracy-datalist", default=None, help="datalist JSON whose labelled 'test' cases are scored")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variants {bad}; choose from {VARIANTS}")
    if "ref" not in variants:
        variants.insert(0, "ref")  # the accuracy reference

    torch.manual_seed(0)
    image = load_volume(args.volume)
    voxels = math.prod(args.volume)
    rows, results = [], {"machine": machine_description(), "volume": args.volume, "roi": args.roi,
                         "overlap": args.overlap, "rows": []}
    print(f"machine: {results['machine']}")
    print(f"volume {args.volume}, window {args.roi}^3, overlap {args.overlap}: "
          f"{count_windows(args.volume, args.roi, args.overlap)} windows")

    monai_seconds = None
    monai_net = None
    if not args.skip_monai:
        try:
            from monai.networks.nets import UNETR
            monai_net = UNETR(1, args.out_channels, args.roi, feature_size=16, hidden_size=768, mlp_dim=3072,
                              num_heads=12, norm_name="instance", res_block=True, conv_block=True).eval()
        except Exception as exc:  # noqa: BLE001 - optional comparison, say why it is missing
            raise SystemExit(f"MONAI UNETR unavailable ({exc}); pip install einops, or pass --skip-monai") from exc

        def run_monai():
            return predict_probabilities(monai_net, image, [args.roi] * 3, False, overlap=args.overlap,
                                         sw_batch_size=args.monai_sw_batch_size)

        warm_up(monai_net, args.roi)
        _, monai_seconds = timed(run_monai)
        rows.append(("MONAI UNETR fp32 (glibc default allocator)", args.overlap, args.monai_sw_batch_size,
                     monai_seconds, None, None))
    # From here on the process runs as the toolkit's entry points run it.
    tuned = False if args.no_tuning else tune_cpu_allocator(True)
    if monai_net is not None and tuned and not args.skip_monai_tuned:
        _, seconds = timed(run_monai)
        rows.append(("MONAI UNETR fp32 + tuned allocator", args.overlap, args.monai_sw_batch_size, seconds,
                     None, None))
    del monai_net

    backbone = build_model("vit_base_3d", patch_size=16, img_size=args.roi)
    ours = build_segmentation_model(backbone, "UNETR", 1, args.out_channels, {"feature_size": 16}).eval()
    warm_up(ours, args.roi)
    reference = None
    for variant in variants:
        model, overlap, autocast = ours, args.overlap, None
        if variant == "cl":
            model = ChannelsLast(ours)
        elif variant == "bf16":
            autocast = autocast_context("bf16", "cpu")
        elif variant == "fewer":
            overlap = args.fast_overlap
        probs, seconds = timed(lambda: predict_probabilities(model, image, [args.roi] * 3, False, overlap=overlap,
                                                             sw_batch_size=args.sw_batch_size, autocast=autocast))
        if variant == "cl":
            ours = ours.to(memory_format=torch.contiguous_format)
        if reference is None:
            reference, agree, maxdiff = probs, 1.0, 0.0
        else:
            agree = float((probs.argmax(1) == reference.argmax(1)).float().mean())
            maxdiff = float((probs - reference).abs().max())
        name = f"ours UNETR ViT-B {variant}{' (tuned allocator)' if tuned else ''}"
        rows.append((name, overlap, args.sw_batch_size, seconds, agree, maxdiff))

    print("\n| setting | overlap | windows | sw batch | seconds | voxels/s | vs MONAI | label agreement vs ours ref | max prob diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, overlap, swb, seconds, agree, maxdiff in rows:
        speedup = f"{monai_seconds / seconds:.2f}x" if monai_seconds else "-"
        print(f"| {name} | {overlap} | {count_windows(args.volume, args.roi, overlap)} | {swb} | {seconds:.1f} | "
              f"{voxels / seconds:,.0f} | {speedup} | {'-' if agree is None else f'{agree:.4%}'} | "
              f"{'-' if maxdiff is None else f'{maxdiff:.2e}'} |")
        results["rows"].append({"setting": name, "overlap": overlap, "sw_batch_size": swb, "seconds": seconds,
                                "voxels_per_second": voxels / seconds,
                                "speedup_vs_monai": monai_seconds / seconds if monai_seconds else None,
                                "label_agreement": agree, "max_prob_diff": maxdiff})
    if args.accuracy_checkpoint:
        results["accuracy"] = accuracy_by_overlap(args.accuracy_checkpoint, args.accuracy_datalist,
                                                  [args.overlap, args.fast_overlap])
    print(f"\nnative bf16 on this CPU: {native_bf16_support('cpu')}; load average now: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
