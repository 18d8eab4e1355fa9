"""PretrainDataset3d: a volume that becomes unreadable mid-run is replaced deterministically, up to a threshold."""

from __future__ import annotations

import errno
import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from dinov2.data.augmentations import DataAugmentationDINO3d
from dinov2.data.datasets import (
    PretrainDataset3d,
    TooManyBadInputsError,
    build_pretrain_dataset,
    too_many_bad_inputs,
)
from dinov2.data.loader import sample_seeds
from dinov2.data.seeding import apply_seeds
from dinov2.data.validation import InputVolumeError
from dinov2.utils.errors import UserError

SMALL = dict(global_crops_size=8, local_crops_size=4, local_crops_number=1)
# Files are re-read at every access, so a file damaged after construction is met when drawn.
NO_CACHE = {"cache": {"mode": "none"}}
RUN_SEED = 7

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def volumes(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        path = tmp_path / f"v{i}.nii.gz"
        nib.save(nib.Nifti1Image(rng.uniform(0, 100, size=(12, 12, 12)).astype(np.float32), np.eye(4)), str(path))
        paths.append(str(path))
    return paths


def make(paths, fraction=0.05, augmentation=None):
    augmentation = augmentation or DataAugmentationDINO3d(**SMALL)
    return PretrainDataset3d(paths, augmentation, NO_CACHE, seed=0, rank=0, world_size=1, max_bad_fraction=fraction)


def truncate(path):
    """Cut the gzip stream in half, as an interrupted copy on the cluster's filesystem would."""
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])


def sample_at(dataset, index, position):
    """``dataset[index]`` with every generator reset for ``position``, as the training loader does."""
    apply_seeds(sample_seeds(RUN_SEED, position), dataset)
    sample = dataset[index]
    return sample["global_crops"] + sample["local_crops"]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def warnings_about(caplog, path):
    return [r for r in caplog.records if r.levelno == logging.WARNING and path in r.getMessage()]


@pytest.mark.parametrize("bad", [1, 3])  # 3 of 4: the replacement wraps around to entry 0
def test_unreadable_volume_is_replaced_by_the_next_entry(volumes, caplog, bad):
    dataset = make(volumes[:4], fraction=0.3)  # one of four tolerated
    truncate(volumes[bad])
    replacement = (bad + 1) % 4
    with caplog.at_level(logging.WARNING, logger="dinov2.data.datasets"):
        got = sample_at(dataset, bad, position=5)
        again = sample_at(dataset, bad, position=5)
    assert same(got, sample_at(dataset, replacement, position=5))
    assert same(got, again)
    assert not same(got, sample_at(dataset, (bad + 2) % 4, position=5))  # volumes differ: the check has teeth
    assert set(dataset.unreadable) == {bad}
    (record,) = warnings_about(caplog, volumes[bad])  # once, although the file was drawn twice
    message = record.getMessage()
    assert "truncated" in message and f"Entry {replacement} ({volumes[replacement]})" in message


def test_replacement_does_not_depend_on_what_the_process_met_before(volumes):
    truncate(volumes[1])
    truncate(volumes[2])
    seasoned, fresh = make(volumes[:5], fraction=0.45), make(volumes[:5], fraction=0.45)  # two of five tolerated
    sample_at(seasoned, 2, position=0)  # meets file 2 first, through another index and position
    assert set(seasoned.unreadable) == {2}
    expected = sample_at(fresh, 3, position=9)
    # Two bad files in a row: both skipped, to entry 3, whichever process asks and whatever it met before.
    assert same(sample_at(seasoned, 1, position=9), expected)
    assert same(sample_at(fresh, 1, position=9), expected)
    assert same(sample_at(fresh, 2, position=9), expected)
    assert set(seasoned.unreadable) == set(fresh.unreadable) == {1, 2}


def test_over_the_threshold_the_run_stops_naming_the_files(volumes):
    dataset = make(volumes)  # default 0.05 of 6 volumes: none tolerated
    truncate(volumes[4])
    dataset[3]  # readable entries are unaffected
    with pytest.raises(TooManyBadInputsError) as caught:
        dataset[4]
    message = str(caught.value)
    assert "1 of 6" in message and volumes[4] in message and "truncated" in message
    assert "train.max_bad_input_fraction" in message and "resumes from its last checkpoint" in message
    assert isinstance(caught.value, UserError)
    # torch re-creates a worker's exception from its text alone; it must stay a UserError.
    assert isinstance(type(caught.value)(str(caught.value)), TooManyBadInputsError)


def test_all_volumes_unreadable_stops_without_looping(volumes, monkeypatch):
    dataset = make(volumes[:3], fraction=0.9)
    for path in volumes[:3]:
        truncate(path)
    reads = []
    original = dataset.record
    monkeypatch.setattr(dataset, "record", lambda index: reads.append(index) or original(index))
    with pytest.raises(TooManyBadInputsError, match="3 of 3") as caught:
        dataset[1]
    assert reads == [1, 2, 0]
    assert all(path in str(caught.value) for path in volumes[:3])


def test_error_lists_ten_files_then_a_count(tmp_path):
    bad = [InputVolumeError(tmp_path / f"f{i}.nii.gz", "the image cannot be read") for i in range(13)]
    message = str(too_many_bad_inputs(bad, 100, 0.1))
    assert "13 of 100" in message and "at most 10 volumes" in message
    assert "f9.nii.gz" in message and "f10.nii.gz" not in message and "and 3 more" in message


def test_worker_error_reaches_the_main_process_as_a_user_error(volumes):
    dataset = make(volumes[:2])
    truncate(volumes[0])
    batches = iter(DataLoader(dataset, batch_size=None, sampler=[0], num_workers=1))
    try:
        with pytest.raises(TooManyBadInputsError, match="train.max_bad_input_fraction") as caught:
            next(batches)
        # the worker's traceback is cut off: the entry point prints the message as its one line
        assert "Traceback" not in str(caught.value) and str(caught.value).startswith("1 of 2")
    finally:
        # The traceback keeps the loader alive in a reference cycle; left to the garbage
        # collector, its shutdown waits out torch's 5 s join timeout in some later test.
        batches._shutdown_workers()


class FailingAugmentation:
    def __init__(self, error):
        self.error = error

    def __call__(self, volume):
        raise self.error


@pytest.mark.parametrize("error", [ValueError("a bug in a crop"), EOFError("a read-like bug in a crop")])
def test_errors_after_the_read_propagate_unchanged(volumes, error):
    dataset = make(volumes[:4], fraction=0.5, augmentation=FailingAugmentation(error))
    with pytest.raises(type(error)) as caught:
        dataset[0]
    assert caught.value is error and not dataset.unreadable


@pytest.mark.parametrize("error", [
    RuntimeError("applying transform Orientationd"),  # a bug in the preprocessing, not a file problem
    OSError(errno.ENOSPC, "No space left on device", "/cache/preprocessing-x/a.pt"),
    PermissionError(errno.EACCES, "Permission denied", "/cache/preprocessing-x/a.pt"),  # the cache, not the input
])
def test_read_errors_that_are_not_about_the_file_propagate(volumes, monkeypatch, error):
    dataset = make(volumes[:4], fraction=0.5)

    def record(index):
        raise error

    monkeypatch.setattr(dataset, "record", record)
    with pytest.raises(type(error)) as caught:
        dataset[0]
    assert caught.value is error and not dataset.unreadable


def test_vanished_file_is_replaced(volumes, monkeypatch):
    dataset = make(volumes[:4], fraction=0.3)
    expected = sample_at(dataset, 3, position=1)
    original = dataset.record

    def record(index):  # a raw reader error, as a cache's own stat of the file raises it
        if index == 2:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", volumes[2])
        return original(index)

    monkeypatch.setattr(dataset, "record", record)
    assert same(sample_at(dataset, 2, position=1), expected)
    assert "cannot be read" in dataset.unreadable[2].problem or "does not exist" in dataset.unreadable[2].problem


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan"), "lots", True, None])
def test_fraction_out_of_range_is_rejected(volumes, value):
    with pytest.raises(ValueError, match="max_bad_input_fraction"):
        make(volumes[:1], fraction=value)


def test_build_reads_the_fraction_from_the_train_section(volumes):
    base = {"crops": SMALL, "preprocessing": NO_CACHE}
    build = lambda cfg: build_pretrain_dataset(cfg, volumes[:2], seed=0, rank=0, world_size=1)  # noqa: E731
    assert build({**base, "train": {"max_bad_input_fraction": 0.5}}).max_bad_fraction == 0.5
    assert build(OmegaConf.create({**base, "train": {"max_bad_input_fraction": 0.25}})).max_bad_fraction == 0.25
    assert build(base).max_bad_fraction == 0.05
    assert build(OmegaConf.create({**base, "train": {"seed": 0}})).max_bad_fraction == 0.05
    with pytest.raises(ValueError, match="max_bad_input_fraction"):
        build({**base, "train": {"max_bad_input_fraction": 2}})
