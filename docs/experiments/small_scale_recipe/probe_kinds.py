"""Does the pooled margin depend on the kind of probe? Linear vs k-NN vs a small MLP, same features.

A diagnostic (small_scale_recipe.md, session 8), not part of the evidence protocol: the evidence's
patch task (32 mm cubes → lobe), read from the last block's CLS token and from CLS ⊕ mean patch
token of all four blocks of a ``vit_tiny_3d``, for the given teachers and 3 random inits:

* ``linear``: the evidence's L2 logistic regression at l2 = 1e-3 (standardised features);
* ``knn``: DINO's weighted k-NN (k = 20, temperature 0.07, cosine on L2-normalised features);
* ``knn std``: the same on features standardised with the training split's mean and std;
* ``mlp``: one hidden layer of 256 (dropout 0.2, AdamW, 300 full-batch epochs, 2 seeds averaged).

    python docs/experiments/small_scale_recipe/probe_kinds.py T1.pth T2.pth ...   # + 3 random inits
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn

from penalty_sweep import patch_task_and_networks  # this folder's sweep: same task, same random inits

from dinov2.eval.evidence.features import last_blocks, network_features
from dinov2.eval.evidence.probe import balanced_accuracy, class_weights, fit_probe
from dinov2.eval.evidence.tasks import NUM_CLASSES, SPLITS


def standardised(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, D)``, ``(M, D)`` → both scaled by the training rows' mean and standard deviation."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    return (train - mean) / std, (test - mean) / std


def knn_predict(train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor, k: int = 20,
                temperature: float = 0.07) -> torch.Tensor:
    """DINO's k-NN vote: ``(N, D)`` train, ``(N,)`` labels, ``(M, D)`` test → ``(M,)`` classes."""
    similarity = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T
    top, index = similarity.topk(k, dim=1)
    votes = torch.zeros(test.shape[0], NUM_CLASSES).scatter_add_(1, labels[index], (top / temperature).exp())
    return votes.argmax(1)


def mlp_predict(train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor, seed: int) -> torch.Tensor:
    """A one-hidden-layer probe on standardised features, class-weighted: ``(M,)`` classes."""
    torch.manual_seed(seed)
    train, test = standardised(train, test)
    net = nn.Sequential(nn.Dropout(0.2), nn.Linear(train.shape[1], 256), nn.GELU(), nn.Dropout(0.2),
                        nn.Linear(256, NUM_CLASSES))
    optimizer = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=0.05)
    loss = nn.CrossEntropyLoss(weight=class_weights(labels, NUM_CLASSES).float())
    for _ in range(300):
        optimizer.zero_grad()
        loss(net(train), labels).backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        return net(test).argmax(1)


def scores(model: nn.Module, task) -> dict[str, float]:
    """Test balanced accuracy of each probe kind on the two readouts."""
    model.eval()
    features = {s: network_features(model, task.splits[s], 64, torch.device("cpu"), 4) for s in SPLITS}
    labels, truth = task.splits["training"].labels, task.splits["test"].labels
    width = model.embed_dim
    cls_train, cls_test = (last_blocks(features[s], 4, 1)[:, :width] for s in SPLITS)
    train, test = features["training"], features["test"]
    std_train, std_test = standardised(train, test)
    score = lambda predicted: balanced_accuracy(predicted, truth)  # noqa: E731
    return {
        "knn, last CLS": score(knn_predict(cls_train, labels, cls_test)),
        "linear, 4 blocks": score(fit_probe(train, labels, NUM_CLASSES, 1e-3).predict(test)),
        "knn, 4 blocks": score(knn_predict(train, labels, test)),
        "knn std, 4 blocks": score(knn_predict(std_train, labels, std_test)),
        "mlp, 4 blocks": sum(score(mlp_predict(train, labels, test, seed)) for seed in (0, 1)) / 2,
    }


def main(paths: list[str]) -> None:
    task, models = patch_task_and_networks(paths)
    for name, model in models:
        print(name, "  ".join(f"{kind} {value:.3f}" for kind, value in scores(model, task).items()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
