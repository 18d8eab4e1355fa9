"""python -m dinov2.data.datalist: a missing or bad datalist, or a bad flag value, is one ``ERROR:``
line on stderr naming it, exit code 1, no traceback; ``--debug`` raises the error instead."""

from __future__ import annotations

import json

import pytest

from dinov2.data.datalist import DatalistError
from dinov2.data.datalist.cli import main


def test_validate_a_missing_datalist(tmp_path, error_line):
    missing = tmp_path / "missing.json"
    assert main(["validate", str(missing), "--no-progress"]) == 1
    assert str(missing) in error_line(only=True)
    with pytest.raises(DatalistError, match="missing.json"):
        main(["validate", str(missing), "--no-progress", "--debug"])


@pytest.mark.parametrize("content, says", [("{", "is not valid JSON"), (json.dumps({"foo": 1}), "'training'")])
def test_validate_a_bad_datalist(tmp_path, error_line, content, says):
    datalist = tmp_path / "bad.json"
    datalist.write_text(content)
    assert main(["validate", str(datalist), "--no-progress"]) == 1
    line = error_line(only=True)
    assert str(datalist) in line and says in line
    with pytest.raises(DatalistError):
        main(["--debug", "validate", str(datalist), "--no-progress"])  # --debug before the subcommand too


def test_bad_flag_values(tmp_path, error_line):
    assert main(["pretrain", str(tmp_path), "-o", str(tmp_path / "o.json"), "--min-size", "1", "2",
                 "--no-progress"]) == 1
    assert "min_size" in error_line(only=True)
    assert main(["finetune", "--images", str(tmp_path / "nothing"), "--labels", str(tmp_path), "-o",
                 str(tmp_path / "o.json"), "--no-progress"]) == 1
    assert "--images" in error_line(only=True)
    assert not (tmp_path / "o.json").exists()
