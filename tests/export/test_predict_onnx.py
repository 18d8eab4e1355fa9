"""``predict --model model.onnx`` writes the label maps ``predict --checkpoint best_model.pth`` writes.

Both runs go through the whole command (preprocessing from the checkpoint or from the ONNX
metadata, sliding windows, inversion to the input's space). The probabilities each run turns into
labels are recorded: they agree within 1e-4, and the label maps agree on every voxel that is not a
float tie (top two probabilities within 1e-4; the two runtimes round differently, so a tie of
random tiny models may fall either way).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from dinov2.eval.segmentation import inference, predict

pytestmark = pytest.mark.usefixtures("one_thread")

TIE = 1e-4


def run_predict(flag: str, model, volume, out, monkeypatch) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """Label map, the probabilities it was decided from ``(K, X, Y, Z)``, and the affine written."""
    seen = []
    decide = inference.labels_from_probabilities

    def record(probs, preset):
        seen.append(probs.clone())
        return decide(probs, preset)

    monkeypatch.setattr(inference, "labels_from_probabilities", record)
    assert predict.main([flag, str(model), "--input", str(volume), "--output", str(out), "--device", "cpu",
                         "--no-preview"]) == 0
    (written,) = out.iterdir()
    image = nib.load(written)
    return np.asarray(image.dataobj), seen[0], image.affine


@pytest.mark.parametrize("head", ["UNETR", "ViTAdapterUNETR"])
def test_predict_with_the_onnx_model_gives_the_same_label_map(head, finetuned, exported, real_volume, tmp_path,
                                                              monkeypatch):
    expected, torch_probs, affine = run_predict("--checkpoint", finetuned[head], real_volume, tmp_path / "t",
                                                monkeypatch)
    labels, onnx_probs, onnx_affine = run_predict("--model", exported[head], real_volume, tmp_path / "o",
                                                  monkeypatch)
    assert (tmp_path / "o" / real_volume.name.replace(".nii.gz", "_seg.nii.gz")).is_file()
    np.testing.assert_array_equal(onnx_affine, affine)
    assert labels.shape == expected.shape == (32, 32, 32) and len(np.unique(expected)) > 1
    assert (onnx_probs - torch_probs).abs().max() <= 1e-4
    top2 = torch_probs.topk(2, dim=0).values
    ties = (top2[0] - top2[1]).numpy() <= TIE
    np.testing.assert_array_equal(labels[~ties], expected[~ties])
    assert ties.mean() < 0.01  # the comparison covers (almost) the whole volume


def test_precision_and_device_do_not_apply_to_the_onnx_model(exported, real_volume, tmp_path, caplog):
    args = ["--model", str(exported["Linear"]), "--input", str(real_volume), "--output", str(tmp_path),
            "--device", "cpu", "--precision", "bf16", "--no-preview"]
    assert predict.main(args) == 0
    assert "--precision bf16 applies to --checkpoint only" in caplog.text
