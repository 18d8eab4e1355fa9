"""Tests for dinov2.data.samplers: a global, resumable stream independent of the process count."""

import itertools

import pytest
import torch

from dinov2.data.samplers import EpochSampler, InfiniteSampler, _pass_permutation


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def _global_stream(size, seed, n, start=0, shuffle=True):
    """The first n indices of the global stream from `start`, read by a single process."""
    return _take(InfiniteSampler(size, shuffle=shuffle, seed=seed, rank=0, world_size=1, start=start), n)


def _lock_step(size, seed, world_size, steps, per_rank_batch, start=0):
    """Indices consumed by `world_size` ranks over `steps` steps, in global order (step, rank, slot).

    Rank r's j-th sample is global position start + r + j * W, so interleaving the ranks'
    streams slot by slot rebuilds the global order.
    """
    per_rank = [
        _take(InfiniteSampler(size, seed=seed, rank=r, world_size=world_size, start=start), steps * per_rank_batch)
        for r in range(world_size)
    ]
    return [per_rank[r][j] for j in range(steps * per_rank_batch) for r in range(world_size)]


def test_each_pass_is_a_permutation_and_passes_differ():
    size = 37
    stream = _global_stream(size, seed=3, n=4 * size)
    passes = [stream[p * size : (p + 1) * size] for p in range(4)]
    assert all(sorted(p) == list(range(size)) for p in passes)
    assert len({tuple(p) for p in passes}) == 4
    assert passes[0] != list(range(size))


def test_seed_changes_stream_and_is_reproducible():
    assert _global_stream(50, seed=1, n=100) == _global_stream(50, seed=1, n=100)
    assert _global_stream(50, seed=1, n=100) != _global_stream(50, seed=2, n=100)
    # (seed, pass) are mixed, not added: seed 0 pass 1 is not seed 1 pass 0.
    assert _global_stream(50, seed=0, n=100)[50:] != _global_stream(50, seed=1, n=50)


def test_no_shuffle_repeats_range():
    assert _global_stream(4, seed=0, n=10, shuffle=False) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert _take(InfiniteSampler(5, shuffle=False, rank=1, world_size=2), 4) == [1, 3, 0, 2]


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_ranks_together_read_the_global_stream(world_size):
    size, steps, batch = 23, 7, 3
    consumed = _lock_step(size, seed=4, world_size=world_size, steps=steps, per_rank_batch=batch)
    assert consumed == _global_stream(size, seed=4, n=world_size * steps * batch)


def test_resume_continues_the_same_order():
    size, seed, k = 30, 9, 47
    uninterrupted = _global_stream(size, seed, n=k + 40)
    first = InfiniteSampler(size, seed=seed, rank=0, world_size=1)
    before = _take(first, k)
    first.set_global_position(k)
    resumed = InfiniteSampler(size, seed=seed, rank=0, world_size=1)
    resumed.load_state_dict(first.state_dict())
    assert before + _take(resumed, 40) == uninterrupted


def test_two_ranks_then_resume_on_one_covers_stream_without_repeats_or_skips():
    size, seed, global_batch = 17, 11, 6  # 2 ranks x 3 samples per step
    iterations = 5
    k = InfiniteSampler.position_for(iterations, global_batch)
    consumed = _lock_step(size, seed, world_size=2, steps=iterations, per_rank_batch=3)
    rank0 = InfiniteSampler(size, seed=seed, rank=0, world_size=2)
    rank0.set_global_position(k)
    state = rank0.state_dict()
    assert state == {"global_position": 30, "seed": seed, "size": size, "shuffle": 1}

    single = InfiniteSampler(size, seed=seed, rank=0, world_size=1)
    single.load_state_dict(state)
    consumed += _take(single, 25)
    assert consumed == _global_stream(size, seed, n=k + 25)


def test_one_rank_then_resume_on_three():
    size, seed = 13, 2
    k = 20
    consumed = _global_stream(size, seed, n=k)
    consumed += _lock_step(size, seed, world_size=3, steps=4, per_rank_batch=2, start=k)
    assert consumed == _global_stream(size, seed, n=k + 24)


def test_far_start_builds_only_the_pass_it_needs():
    size, start, rank, world_size = 1_000_000, 123_456_789, 3, 8
    sampler = InfiniteSampler(size, seed=0, rank=rank, world_size=world_size, start=start)
    pass_index, offset = divmod(start + rank, size)
    expected = _pass_permutation(size, 0, pass_index, shuffle=True)[offset : offset + 5 * world_size : world_size]
    assert _take(sampler, 5) == expected.tolist()


def test_defaults_come_from_distributed_helpers():
    sampler = InfiniteSampler(10)
    assert (sampler.rank, sampler.world_size) == (0, 1)


def test_load_state_dict_rejects_other_stream():
    sampler = InfiniteSampler(10, seed=1, rank=0, world_size=1)
    with pytest.raises(ValueError, match="size=12"):
        sampler.load_state_dict({"global_position": 5, "seed": 1, "size": 12, "shuffle": 1})
    with pytest.raises(ValueError, match="seed=2"):
        sampler.load_state_dict({"global_position": 5, "seed": 2, "size": 10, "shuffle": 1})
    with pytest.raises(ValueError, match="global_position"):
        sampler.load_state_dict({"seed": 1, "size": 10})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 0},
        {"size": 5, "seed": -1},
        {"size": 5, "start": -2},
        {"size": 5, "rank": 2, "world_size": 2},
        {"size": 5, "rank": 0, "world_size": 0},
    ],
)
def test_infinite_sampler_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        InfiniteSampler(**kwargs)


def test_position_for_validates():
    assert InfiniteSampler.position_for(3, 8) == 24
    with pytest.raises(ValueError):
        InfiniteSampler.position_for(-1, 8)


@pytest.mark.parametrize("size,world_size", [(10, 1), (10, 3), (2, 4), (0, 2), (101, 8)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_epoch_sampler_covers_every_index_once(size, world_size, shuffle):
    shards = [
        list(EpochSampler(size, shuffle=shuffle, seed=1, rank=r, world_size=world_size)) for r in range(world_size)
    ]
    assert sorted(itertools.chain(*shards)) == list(range(size))
    assert [len(s) for s in shards] == [
        len(EpochSampler(size, rank=r, world_size=world_size)) for r in range(world_size)
    ]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    if not shuffle:
        assert shards[0] == list(range(0, size, world_size))


@pytest.mark.parametrize("size,world_size", [(10, 3), (2, 5)])
def test_epoch_sampler_pad_gives_equal_shards(size, world_size):
    shards = [list(EpochSampler(size, rank=r, world_size=world_size, pad=True)) for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    assert set(itertools.chain(*shards)) == set(range(size))
    assert len(shards[0]) * world_size == -(-size // world_size) * world_size


def test_epoch_sampler_shuffle_per_epoch_and_deterministic():
    sampler = EpochSampler(20, shuffle=True, seed=0, rank=0, world_size=1)
    epoch0 = list(sampler)
    assert list(sampler) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0 and sorted(sampler) == list(range(20))


def test_epoch_sampler_drives_a_dataloader():
    loader = torch.utils.data.DataLoader(list(range(7)), batch_size=2, sampler=EpochSampler(7, rank=1, world_size=2))
    assert torch.cat(list(loader)).tolist() == [1, 3, 5]


def test_epoch_sampler_invalid_arguments():
    with pytest.raises(ValueError):
        EpochSampler(-1)
    with pytest.raises(ValueError):
        EpochSampler(0, pad=True)
    with pytest.raises(ValueError):
        EpochSampler(5, rank=-1, world_size=2)
    with pytest.raises(ValueError):
        EpochSampler(5).set_epoch(-1)
