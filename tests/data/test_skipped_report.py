"""The report of skipped inputs (dinov2.data.skipped_report): one row per input whatever its values
hold, written atomically, a stale report removed when a caller asks."""

from __future__ import annotations

import csv
import os

import pytest

from dinov2.data import skipped_report
from dinov2.data.datalist import write_skipped_report
from dinov2.data.datalist.format import Skipped
from dinov2.data.skipped_report import REPORT_NAME, write_skipped_tsv


def read_rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_a_value_with_tabs_and_line_breaks_stays_one_row(tmp_path):
    rows = [("/data/a\tb.nii.gz", "header unreadable:\n    truncated gzip\tstream"),
            ("/data/My  Scans/c.nii.gz", 'label "7" is\r\nnot a class\u2028of the task'),
            ('"quoted".nii.gz', None)]
    report = write_skipped_tsv(tmp_path / REPORT_NAME, ("path", "reason"), rows)
    lines = report.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 + len(rows) and lines[0] == "path\treason"
    assert all(line.count("\t") == 1 for line in lines[:3])
    assert read_rows(report) == [
        {"path": "/data/a b.nii.gz", "reason": "header unreadable: truncated gzip stream"},
        {"path": "/data/My  Scans/c.nii.gz", "reason": 'label "7" is not a class of the task'},  # two spaces kept
        {"path": '"quoted".nii.gz', "reason": ""},
    ]


def test_nothing_skipped_writes_nothing_and_removes_a_stale_report_only_when_asked(tmp_path):
    target = tmp_path / "out" / REPORT_NAME
    assert write_skipped_tsv(target, ("path", "reason"), [("a.nii.gz", "truncated")]) == target
    assert write_skipped_tsv(target, ("path", "reason"), []) is None
    assert read_rows(target) == [{"path": "a.nii.gz", "reason": "truncated"}]  # kept: not asked to remove
    assert write_skipped_tsv(target, ("path", "reason"), [], remove_stale=True) is None
    assert not target.exists() and os.listdir(tmp_path / "out") == []
    assert write_skipped_tsv(tmp_path / "never" / REPORT_NAME, ("path",), [], remove_stale=True) is None
    assert not (tmp_path / "never").exists()


def test_a_failed_write_keeps_the_earlier_report_whole_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = write_skipped_tsv(tmp_path / REPORT_NAME, ("path", "reason", "where"), [("a.nii.gz", "cut", "[0]")])
    before = target.read_bytes()

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(skipped_report.os, "replace", refuse)
    with pytest.raises(OSError):
        write_skipped_tsv(target, ("path", "reason", "where"), [("b.nii.gz", "empty", "[1]")] * 50)
    assert target.read_bytes() == before and os.listdir(tmp_path) == [REPORT_NAME]


def test_a_row_without_one_value_per_column_is_refused(tmp_path):
    with pytest.raises(ValueError, match="2 values for the 3 columns"):
        write_skipped_tsv(tmp_path / REPORT_NAME, ("path", "reason", "where"), [("a.nii.gz", "cut")])
    assert os.listdir(tmp_path) == []


def test_a_rebuilt_datalist_drops_the_report_of_its_earlier_build(tmp_path):
    datalist = tmp_path / "pretrain.json"
    report = write_skipped_report([Skipped("/data/cut.nii.gz", "truncated")], datalist)
    assert report == tmp_path / "pretrain.json.skipped.tsv"
    assert read_rows(report) == [{"path": "/data/cut.nii.gz", "reason": "truncated"}]
    assert write_skipped_report([], datalist) is None and not report.exists()
