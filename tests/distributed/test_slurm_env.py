"""SLURM placement from a faked environment: node-list expansion, rank/port, precedence of torchrun."""

from __future__ import annotations

import pytest

from dinov2.distributed import read_launch_env, slurm
from dinov2.distributed.slurm import expand_nodelist, port_for_job, read_slurm_env


@pytest.fixture()
def no_scontrol(monkeypatch):
    """Exercise the pure-Python expansion even on a machine with SLURM's tools."""
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)


def _task(**overrides) -> dict[str, str]:
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[007-008],cpu01"}
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("gpu[001-004,007],cpu01", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu007", "cpu01"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),
    ("n[1-2]-ib[0-1],x", ["n1-ib0", "n1-ib1", "n2-ib0", "n2-ib1", "x"]),
    ("rack[09-10]", ["rack09", "rack10"]),
])
def test_nodelist_expansion(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[001-004", "gpu]1[", "gpu[4-2]", "gpu[a-b]", ""])
def test_unreadable_nodelist_is_an_error(bad):
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(bad)


def test_task_placement(no_scontrol):
    placement = read_slurm_env(_task())
    assert (placement.rank, placement.world_size, placement.local_rank, placement.node_rank) == (5, 8, 1, 1)
    assert placement.master_addr == "gpu007"
    assert placement.master_port == port_for_job("123456") == 10000 + 123456 % 20000


def test_port_is_per_job_and_in_range():
    ports = {port_for_job(job) for job in ("1", "2", "1234_7", 99999999)}
    assert len(ports) == 4 and all(10000 <= p < 30000 for p in ports)
    assert port_for_job("1234_7") == port_for_job("12347")
    with pytest.raises(ValueError, match="no digit"):
        port_for_job("local")


def test_scontrol_is_preferred_when_installed(monkeypatch, tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho hostA\necho hostB\n")
    fake.chmod(0o755)
    monkeypatch.setattr(slurm.shutil, "which", lambda name: str(fake) if name == "scontrol" else None)
    assert read_slurm_env(_task()).master_addr == "hostA"


def test_outside_a_multitask_step_there_is_no_placement(no_scontrol):
    assert read_slurm_env({}) is None
    assert read_slurm_env({"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1"}) is None  # salloc shell
    assert read_slurm_env(_task(SLURM_NTASKS="1", SLURM_PROCID="0")) is None  # one task: no group


@pytest.mark.parametrize("overrides, message", [
    ({"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST"),
    ({"SLURM_LOCALID": None}, "SLURM_LOCALID"),
    ({"SLURM_PROCID": "8"}, "Impossible"),
    ({"SLURM_NTASKS": "many"}, "SLURM_NTASKS"),
])
def test_broken_step_is_an_error(no_scontrol, overrides, message):
    with pytest.raises(ValueError, match=message):
        read_slurm_env(_task(**overrides))


def test_launch_env_reads_slurm_only_without_torchrun(no_scontrol):
    env = read_launch_env(_task())
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 8, 1, "gpu007")
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    env = read_launch_env({**_task(), **torchrun})  # srun torchrun ...: torchrun's placement wins
    assert (env.rank, env.world_size, env.master_port) == (0, 2, 29500)
