"""Process-group setup from the torchrun environment; one plain process without it."""

import socket

import pytest
import torch

from dinov2 import distributed
from dinov2.distributed import TORCHRUN_VARS, init_distributed, read_launch_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def clean_env(monkeypatch):
    for key in TORCHRUN_VARS:
        monkeypatch.delenv(key, raising=False)
    yield monkeypatch
    distributed.shutdown_distributed()


def test_no_launcher_means_no_group(clean_env):
    assert read_launch_env() is None
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.device.type) == (0, 1, None, "cpu")
    assert not distributed.is_enabled() and distributed.get_world_size() == 1


def test_partial_environment_is_an_error(clean_env):
    clean_env.setenv("RANK", "0")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        read_launch_env()


def test_impossible_placement_is_an_error():
    env = {"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(ValueError, match="RANK"):
        read_launch_env(env)


def test_torchrun_environment_creates_gloo_group_on_cpu(clean_env):
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    for key, value in env.items():
        clean_env.setenv(key, value)
    ctx = init_distributed("cpu")
    assert ctx.backend == "gloo" and distributed.is_enabled() and distributed.get_world_size() == 1
    assert torch.equal(distributed.all_reduce_sum(torch.ones(2)), torch.ones(2))
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    distributed.shutdown_distributed()
    assert not distributed.is_enabled()


def test_collective_timeout_comes_from_argument_then_environment(monkeypatch):
    from dinov2.distributed import collective_timeout_minutes

    monkeypatch.delenv("DINOV2_DIST_TIMEOUT_MIN", raising=False)
    assert collective_timeout_minutes() == 30.0
    monkeypatch.setenv("DINOV2_DIST_TIMEOUT_MIN", "2.5")
    assert collective_timeout_minutes() == 2.5
    assert collective_timeout_minutes(7) == 7.0
    monkeypatch.setenv("DINOV2_DIST_TIMEOUT_MIN", "soon")
    with pytest.raises(ValueError, match="DINOV2_DIST_TIMEOUT_MIN"):
        collective_timeout_minutes()
