"""python -m dinov2.train.train3d and python -m dinov2.train.curves: a user error is one ``ERROR:``
line on stderr and exit code 1, no traceback; ``--debug`` raises it with its traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dinov2.data.datalist import DatalistError
from dinov2.train import curves, train3d
from dinov2.utils.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny_cpu.yaml"


def _argv(tmp_path, *extra: str) -> list[str]:
    return ["--config-file", str(TINY_CONFIG), "--output-dir", str(tmp_path / "run"), *extra]


def test_train3d_missing_config_file(tmp_path, monkeypatch, error_line):
    monkeypatch.chdir(tmp_path)
    assert train3d.main(["--config-file", "missing.yaml", "--output-dir", "run"]) == 1
    assert error_line(only=True).startswith("ERROR: --config-file missing.yaml: no such file")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        train3d.main(["--config-file", "missing.yaml", "--output-dir", "run", "--debug"])


def test_train3d_missing_absolute_config_path_lists_the_packaged_configs(tmp_path, error_line):
    missing = tmp_path / "nowhere" / "x.yaml"
    assert train3d.main(["--config-file", str(missing), "--output-dir", str(tmp_path / "run")]) == 1
    line = error_line(only=True)
    assert str(missing) in line and "ssl3d_default_config.yaml" in line


def test_train3d_unknown_config_key_names_it_and_the_closest_one(tmp_path, error_line):
    argv = _argv(tmp_path, "train.datalist=x.json", "optim.base_lrr=1")
    assert train3d.main(argv) == 1
    line = error_line(only=True)
    assert "optim.base_lrr" in line and "optim.base_lr" in line.replace("optim.base_lrr", "")
    with pytest.raises(ConfigError, match="optim.base_lrr"):
        train3d.main([*argv, "--debug"])


def test_train3d_required_value_left_unset(tmp_path, error_line):
    assert train3d.main(_argv(tmp_path)) == 1  # train.datalist is ??? in the defaults
    assert "train.datalist" in error_line(only=True)


def test_train3d_bad_values_name_the_key(tmp_path, error_line):
    assert train3d.main(_argv(tmp_path, "train.datalist=x.json", "--device", "cuda:99")) == 1
    assert "cuda:99" in error_line(only=True)
    assert train3d.main(_argv(tmp_path, "train.datalist=x.json", "optim.epochs=0")) == 1
    assert "optim.epochs" in error_line()


def test_train3d_bad_datalist_names_the_file(tmp_path, error_line):
    datalist = tmp_path / "pretrain.json"
    datalist.write_text(json.dumps([{"shape": [8, 8, 8]}]))  # an entry without its image
    argv = _argv(tmp_path, f"train.datalist={datalist}")
    assert train3d.main(argv) == 1
    assert str(datalist) in error_line()
    assert str(datalist) in (tmp_path / "run" / "log.txt").read_text()  # the run's log keeps it too
    with pytest.raises(DatalistError):
        train3d.main([*argv, "--debug"])


def _run(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dinov2.train.train3d", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_train3d_process_prints_one_error_line_and_the_traceback_only_with_debug(tmp_path):
    plain = _run("--config-file", "missing.yaml", "--output-dir", "out", cwd=tmp_path)
    assert plain.returncode == 1
    lines = plain.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: --config-file missing.yaml"), plain.stderr
    debug = _run("--config-file", "missing.yaml", "--output-dir", "out", "--debug", cwd=tmp_path)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "FileNotFoundError" in debug.stderr


def test_curves_missing_run_and_damaged_metrics(tmp_path, error_line):
    assert curves.main([str(tmp_path / "nowhere")]) == 1
    assert str(tmp_path / "nowhere") in error_line(only=True)
    (tmp_path / "training_metrics.json").write_text('{"iteration": 0}\n{"iteration": 1, \n')
    assert curves.main([str(tmp_path)]) == 1
    assert "training_metrics.json, line 2" in error_line(only=True)
    with pytest.raises(ValueError, match="line 2"):
        curves.main([str(tmp_path), "--debug"])


def test_train3d_pretrained_teacher_of_another_architecture_names_the_file(tmp_path, tiny_argv, error_line):
    from omegaconf import OmegaConf

    from dinov2.checkpoints.teacher_export import save_teacher_checkpoint
    from dinov2.train.ssl_meta_arch import SSLMetaArch
    from dinov2.utils.config import merge_configs, packaged_config_path

    other = merge_configs(OmegaConf.load(packaged_config_path("ssl3d_default_config")), TINY_CONFIG,
                          ["train.datalist=unused.json", "dino.head_n_prototypes=512"])
    teacher = save_teacher_checkpoint(tmp_path / "other" / "teacher_checkpoint.pth",
                                      SSLMetaArch(other).teacher.state_dict(), OmegaConf.to_container(other), 0)
    argv = tiny_argv(tmp_path / "run", f"student.pretrained_weights={teacher}", "train.max_iterations=1")
    assert train3d.main(argv) == 1
    line = error_line()
    assert f"student.pretrained_weights={teacher}" in line and "does not fit" in line
