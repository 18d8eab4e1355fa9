"""FSDP on one GPU: an NCCL process group of one, the networks sharded as ``compute_precision.strategy: fsdp``
shards them, trains like the plain model.

``prepare_distributed`` leaves one process unsharded, so the test shards directly
(``shard_with_fsdp``): the same ``fully_shard`` calls, NCCL collectives and mixed-precision
policy as a multi-GPU run, fused AdamW on sharded (DTensor) parameters, the EMA update on local
shards and the unsharded state dict of a checkpoint. fp32 must match the plain model to float
rounding, losses and weights; bf16 (FSDP casts the gathered parameters to bf16, the plain model
only autocasts) must give the same losses within bf16's tolerance.
"""

from __future__ import annotations

import socket

import pytest
import torch

pytestmark = pytest.mark.cuda

LOSSES = ("total_loss", "dino_loss", "ibot_loss", "koleo_loss")
LR = 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def nccl_group_of_one(monkeypatch):
    """The process group torchrun --nproc_per_node 1 would give: NCCL, world size 1."""
    from dinov2 import distributed

    for key in distributed.TORCHRUN_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    ctx = distributed.init_distributed("cuda")
    assert (ctx.backend, ctx.world_size, ctx.device.type) == ("nccl", 1, "cuda")
    yield ctx
    distributed.shutdown_distributed()


def _train(arch, batches: list[dict]) -> list[dict[str, float]]:
    """Three optimisation steps of ``arch`` (an ``SSLMetaArch``); the losses of each."""
    from dinov2.optim.param_groups import apply_optim_scheduler

    optimizer = arch.build_optimizer()
    losses = []
    for batch in batches:
        apply_optim_scheduler(optimizer, lr=LR, wd=0.04, last_layer_lr=LR)
        out = arch.forward_backward(batch, teacher_temp=0.05)
        arch.optimizer_step(optimizer)
        arch.update_teacher(0.9)
        losses.append({k: float(out[k]) for k in LOSSES})
    return losses


@pytest.mark.parametrize("precision, loss_rtol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_fsdp_on_one_gpu_trains_like_the_plain_model(nccl_group_of_one, tiny_cfg, make_batch, precision, loss_rtol):
    from torch.distributed.tensor import DTensor

    from dinov2.train.ssl_meta_arch import SSLMetaArch

    # No stochastic depth: the two models would draw different subsets from the one generator. No
    # LayerScale: with the tiny config's 1e-5 every CLS token is nearly the same, and KoLeo (the log
    # of their distances) would turn bf16's rounding into large differences.
    cfg = tiny_cfg(f"compute_precision.dtype={precision}", "compute_precision.strategy=fsdp",
                   "student.drop_path_rate=0.0", "student.layerscale=null")
    batches = [make_batch(cfg, batch_size=4, seed=i) for i in range(3)]
    torch.manual_seed(0)
    plain = SSLMetaArch(cfg, "cuda").train()
    initial = plain.full_state_dict()
    torch.manual_seed(0)
    sharded = SSLMetaArch(cfg, "cuda")
    sharded.shard_with_fsdp()
    sharded.train()
    assert sharded.is_sharded
    assert all(isinstance(p, DTensor) for p in sharded.student.parameters())

    expected, got = _train(plain, batches), _train(sharded, batches)
    for step, (e, g) in enumerate(zip(expected, got)):
        for key in LOSSES:
            assert g[key] == pytest.approx(e[key], rel=loss_rtol, abs=1e-6), (step, key)

    reference, state = plain.full_state_dict(), sharded.full_state_dict()
    assert state.keys() == reference.keys()
    assert all(state[k].shape == reference[k].shape for k in state)
    if precision == "fp32":
        moved = max((reference[k].float() - initial[k].float()).abs().max().item() for k in reference)
        assert moved > 1e-4  # training changed the weights far more than the tolerance below
        for key in reference:
            assert torch.allclose(state[key].float(), reference[key].float(), rtol=1e-5, atol=1e-6), key
