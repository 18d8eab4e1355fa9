"""What the patch task allows: a small 3D CNN trained with labels on the training hemisphere's cubes.

A diagnostic for the pooled-probe criterion of issue #12 (small_scale_recipe.md, session 7): the
same 32 mm cubes, training split and test split as the evidence's patch task, but a supervised
network instead of a frozen backbone and a linear probe. It chooses nothing; the test score is
printed every 5 epochs to show where it levels off (two seeds, about 3 minutes each on one thread).

    python docs/experiments/small_scale_recipe/supervised_ceiling.py
"""

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.eval.evidence.patch_task import build_patch_task
from dinov2.eval.evidence.probe import balanced_accuracy, class_weights
from dinov2.eval.evidence.volumes import load_evidence_volumes


def small_cnn() -> nn.Module:
    """``(N, 1, 16, 16, 16)`` -> ``(N, 5)`` lobe logits: three conv blocks, 512 pooled features."""
    return nn.Sequential(nn.Conv3d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
                         nn.Conv3d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
                         nn.Conv3d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(2), nn.Flatten(),
                         nn.Dropout(0.3), nn.Linear(512, 5))


@torch.no_grad()
def predict(net: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``(N,)`` predicted lobes of ``(N, 1, S, S, S)`` cubes."""
    net.eval()
    return torch.cat([net(inputs[i:i + 256]).argmax(1) for i in range(0, len(inputs), 256)])


def main() -> None:
    torch.set_num_threads(1)
    task = build_patch_task(load_evidence_volumes(), patch_size=16)
    train, test = task.splits["training"], task.splits["test"]
    weights = class_weights(train.labels, 5).float()
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = small_cnn()
        optimizer = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-2)
        for epoch in range(1, 41):
            net.train()
            order = torch.randperm(len(train.labels))
            for start in range(0, len(order), 64):
                batch = order[start:start + 64]
                loss = F.cross_entropy(net(train.inputs[batch]), train.labels[batch], weight=weights)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if epoch % 5 == 0:
                print(f"seed {seed} epoch {epoch}: training {balanced_accuracy(predict(net, train.inputs), train.labels):.3f}"
                      f"  test {balanced_accuracy(predict(net, test.inputs), test.labels):.3f}", flush=True)


if __name__ == "__main__":
    main()
