"""The pretraining loader's batches across processes: the same bits with 0, 1 and 2 workers, in the
crop dtype of the storage, one reused shared-memory block per batch, converted on the training side."""

from __future__ import annotations

import gc
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from dinov2.data import shared_batches
from dinov2.data.collate import CollateDataAndCast
from dinov2.data.loader import (PositionedCollate, PositionedDataset, PositionedSampler, batch_to_device,
                                build_train_loader)
from dinov2.data.samplers import InfiniteSampler

BATCH = 3
REPO = Path(__file__).resolve().parents[2]


class RandomCrops(Dataset):
    """Crops drawn from torch's global generator, which the loader seeds per stream position."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, index: int) -> dict:
        return {"global_crops": [torch.randn(1, 8, 8, 8) + index for _ in range(2)],
                "local_crops": [torch.randn(1, 4, 4, 4) for _ in range(3)]}


def _collate(dtype=torch.float32) -> CollateDataAndCast:
    return CollateDataAndCast((0.1, 0.5), 0.5, (2, 2, 2), dtype=dtype)


def _batches(workers: int, n: int, dtype=torch.float32, start: int = 0) -> list[dict]:
    loader = build_train_loader(RandomCrops(), _collate(dtype), batch_size=BATCH, run_seed=1, start_position=start,
                                rank=0, world_size=1, num_workers=workers)
    return list(itertools.islice(iter(loader), n))


def _assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.fixture(scope="module")
def in_process() -> list[dict]:
    return _batches(0, 5)


@pytest.fixture(autouse=True)
def _enough_cpus(monkeypatch):
    # build_train_loader caps the workers at the CPUs minus one; these tests need real workers.
    from dinov2.utils import cpus

    monkeypatch.setattr(cpus, "available_cpus", lambda: 8)


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_give_the_in_process_batches_bit_for_bit(in_process, workers):
    got = _batches(workers, len(in_process))
    for reference, batch in zip(in_process, got):
        _assert_same(reference, batch)
    assert [b["positions"].tolist() for b in got] == [list(range(k, k + BATCH)) for k in range(0, 15, BATCH)]


def test_float16_crops_are_the_float32_crops_rounded_whatever_the_workers(in_process):
    for workers in (0, 2):
        for reference, batch in zip(in_process, _batches(workers, len(in_process), torch.float16)):
            for key in ("collated_global_crops", "collated_local_crops"):
                assert batch[key].dtype == torch.float16
                assert torch.equal(batch[key], reference[key].to(torch.float16))
            assert torch.equal(batch["collated_masks"], reference["collated_masks"])


def test_resumed_loader_continues_with_the_same_batches(in_process):
    resumed = _batches(2, 2, start=3 * BATCH)  # as after 3 iterations
    for reference, batch in zip(in_process[3:], resumed):
        _assert_same(reference, batch)


def test_a_worker_batch_crosses_as_one_block():
    batch = _batches(1, 1)[0]
    storages = {v.untyped_storage().data_ptr() for v in batch.values() if isinstance(v, torch.Tensor)}
    assert len(storages) == 1


def _blocks_per_batch_loader(collate: PositionedCollate) -> DataLoader:
    """A loader whose worker also reports how many blocks its pool holds after each batch."""

    def collate_and_count(items):
        batch = collate(items)
        return batch, len(shared_batches._pool().blocks)

    sampler = PositionedSampler(InfiniteSampler(5, seed=1, rank=0, world_size=1, start=0))
    return DataLoader(PositionedDataset(RandomCrops(), 1), batch_size=BATCH, sampler=sampler, num_workers=1,
                      collate_fn=collate_and_count, prefetch_factor=2, multiprocessing_context="fork")


def test_blocks_are_reused_once_released_and_never_while_held(in_process):
    collate = PositionedCollate(_collate(), run_seed=1)
    # Released at once: a few blocks (the prefetched batches and the one being made) serve them all.
    stream = iter(_blocks_per_batch_loader(collate))
    counts = []
    for _ in range(12):
        batch, count = next(stream)
        counts.append(count)
        del batch
    assert max(counts) <= 4, counts
    del stream
    # Held (a whole batch, or only a view of it): every block stays untouched until released.
    stream = iter(_blocks_per_batch_loader(collate))
    whole = [next(stream)[0] for _ in range(2)]
    views = [next(stream)[0]["collated_global_crops"][1:] for _ in range(3)]
    gc.collect()
    later = [next(stream) for _ in range(6)]
    assert later[-1][1] >= 5  # the worker had to make new blocks meanwhile
    for reference, batch in zip(in_process, whole):
        _assert_same(reference, batch)
    for reference, view in zip(in_process[2:], views):
        assert torch.equal(view, reference["collated_global_crops"][1:])
    del stream


def test_training_side_receives_float32_on_the_device():
    batch = _batches(1, 1, torch.float16)[0]
    moved = batch_to_device(batch, torch.device("cpu"))
    for key in ("collated_global_crops", "collated_local_crops"):
        assert moved[key].dtype == torch.float32
        assert torch.equal(moved[key], batch[key].float())
    assert moved["collated_masks"].dtype == torch.bool and moved["mask_indices_list"].dtype == torch.long
    assert moved["upperbound"] == batch["upperbound"]
    float32 = _batches(0, 1)[0]
    assert batch_to_device(float32, torch.device("cpu"))["collated_global_crops"] is float32["collated_global_crops"]


def test_trainer_gets_float16_crops_from_float16_storage_and_computes_in_float32(tmp_path, nifti_writer, monkeypatch):
    from dinov2.data.datalist import write_datalist
    from dinov2.train import train3d
    from dinov2.train.ssl_meta_arch import SSLMetaArch

    paths = [str(nifti_writer(tmp_path / f"v{i}.nii.gz", (40, 40, 36), dtype=np.float32, seed=i)) for i in range(2)]
    datalist = write_datalist([{"image": p} for p in paths], tmp_path / "pretrain.json")
    cfg = train3d.build_config(str(REPO / "configs" / "tiny_cpu.yaml"), [
        f"train.datalist={datalist}", "train.max_iterations=1", "train.num_workers=1", "train.preflight=false",
        "preprocessing.storage_dtype=float16", "evaluation.eval_period_iterations=1",
        "checkpointing.period_iterations=1"])
    seen = {}
    real_to_device, real_step = train3d.batch_to_device, SSLMetaArch.forward_backward

    def to_device(batch, device):
        seen["crossed"] = batch["collated_global_crops"].dtype
        return real_to_device(batch, device)

    def step(self, batch, *args, **kwargs):
        seen["computed"] = {batch["collated_global_crops"].dtype, batch["collated_local_crops"].dtype}
        return real_step(self, batch, *args, **kwargs)

    monkeypatch.setattr(train3d, "batch_to_device", to_device)
    monkeypatch.setattr(SSLMetaArch, "forward_backward", step)
    monkeypatch.setattr("dinov2.plot.plot_at_end", lambda output_dir: None)
    train3d.train(cfg, tmp_path / "run")
    assert seen == {"crossed": torch.float16, "computed": {torch.float32}}


def test_block_round_trip_keeps_layouts_and_frees_the_block_with_the_last_view(monkeypatch):
    from multiprocessing.reduction import ForkingPickler

    monkeypatch.setattr(shared_batches, "get_worker_info", lambda: object())  # as inside a worker
    monkeypatch.setattr(shared_batches, "_POOL", None)
    out = shared_batches.allocate_batch({"crops": ((4, 3), torch.float16), "none": ((0,), torch.long),
                                         "mask": ((2, 5), torch.bool)})
    out["crops"].copy_(torch.arange(12.0).view(4, 3))
    out["mask"].copy_(torch.arange(10).view(2, 5) % 3 == 0)
    sent = {"crops_t": out["crops"].t(), "none": out["none"], "mask": out["mask"], "bound": 7, "absent": None}
    packed = shared_batches.for_transfer(sent)
    assert isinstance(packed, shared_batches.SharedBatch) and set(packed.others) == {"bound", "absent"}
    received = ForkingPickler.loads(ForkingPickler.dumps(packed))
    del packed
    assert list(received) == list(sent)
    for key in ("crops_t", "none", "mask"):
        assert received[key].dtype == sent[key].dtype and received[key].stride() == sent[key].stride()
        assert torch.equal(received[key], sent[key])
    assert received["bound"] == 7 and received["absent"] is None
    (block,) = shared_batches._pool().blocks
    kept = received["mask"][1]
    del received
    gc.collect()
    assert int(block[0]) == shared_batches._BUSY  # a view still reads the block
    del kept
    gc.collect()
    assert int(block[0]) == shared_batches._FREE
    assert shared_batches._pool().take(8) is block  # and the next batch reuses it
