"""Out-of-memory and full-disk failures reach the user as advice, other errors unchanged."""

import errno
import re
from pathlib import Path

import pytest
import torch

from dinov2.utils.errors import ResourceError, explain_resource_error, explained_resource_errors


@pytest.mark.parametrize("exc", [
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried 9 GB"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
])
def test_out_of_memory_gets_the_memory_advice(exc):
    assert explain_resource_error(exc, "LOWER THE BATCH", "FREE DISK").endswith("LOWER THE BATCH")


def test_full_disk_names_the_file_and_gets_the_disk_advice():
    exc = OSError(errno.ENOSPC, "No space left on device", "/out/checkpoints/model_10.pth.tmp")
    message = explain_resource_error(exc, "LOWER THE BATCH", "FREE DISK")
    assert "/out/checkpoints/model_10.pth.tmp" in message and message.endswith("FREE DISK")


def test_other_errors_pass_through_untouched():
    assert explain_resource_error(ValueError("bad key"), "m", "d") is None
    assert explain_resource_error(OSError(errno.ENOENT, "missing"), "m", "d") is None
    with pytest.raises(KeyError):
        with explained_resource_errors("m", "d"):
            raise KeyError("x")


def test_context_manager_keeps_the_original_as_cause():
    with pytest.raises(ResourceError, match="Out of memory") as info:
        with explained_resource_errors("Lower the batch.", "d"):
            raise MemoryError()
    assert isinstance(info.value.__cause__, MemoryError)


def test_train3d_reports_a_full_disk_with_the_output_folder(tmp_path, monkeypatch, error_line):
    from dinov2.train import train3d

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "checkpoints" / "x.tmp"))

    monkeypatch.setattr(train3d, "train", full_disk)
    datalist = tmp_path / "list.json"
    datalist.write_text("[]")
    argv = ["--config-file", str(Path(__file__).parents[2] / "configs" / "tiny_cpu.yaml"), "--output-dir",
            str(tmp_path / "run"), f"train.datalist={datalist}"]
    assert train3d.main(argv) == 1  # one ERROR line, no traceback
    line = error_line()
    assert "No space left" in line and "checkpointing.max_to_keep" in line and str(tmp_path / "run") in line
    assert "No space left" in (tmp_path / "run" / "log.txt").read_text()
    with pytest.raises(ResourceError, match="No space left") as info:  # --debug: the error itself
        train3d.main(argv + ["--debug"])
    assert "checkpointing.max_to_keep" in str(info.value) and str(tmp_path / "run") in str(info.value)


def test_segmentation_names_a_missing_data_folder(tmp_path, error_line):
    from dinov2.eval.segmentation import finetune

    assert finetune.main(["--pretrained-weights", "none", "--output-dir", str(tmp_path / "out"),
                                "--dataset-name", "brain_tissue", "--base-data-dir",
                                str(tmp_path / "missing_data")]) == 1
    assert re.search("--base-data-dir .*missing_data is not a folder", error_line())


def test_train3d_names_a_missing_datalist(tmp_path, error_line):
    from dinov2.data.datalist import DatalistError
    from dinov2.train import train3d

    argv = ["--config-file", str(Path(__file__).parents[2] / "configs" / "tiny_cpu.yaml"),
            "--output-dir", str(tmp_path / "run"), f"train.datalist={tmp_path / 'missing.json'}"]
    assert train3d.main(argv) == 1
    assert re.search("missing.json.*python -m dinov2.data.datalist", error_line())
    with pytest.raises(DatalistError, match="missing.json.*python -m dinov2.data.datalist"):
        train3d.main([*argv, "--debug"])
