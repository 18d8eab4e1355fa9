"""Fixtures shared by every test folder."""

import pytest
import torch


@pytest.fixture()
def one_thread():
    """Run a test on one intra-op thread, restored afterwards.

    The tests' models and tensors are tiny: a second thread gains little, and on a loaded
    2-core machine OpenMP threads waiting for each other made the same tests about 10x slower.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def lobe_data(tmp_path_factory):
    """The brain-lobe classification sample at a stride of 8 voxels (~300 test patches of 16^3; the
    default stride 4 gives ~2200), written once for the session: its datalist.json path."""
    from dinov2.sample_data.classification import PatchTaskParams, write_classification_dataset

    return write_classification_dataset(tmp_path_factory.mktemp("lobes"), PatchTaskParams(stride=8, seed=0))


@pytest.fixture(autouse=True)
def _no_debug_environment(monkeypatch):
    """Tests see the commands' default error handling even where ``DINOV2_DEBUG`` is set."""
    monkeypatch.delenv("DINOV2_DEBUG", raising=False)


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """The pre-flight cache (and any other user cache) of the tests lives in a temporary folder,
    never in the user's ~/.cache."""
    import os

    previous = os.environ.get("DINOV2_CACHE_DIR")
    os.environ["DINOV2_CACHE_DIR"] = str(tmp_path_factory.mktemp("dinov2_cache"))
    yield
    if previous is None:
        os.environ.pop("DINOV2_CACHE_DIR", None)
    else:
        os.environ["DINOV2_CACHE_DIR"] = previous


@pytest.fixture()
def error_line(capsys):
    """Read what an entry point printed to stderr and return its one ``ERROR:`` line.

    Asserts the entry-point contract for a user error: exactly one stderr line starts with
    ``ERROR:``, and no traceback was printed. (Other stderr lines, e.g. progress bars, may be there.)
    """

    def read(only: bool = False) -> str:
        """``only``: the ERROR line must be all of stderr."""
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.startswith("ERROR:")]
        assert len(lines) == 1, err
        if only:
            assert err.strip().splitlines() == lines, err
        return lines[0]

    return read


@pytest.fixture(scope="session")
def crop_sample_volume(tmp_path_factory):
    """``crop_sample_volume(name, side)``: the installed sample volume ``name`` (else the first 3D one
    with every side >= ``side``) cropped to ``side``^3 voxels at its centre, saved as float32 NIfTI
    with its affine kept right; returns the path."""
    import nibabel as nib
    import numpy as np

    from dinov2.sample_data import find_pretraining_volumes

    def make(name: str, side: int, filename: str):
        volumes = find_pretraining_volumes()
        source = next((p for p in volumes if p.name == name), None)
        source = source or next(p for p in volumes if len(nib.load(p).shape) == 3 and min(nib.load(p).shape) >= side)
        image = nib.load(source)
        start = [(s - side) // 2 for s in image.shape[:3]]
        cropped = image.slicer[tuple(slice(a, a + side) for a in start)]
        path = tmp_path_factory.mktemp("volume") / filename
        nib.save(nib.Nifti1Image(np.asarray(cropped.dataobj, dtype=np.float32), cropped.affine), path)
        return path

    return make


@pytest.fixture(scope="session")
def make_batch():
    """``make_batch(cfg, batch_size=4, seed=0, mask_probability=None)``: a collated pretraining batch
    of random crops, on the CPU as a loader gives it (``collate_data_and_cast``'s dict: global crops
    ``(2 * batch_size, 1, g, g, g)``, local crops ``(n_local * batch_size, 1, l, l, l)`` or None
    without local crops, iBOT masks).

    Sizes, crop count and masking come from ``cfg`` (a pretraining config); ``mask_probability``
    replaces ``ibot.mask_sample_probability`` (0.0: no masked token). The same ``seed`` gives the
    same batch. Shared by the CPU SSLMetaArch tests and the CUDA tests.
    """
    import numpy as np

    from dinov2.data.collate import collate_data_and_cast

    def make(cfg, batch_size: int = 4, seed: int = 0, mask_probability: float | None = None) -> dict:
        gen = torch.Generator().manual_seed(seed)
        g, l, n_local = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
        samples = [{"global_crops": [torch.randn(1, g, g, g, generator=gen) for _ in range(2)],
                    "local_crops": [torch.randn(1, l, l, l, generator=gen) for _ in range(n_local)]}
                   for _ in range(batch_size)]
        side = g // cfg.student.patch_size
        p = cfg.ibot.mask_sample_probability if mask_probability is None else mask_probability
        return collate_data_and_cast(samples, tuple(cfg.ibot.mask_ratio_min_max), p, (side,) * 3,
                                     rng=np.random.default_rng(seed))

    return make
