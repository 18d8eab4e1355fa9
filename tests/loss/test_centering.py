"""Teacher targets: Sinkhorn-Knopp marginals, EMA centering, and the 2-process all-reduce."""

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov2.loss import EMACentering, SinkhornKnopp, build_centering, sinkhorn_knopp


def textbook_sinkhorn(logits, temp, n_iterations):
    """Plain exp-domain Sinkhorn-Knopp in float64, one process, written with explicit loops."""
    q = torch.exp(logits.double() / temp)  # (B, K)
    n_rows, n_cols = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        for k in range(n_cols):
            q[:, k] = q[:, k] / q[:, k].sum() / n_cols
        for b in range(n_rows):
            q[b, :] = q[b, :] / q[b, :].sum() / n_rows
    return (q * n_rows).float()


def logits(seed, rows=8, k=6, scale=1.0):
    return scale * torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))


def test_matches_textbook_iteration():
    x = logits(0)
    assert torch.allclose(sinkhorn_knopp(x, 0.1, n_iterations=3), textbook_sinkhorn(x, 0.1, 3), atol=1e-5)


def test_marginals_rows_one_columns_equal_mass():
    x = logits(1, rows=12, k=4)
    probs = sinkhorn_knopp(x, 0.2, n_iterations=50)
    assert torch.allclose(probs.sum(dim=1), torch.ones(12), atol=1e-5)
    assert torch.allclose(probs.sum(dim=0), torch.full((4,), 12 / 4), rtol=1e-3)
    # Even 3 rounds already balance the prototypes far better than a plain softmax does.
    def column_spread(p):
        return (p.sum(dim=0) - 12 / 4).abs().max()

    assert column_spread(sinkhorn_knopp(x, 0.07)) < column_spread(torch.softmax(x / 0.07, dim=1))


def test_float32_under_autocast_and_no_overflow():
    x = logits(2, scale=100.0)  # exp(100 / 0.04) would overflow any float type
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        probs = sinkhorn_knopp(x.bfloat16(), 0.04)
    assert probs.dtype == torch.float32
    assert torch.isfinite(probs).all()
    assert torch.allclose(probs.sum(dim=1), torch.ones(8), atol=1e-5)
    assert torch.allclose(probs, sinkhorn_knopp(x.bfloat16().float(), 0.04))


def test_padded_rows_excluded():
    x = logits(3, rows=10)
    probs = sinkhorn_knopp(x, 0.1, n_valid_rows=7)
    assert torch.allclose(probs[:7], sinkhorn_knopp(x[:7], 0.1))
    assert torch.equal(probs[7:], torch.zeros(3, 6))


def test_sinkhorn_errors():
    with pytest.raises(ValueError, match="teacher_temp"):
        sinkhorn_knopp(logits(0), 0.0)
    with pytest.raises(ValueError, match="n_valid_rows"):
        sinkhorn_knopp(logits(0), 0.1, n_valid_rows=9)
    with pytest.raises(ValueError, match="no valid rows"):
        sinkhorn_knopp(logits(0), 0.1, n_valid_rows=0)
    with pytest.raises(ValueError, match="rows, prototypes"):
        sinkhorn_knopp(torch.randn(2, 3, 4), 0.1)


def test_ema_centering_momentum_update():
    centering = EMACentering(out_dim=6, momentum=0.9)
    a, b = logits(4), logits(5)
    assert torch.allclose(centering(a, 0.1), torch.softmax(a / 0.1, dim=-1))
    centering.update(a)
    expected = torch.zeros(6)
    for k in range(6):
        expected[k] = 0.9 * 0.0 + 0.1 * sum(a[i, k].item() for i in range(8)) / 8
    assert torch.allclose(centering.center[0], expected, atol=1e-6)
    centering.update(b)
    for k in range(6):
        expected[k] = 0.9 * expected[k] + 0.1 * sum(b[i, k].item() for i in range(8)) / 8
    assert torch.allclose(centering.center[0], expected, atol=1e-6)
    assert torch.allclose(centering.softmax_center(b, 0.05), torch.softmax((b - expected) / 0.05, dim=-1))
    assert torch.equal(centering.state_dict()["center"], centering.center)


def test_ema_centering_valid_rows_only():
    centering = EMACentering(out_dim=6, momentum=0.5)
    x = logits(6, rows=10)
    centering.update(x, n_valid_rows=4)
    assert torch.allclose(centering.center[0], 0.5 * x[:4].mean(dim=0), atol=1e-6)
    probs = centering(x, 0.1, n_valid_rows=4)
    assert torch.equal(probs[4:], torch.zeros(6, 6))


def test_build_centering_common_interface():
    x = logits(7)
    for kind, cls in (("sinkhorn_knopp", SinkhornKnopp), ("softmax", EMACentering)):
        module = build_centering(kind, out_dim=6)
        assert isinstance(module, cls)
        probs = module(x, 0.07)
        module.update(x)
        assert probs.shape == (8, 6) and torch.allclose(probs.sum(dim=1), torch.ones(8), atol=1e-5)
    with pytest.raises(ValueError, match="sinkhorn_knopp, softmax"):
        build_centering("centre", out_dim=6)
    with pytest.raises(ValueError, match="momentum"):
        EMACentering(out_dim=6, momentum=1.5)


# --- two processes (gloo on the loopback interface) -------------------------------------------

FULL = logits(10, rows=8, k=5)
# Masked-patch rows: rank 0 holds 3 real rows + 2 padding, rank 1 holds 2 real + 3 padding.
PATCHES = logits(11, rows=10, k=5)
VALID = (3, 2)
# Rank 0 contributes no row at all: it must still take part in every collective.
EMPTY_SPLIT = (0, 5)


def _worker(rank, world_size, init_file, out_dir):
    # Forked from a parent that already ran OpenMP regions: stay single-threaded in the child.
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        half = FULL.chunk(world_size)[rank]
        patches = PATCHES.chunk(world_size)[rank]
        centering = EMACentering(out_dim=5, momentum=0.9)
        centering.update(half)
        centering.update(patches, n_valid_rows=VALID[rank])
        out = {
            "cls": sinkhorn_knopp(half, 0.07),
            "patches": sinkhorn_knopp(patches, 0.07, n_valid_rows=VALID[rank]),
            "empty_split": sinkhorn_knopp(patches, 0.07, n_valid_rows=EMPTY_SPLIT[rank]),
            "center": centering.center.clone(),
        }
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.torchrun
def test_two_process_all_reduce_matches_single_process(tmp_path):
    # fork, not spawn: a spawned child re-imports torch (~10 s on 2 cores), a forked one starts
    # in milliseconds. A hung collective must fail the test instead of blocking the suite.
    context = mp.start_processes(
        _worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("2-process gloo run did not finish within 60 s")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))

    assert torch.allclose(torch.cat([r0["cls"], r1["cls"]]), sinkhorn_knopp(FULL, 0.07), atol=1e-6)

    p0, p1 = PATCHES.chunk(2)
    valid = torch.cat([p0[: VALID[0]], p1[: VALID[1]]])
    single = sinkhorn_knopp(valid, 0.07)
    assert torch.allclose(r0["patches"][: VALID[0]], single[: VALID[0]], atol=1e-6)
    assert torch.allclose(r1["patches"][: VALID[1]], single[VALID[0] :], atol=1e-6)
    assert torch.equal(r0["patches"][VALID[0] :], torch.zeros(5 - VALID[0], 5))

    assert torch.equal(r0["empty_split"], torch.zeros(5, 5))
    assert torch.allclose(r1["empty_split"], sinkhorn_knopp(p1, 0.07), atol=1e-6)

    reference = EMACentering(out_dim=5, momentum=0.9)
    reference.update(FULL)
    reference.update(valid)
    assert torch.allclose(r0["center"], reference.center, atol=1e-6)
    assert torch.allclose(r1["center"], reference.center, atol=1e-6)
