"""The notebooks run top to bottom on the packaged brain data, and are stored without outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dinov2.checkpoints.teacher_export import save_teacher_checkpoint
from dinov2.models import build_model

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("basic_model_use.ipynb", "unsupervised_vis.ipynb")
INSTALL = "pip install -r requirements-notebooks.txt"

try:
    import nbformat
    from nbclient import NotebookClient
except ImportError as exc:  # a missing test dependency must fail loudly, not skip quietly
    raise ImportError(f"Executing the notebooks needs nbclient, nbformat and ipykernel: {INSTALL}") from exc


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cell"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, (
            f"{name} stores outputs; clear them before committing (e.g. jupyter nbconvert --clear-output)")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random vit_tiny_3d (8^3 patches) saved as a teacher checkpoint, standing in for the demo's."""
    torch.manual_seed(0)
    model = build_model("vit_tiny_3d", patch_size=8, img_size=32)
    config = {"student": {"arch": "vit_tiny_3d", "patch_size": 8}, "crops": {"global_crops_size": 32}}
    path = tmp_path_factory.mktemp("ckpt") / "teacher_checkpoint.pth"
    return save_teacher_checkpoint(path, {f"backbone.{k}": v for k, v in model.state_dict().items()}, config, 0)


@pytest.mark.parametrize("name,produced", [("basic_model_use.ipynb", "nearest_patches.png"),
                                           ("unsupervised_vis.ipynb", "pca/summary.json")])
def test_notebook_executes(name, produced, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("DINOV2_CHECKPOINT", str(tiny_checkpoint))
    monkeypatch.setenv("DINOV2_NOTEBOOK_OUTPUT", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny model: extra threads only contend on a small machine
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError with the failing cell and traceback
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert (tmp_path / produced).is_file()
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{name} displayed no image"
