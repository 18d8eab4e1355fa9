"""The old command paths still run, with a one-line warning that names the new command."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from dinov2.utils import deprecation

MOVED = [
    ("dinov2.eval.segmentation3d", "dinov2.eval.segmentation"),
    ("dinov2.eval.predict", "dinov2.eval.segmentation.predict"),
    ("dinov2.eval.linear3d", "dinov2.eval.linear"),
    ("dinov2.eval.vis_pca", "dinov2.eval.visualisation"),
    ("dinov2.data.sample_data", "dinov2.sample_data"),
    ("dinov2.data.classification_sample", "dinov2.sample_data.classification"),
]


@pytest.mark.parametrize("old, new", MOVED)
def test_old_command_warns_once_and_runs_the_new_one(old, new, capsys, monkeypatch):
    monkeypatch.setattr(deprecation, "_warned", set())
    shim = importlib.import_module(old)
    for _ in range(2):
        with pytest.raises(SystemExit) as info:
            shim.main(["--help"])
        assert info.value.code == 0
    out, err = capsys.readouterr()
    assert f"usage: python -m {new} " in out  # the new command's own parser ran
    warnings = [line for line in err.splitlines() if "deprecated" in line]
    assert warnings == [f"warning: 'python -m {old}' is deprecated and will be removed; use 'python -m {new}' "
                        "(same arguments)."]


def test_old_command_still_runs_with_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "dinov2.data.sample_data", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "usage: python -m dinov2.sample_data " in done.stdout
    assert "use 'python -m dinov2.sample_data'" in done.stderr
