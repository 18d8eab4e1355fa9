"""Which part of the pooled readout carries a teacher's gain: CLS, mean patch token, or both, per block.

A diagnostic (small_scale_recipe.md, session 7): the evidence's patch task, probes at the fixed
penalties l2 = 1e-3 and 1e-2 (the better test score of the two is printed, for teachers and
random inits alike), on each single block and on all four blocks of a ``vit_tiny_3d``.

    python docs/experiments/small_scale_recipe/readout_parts.py T1.pth T2.pth ...   # + 3 random inits
"""

import sys

import torch

from penalty_sweep import patch_task_and_networks  # this folder's sweep: same task, same random inits

from dinov2.eval.evidence.features import network_features
from dinov2.eval.evidence.probe import balanced_accuracy, fit_probe
from dinov2.eval.evidence.tasks import NUM_CLASSES, SPLITS

PARTS = ("cls", "mean", "both")
BLOCK_SETS = ([0], [1], [2], [3], [0, 1, 2, 3])


def columns(block: int, part: str, width: int) -> list[int]:
    """Feature columns of one part of one block (features are ``[cls, mean]`` per block, ``width`` each)."""
    base = block * 2 * width
    return {"cls": list(range(base, base + width)), "mean": list(range(base + width, base + 2 * width)),
            "both": list(range(base, base + 2 * width))}[part]


def scores(model: torch.nn.Module, task, width: int) -> list[float]:
    """Test balanced accuracy for every part x block set (``PARTS`` outer, ``BLOCK_SETS`` inner)."""
    model.eval()
    features = {s: network_features(model, task.splits[s], 64, torch.device("cpu"), 4) for s in SPLITS}
    train, test = task.splits["training"], task.splits["test"]
    out = []
    for part in PARTS:
        for blocks in BLOCK_SETS:
            cols = sum((columns(b, part, width) for b in blocks), [])
            out.append(max(balanced_accuracy(fit_probe(features["training"][:, cols], train.labels, NUM_CLASSES, l2)
                                             .predict(features["test"][:, cols]), test.labels) for l2 in (1e-3, 1e-2)))
    return out


def main(paths: list[str]) -> None:
    task, models = patch_task_and_networks(paths)
    print("columns: block 1, 2, 3, 4, all four; for CLS | mean patch | both")
    for name, model in models:
        s = scores(model, task, model.embed_dim)
        print(name, " | ".join(" ".join(f"{v:.3f}" for v in s[i:i + 5]) for i in (0, 5, 10)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
