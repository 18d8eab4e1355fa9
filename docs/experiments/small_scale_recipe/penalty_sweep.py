"""Patch-task test balanced accuracy of every network at EACH penalty of the probe grid.

A diagnostic, not an evaluation protocol: it chooses nothing, it shows how much the evidence's
margins depend on the penalty its cross-validation picks (small_scale_recipe.md, session 6).

    python docs/experiments/small_scale_recipe/penalty_sweep.py T1.pth T2.pth ...   # + 3 random inits
"""

import sys

import torch

from dinov2.eval.evidence.backbones import load_teacher, random_backbone, same_architecture
from dinov2.eval.evidence.features import last_blocks, network_features
from dinov2.eval.evidence.patch_task import build_patch_task
from dinov2.eval.evidence.probe import L2_GRID, balanced_accuracy, fit_probe
from dinov2.eval.evidence.tasks import NUM_CLASSES, SPLITS
from dinov2.eval.evidence.volumes import load_evidence_volumes


def sweep(model: torch.nn.Module, task) -> list[float]:
    """Test balanced accuracy for (last 1 block, last 4 blocks) x every penalty of ``L2_GRID``."""
    model.eval()
    features = {s: network_features(model, task.splits[s], 64, torch.device("cpu"), 4) for s in SPLITS}
    train, test = task.splits["training"], task.splits["test"]
    scores = []
    for blocks in (1, 4):
        read = {s: last_blocks(f, 4, blocks) for s, f in features.items()}
        for l2 in L2_GRID:
            probe = fit_probe(read["training"], train.labels, NUM_CLASSES, l2)
            scores.append(balanced_accuracy(probe.predict(read["test"]), test.labels))
    return scores


def patch_task_and_networks(paths: list[str]) -> tuple:
    """The evidence's patch task (32 mm cubes) and ``[(name, backbone)]``: the teachers, then 3 random inits of their architecture."""
    torch.set_num_threads(1)
    task = build_patch_task(load_evidence_volumes(), patch_size=16)
    teachers = [load_teacher(p) for p in paths]
    spec = same_architecture(teachers)
    return task, [(p, t.model) for p, t in zip(paths, teachers)] + [(f"random init {s}", random_backbone(spec, s)) for s in range(3)]


def main(paths: list[str]) -> None:
    task, models = patch_task_and_networks(paths)
    print("l2 grid:", L2_GRID)
    for name, model in models:
        s = sweep(model, task)
        print(f"{name}\n  last 1: " + " ".join(f"{v:.3f}" for v in s[:5]) + "\n  last 4: " + " ".join(f"{v:.3f}" for v in s[5:]),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
