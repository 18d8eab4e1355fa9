"""One voice for every entry point: a user error is one ERROR line and exit code 1, ``--debug`` shows
the traceback, every command is wrapped, and importing dinov2 changes no global state."""

from __future__ import annotations

import errno
import importlib
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dinov2.utils import entry_point as ep
from dinov2.utils.errors import ResourceError, UsageError, UserError

PACKAGE = Path(__file__).resolve().parents[2] / "dinov2"


@ep.entry_point
def _command(argv=None):
    """A command whose first argument says what to raise."""
    what = (argv or ["ok"])[0]
    if what == "user":
        raise UsageError("--size 3 is odd:\n  give an even --size.")
    if what == "missing":
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/scan.nii.gz")
    if what == "bug":
        raise KeyError("bug")
    if what == "argv":
        return list(argv)
    return 0


def test_a_user_error_is_one_error_line_and_exit_code_1(capsys):
    assert _command(["user"]) == 1
    assert capsys.readouterr().err == "ERROR: --size 3 is odd: give an even --size.\n"
    assert _command(["missing"]) == 1
    assert capsys.readouterr().err == "ERROR: /data/scan.nii.gz: No such file or directory\n"
    assert _command(["ok"]) == 0 and capsys.readouterr().err == ""


def test_debug_flag_or_environment_lets_the_error_through(monkeypatch):
    monkeypatch.delenv(ep.DEBUG_ENV, raising=False)
    with pytest.raises(UsageError, match="--size 3"):
        _command(["user", "--debug"])
    for value in ("1", "true", "yes"):
        monkeypatch.setenv(ep.DEBUG_ENV, value)
        with pytest.raises(FileNotFoundError):
            _command(["missing"])
    for value in ("0", "", "false"):
        monkeypatch.setenv(ep.DEBUG_ENV, value)
        assert _command(["user"]) == 1


def test_a_programming_error_keeps_its_traceback():
    with pytest.raises(KeyError):
        _command(["bug"])


def test_the_debug_flag_is_taken_out_before_the_command_parses(monkeypatch):
    monkeypatch.delenv(ep.DEBUG_ENV, raising=False)
    assert _command(["argv", "--debug", "x"]) == ["argv", "x"]
    # After "--" the arguments belong to another command (python -m dinov2.run.submit ... -- ...).
    assert _command(["argv", "--", "--debug"]) == ["argv", "--", "--debug"]
    assert not ep.debug_requested(["a", "--", "--debug"]) and ep.debug_requested(["--debug", "--", "x"])
    monkeypatch.setattr(sys, "argv", ["prog", "argv", "--debug"])
    assert _command() == ["argv"]


def test_more_user_error_types_per_command(capsys):
    strict = ep.entry_point(lambda argv=None: int("x"))
    lenient = ep.entry_point(user_errors=(ValueError,))(lambda argv=None: int("x"))
    with pytest.raises(ValueError):
        strict([])
    assert lenient([]) == 1
    assert capsys.readouterr().err.startswith("ERROR: invalid literal for int()")
    assert ep.run_entry_point(lambda argv=None: None, []) == 0


def test_user_input_turns_value_errors_of_a_block_into_user_errors():
    with pytest.raises(UsageError, match="^--config-file a.yaml: bad") as info:
        with ep.user_input(prefix="--config-file a.yaml: "):
            raise ValueError("bad")
    assert isinstance(info.value.__cause__, ValueError) and isinstance(info.value, ValueError)
    resource = ResourceError("out of memory")
    with pytest.raises(ResourceError) as info:
        with ep.user_input():
            raise resource
    assert info.value is resource
    with pytest.raises(KeyError):
        with ep.user_input(ValueError):
            raise KeyError("not a user error")


@pytest.mark.parametrize("module, name, old_base", [
    ("dinov2.checkpoints.errors", "CheckpointError", RuntimeError),
    ("dinov2.checkpoints.errors", "FinetunedModelError", RuntimeError),
    ("dinov2.data.datalist.format", "DatalistError", ValueError),
    ("dinov2.data.image_io", "ImageHeaderError", ValueError),
    ("dinov2.eval.evidence.errors", "EvidenceError", ValueError),
    ("dinov2.layers.patch_embed", "PatchGridError", ValueError),
    ("dinov2.models.build", "BackboneConfigError", ValueError),
    ("dinov2.plot.errors", "PlotError", ValueError),
    ("dinov2.sample_data.packages", "SampleDataError", RuntimeError),
    ("dinov2.train.collapse", "CollapseError", RuntimeError),
    ("dinov2.train.train3d", "NonFiniteLossError", FloatingPointError),
    ("dinov2.utils.config", "ConfigError", ValueError),
    ("dinov2.utils.errors", "ResourceError", RuntimeError),
    ("dinov2.utils.errors", "UsageError", ValueError),
])
def test_the_project_user_errors_share_one_base_and_keep_their_old_one(module, name, old_base):
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, UserError) and issubclass(cls, old_base)


def _entry_modules() -> list[str]:
    """Every module that runs as ``python -m``, except the moved commands' shims (they delegate)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if not re.search(r'^if __name__ == "__main__":', text, re.M) or "warn_moved_command" in text:
            continue
        names.append(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
    return names


def test_every_entry_point_is_wrapped():
    modules = _entry_modules()
    expected = {"dinov2.train.train3d", "dinov2.train.curves", "dinov2.run.submit", "dinov2.eval.segmentation.predict",
                "dinov2.eval.segmentation.__main__", "dinov2.eval.linear.__main__",
                "dinov2.eval.visualisation.__main__", "dinov2.eval.evidence.__main__",
                "dinov2.data.datalist.__main__", "dinov2.sample_data.__main__", "dinov2.sample_data.classification",
                "dinov2.plot.__main__"}
    assert expected <= set(modules), sorted(expected - set(modules))
    for name in modules:
        main = importlib.import_module(name).main
        assert getattr(main, "__wrapped_entry_point__", False), f"{name}.main is not wrapped in entry_point"


def test_log_lines_have_one_format():
    record = logging.LogRecord("dinov2.train", logging.INFO, __file__, 1, "it %d", (3,), None)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO dinov2.train: it 3", ep.log_formatter().format(record))


def test_start_entry_point_quiets_monai_and_configures_logging_in_a_fresh_process():
    code = """
import logging, warnings
from dinov2.utils.entry_point import LOG_FORMAT, start_entry_point
start_entry_point(tune_allocator=False)
start_entry_point(tune_allocator=False)
root = logging.getLogger()
print(len(root.handlers), root.handlers[0].formatter._fmt == LOG_FORMAT, root.level == logging.INFO,
      logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").level == logging.ERROR,
      sum("NvImgCodecPydicomReader" in str(f[1] and f[1].pattern) for f in warnings.filters))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.split() == ["1", "True", "True", "True", "1"]


def test_importing_dinov2_changes_no_global_state():
    # torch and MONAI first: what they do at import is theirs. Then the dinov2 modules a program
    # imports to train or evaluate must leave logger levels and warnings filters as they were,
    # import no xformers and not initialise CUDA.
    code = """
import json, logging, sys, warnings
import torch, monai, monai.transforms, numpy, omegaconf
levels = {name: logging.getLogger(name).level for name in list(logging.root.manager.loggerDict)}
filters = list(warnings.filters)
import dinov2, dinov2.layers, dinov2.models, dinov2.train.train3d, dinov2.eval.segmentation.finetune
changed = [name for name, level in levels.items() if logging.getLogger(name).level != level]
print(json.dumps({"changed": changed, "filters": warnings.filters == filters,
                  "monai": logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").level,
                  "xformers": "xformers" in sys.modules, "cuda": torch.cuda.is_initialized()}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout
    state = json.loads(out.strip().splitlines()[-1])
    assert state == {"changed": [], "filters": True, "monai": logging.NOTSET, "xformers": False, "cuda": False}


def test_a_user_error_wrapped_in_a_runtime_error_is_still_one_line(capsys):
    from dinov2.utils.entry_point import entry_point
    from dinov2.utils.errors import UsageError

    @entry_point
    def main(argv=None):
        try:
            raise UsageError("scan.nii.gz: the file is empty. Remove it from the datalist.")
        except UsageError as exc:  # what MONAI's Compose does with a transform's error
            raise RuntimeError("applying transform <LoadVolumed>") from exc

    assert main([]) == 1
    assert capsys.readouterr().err.strip() == "ERROR: scan.nii.gz: the file is empty. Remove it from the datalist."

    @entry_point
    def bug(argv=None):
        raise RuntimeError("a programming error")

    with pytest.raises(RuntimeError, match="programming error"):
        bug([])


@pytest.mark.parametrize("module, argv, needle", [
    ("dinov2.train.train3d", ["--no-such-flag"], "the following arguments are required: --output-dir"),
    ("dinov2.eval.segmentation.predict", ["--checkpoint", "m.pth", "--input", "x", "--output", "o",
                                          "--precision", "fp8"], "invalid choice: 'fp8'"),
    ("dinov2.eval.evidence.__main__", ["--teacher", "t.pth", "--cv-folds", "four"], "invalid int value: 'four'"),
])
def test_a_bad_flag_is_one_error_line_with_exit_code_1(module, argv, needle, capsys):
    import argparse
    import importlib

    main = importlib.import_module(module).main
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR: ") and needle in err[0] and "--help" in err[0]
    assert argparse.ArgumentParser.error.__module__ == "argparse"  # restored after the command
