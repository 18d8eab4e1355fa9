"""python -m dinov2.plot: a user error is one ``ERROR:`` line (see test_plot.py); ``--debug`` raises it."""

from __future__ import annotations

import pytest

from dinov2.plot import PlotError
from dinov2.plot.__main__ import main


def test_missing_run_folder_is_one_line_and_raises_with_debug(tmp_path, error_line):
    assert main([str(tmp_path / "nowhere")]) == 1
    assert str(tmp_path / "nowhere") in error_line(only=True)
    with pytest.raises((PlotError, FileNotFoundError)):
        main([str(tmp_path / "nowhere"), "--debug"])
