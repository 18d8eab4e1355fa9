"""python -m dinov2.sample_data and python -m dinov2.sample_data.classification: missing sample
packages or a bad flag value is one ``ERROR:`` line on stderr naming the fix, exit code 1, no
traceback; ``--debug`` raises the error instead."""

from __future__ import annotations

import pytest

from dinov2.sample_data import classification, cli, packages
from dinov2.sample_data.packages import SampleDataError


def test_classification_bad_values_name_the_flag(tmp_path, error_line):
    out = tmp_path / "lobes"
    assert classification.main(["--out", str(out), "--stride", "0"]) == 1
    assert "--stride" in error_line(only=True)
    assert classification.main(["--out", str(out), "--val-band-mm", "10", "0"]) == 1
    assert "--val-band-mm" in error_line(only=True)
    with pytest.raises(ValueError, match="--stride"):
        classification.main(["--out", str(out), "--stride", "0", "--debug"])
    assert not out.exists()


def test_missing_sample_packages_say_what_to_install(tmp_path, monkeypatch, error_line):
    monkeypatch.setattr(packages, "package_dir", lambda name: None)  # as if none were installed
    assert classification.main(["--out", str(tmp_path / "lobes")]) == 1
    line = error_line(only=True)
    assert "is not installed" in line and packages.INSTALL_HINT in line
    assert cli.main(["--out", str(tmp_path / "demo"), "--labels", "tissue"]) == 1
    assert packages.INSTALL_HINT in error_line()
    with pytest.raises(SampleDataError):
        cli.main(["--out", str(tmp_path / "demo"), "--labels", "tissue", "--debug"])


def test_an_output_folder_under_a_file(tmp_path, error_line):
    (tmp_path / "file").write_text("x")
    assert cli.main(["--out", str(tmp_path / "file" / "demo")]) == 1
    assert str(tmp_path / "file" / "demo") in error_line(only=True)
