"""Tests for dinov2.data.masking: exact counts, seeding and spatial clustering of block masks."""

import numpy as np
import pytest

from dinov2.data.masking import MaskingGenerator3d, _face_neighbours


def _masked_neighbour_fraction(mask: np.ndarray) -> float:
    """Mean, over masked tokens, of the fraction of their in-grid face neighbours that are masked."""
    counts = np.zeros(mask.shape)
    totals = np.zeros(mask.shape)
    for axis in range(3):
        for shift in (1, -1):
            rolled = np.roll(mask, shift, axis=axis)
            valid = np.ones(mask.shape, dtype=bool)
            edge = [slice(None)] * 3
            edge[axis] = 0 if shift == 1 else -1
            valid[tuple(edge)] = False  # np.roll wraps around: that neighbour is not real
            counts += rolled & valid
            totals += valid
    return float((counts[mask] / totals[mask]).mean())


@pytest.mark.parametrize("mode", ["random", "block"])
@pytest.mark.parametrize("grid", [(6, 6, 6), (4, 5, 7), (1, 3, 2)])
def test_exact_count_shape_and_dtype(mode, grid):
    gen = MaskingGenerator3d(grid, mode=mode, seed=0)
    n_tokens = int(np.prod(grid))
    rng = np.random.default_rng(1)
    for num in sorted({0, 1, n_tokens // 3, n_tokens // 2, n_tokens - 1, n_tokens}):
        mask = gen(num, rng)
        assert mask.shape == grid
        assert mask.dtype == bool
        assert int(mask.sum()) == num


def test_block_count_exact_over_many_draws():
    gen = MaskingGenerator3d((7, 7, 7), mode="block", min_num_patches=4, max_num_patches=60)
    rng = np.random.default_rng(3)
    targets = rng.integers(0, 343, size=200)
    assert [int(gen(t, rng).sum()) for t in targets] == targets.tolist()


@pytest.mark.parametrize("mode", ["random", "block"])
def test_seeded_generator_is_reproducible_and_uses_no_global_state(mode):
    np.random.seed(0)
    a = MaskingGenerator3d((6, 6, 6), mode=mode, seed=5)(70)
    np.random.seed(123)  # the global RNG must not matter
    b = MaskingGenerator3d((6, 6, 6), mode=mode, seed=5)(70)
    c = MaskingGenerator3d((6, 6, 6), mode=mode, seed=6)(70)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    explicit = MaskingGenerator3d((6, 6, 6), mode=mode, seed=99)(70, np.random.default_rng(5))
    held = MaskingGenerator3d((6, 6, 6), mode=mode, seed=5)
    np.testing.assert_array_equal(explicit, held(70))


def test_block_masks_are_clustered_compared_with_uniform():
    grid, num = (8, 8, 8), 150
    rng = np.random.default_rng(0)
    block = MaskingGenerator3d(grid, mode="block", min_num_patches=8)
    uniform = MaskingGenerator3d(grid, mode="random")
    block_score = np.mean([_masked_neighbour_fraction(block(num, rng)) for _ in range(20)])
    uniform_score = np.mean([_masked_neighbour_fraction(uniform(num, rng)) for _ in range(20)])
    # Uniform masking: a neighbour is masked with probability ~num / 512 (~0.29).
    assert uniform_score < 0.4
    assert block_score > uniform_score + 0.2


def test_block_masks_vary_across_draws_and_cover_grid():
    gen = MaskingGenerator3d((6, 6, 6), mode="block", seed=0)
    masks = np.stack([gen(40) for _ in range(200)])
    assert len({m.tobytes() for m in masks}) == 200
    # Cuboids favour the centre (a corner token is masked several times less often), but no token is
    # left out altogether.
    assert masks.any(axis=0).all()


def test_top_up_grows_from_the_masked_region():
    gen = MaskingGenerator3d((6, 6, 6), mode="block", seed=0)
    mask = np.zeros((6, 6, 6), dtype=bool)
    mask[0, 0, 0] = True
    gen._top_up(mask, 6, np.random.default_rng(0))
    assert mask.sum() == 7
    # The six added tokens all lie within the dilation of the seed: the face neighbours first.
    seed_only = np.zeros_like(mask)
    seed_only[0, 0, 0] = True
    grown_twice = _face_neighbours(_face_neighbours(seed_only))
    assert not (mask & ~grown_twice).any()


def test_face_neighbours_marks_six_neighbourhood():
    mask = np.zeros((3, 3, 3), dtype=bool)
    mask[1, 1, 1] = True
    grown = _face_neighbours(mask)
    assert grown.sum() == 7
    assert grown[0, 1, 1] and grown[2, 1, 1] and grown[1, 0, 1] and grown[1, 2, 1] and grown[1, 1, 0]
    assert not grown[0, 0, 0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_size": (4, 4)},
        {"input_size": (4, 0, 4)},
        {"input_size": (4, 4, 4), "mode": "grid"},
        {"input_size": (4, 4, 4), "min_num_patches": 0},
        {"input_size": (4, 4, 4), "min_num_patches": 8, "max_num_patches": 4},
        {"input_size": (4, 4, 4), "min_aspect": 0.0},
        {"input_size": (4, 4, 4), "min_aspect": 2.0, "max_aspect": 1.0},
        {"input_size": (4, 4, 4), "max_attempts": 0},
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        MaskingGenerator3d(**kwargs)


@pytest.mark.parametrize("num", [-1, 65])
def test_out_of_range_count_raises(num):
    with pytest.raises(ValueError, match="num_masking_patches"):
        MaskingGenerator3d((4, 4, 4))(num)
