"""Frozen-backbone features of classification volumes, computed once and cached on disk.

Per volume the cache keeps what every linear head of the grid needs: the normalised CLS token
and the mean of the normalised patch tokens of each of the last ``n`` blocks. A head using fewer
blocks takes the trailing ones, so one extraction serves the whole grid.

Input preparation reuses the pretraining preprocessing of :mod:`dinov2.data.transforms`
(non-finite repair, in-plane axis order, robust intensity scaling to ``[-1, 1]``, foreground
crop; all set by the dataset's ``preprocessing`` section), then resizes to the probe's input
size, so features see the intensities the backbone was trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from monai.transforms import Resize
from monai.utils import convert_to_tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dinov2.data.transforms import build_preprocessing, resolve_preprocessing_config
from dinov2.layers.patch_embed import to_3tuple
from dinov2.utils.cpus import cap_workers

logger = logging.getLogger(__name__)

# Bump when the stored content or its meaning changes, so stale caches are not read.
FEATURE_CACHE_VERSION = 2  # 2: the mean patch token of every kept block, not only the last


@dataclass
class FeatureSet:
    """Backbone features of one split.

    Attributes:
        cls_tokens: float32 ``(N, n_blocks, E)``: normalised CLS token of each of the last
            ``n_blocks`` blocks, the last block last.
        patch_mean: float32 ``(N, n_blocks, E)``: mean of each of those blocks' normalised patch
            tokens, the last block last.
        labels: int64 ``(N,)`` class indices.
        images: the ``N`` image paths (a list per entry for multi-modal inputs).
    """

    cls_tokens: torch.Tensor
    patch_mean: torch.Tensor
    labels: torch.Tensor
    images: list

    def __post_init__(self):
        n = self.labels.shape[0]
        shapes_ok = self.cls_tokens.ndim == 3 and self.cls_tokens.shape[0] == n
        if not shapes_ok or self.patch_mean.shape != self.cls_tokens.shape:
            raise ValueError(f"Inconsistent feature shapes: cls {tuple(self.cls_tokens.shape)}, patch mean "
                             f"{tuple(self.patch_mean.shape)}, labels {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to_dict(self) -> dict:
        return {"cls_tokens": self.cls_tokens, "patch_mean": self.patch_mean, "labels": self.labels,
                "images": self.images}


class ClassificationVolumes(Dataset):
    """Datalist entries ``{"image", "label": int}`` as backbone inputs.

    Args:
        entries: finetuning entries with absolute ``image`` paths (one path, or one per modality)
            and an integer ``label``.
        preprocessing: ``preprocessing`` mapping of :func:`dinov2.data.transforms.build_preprocessing`.
        image_size: input size of the backbone (int or 3 ints); volumes are resized to it.
        in_chans: channels the backbone expects.

    Items are ``(image (in_chans, H, W, D) float32, label)``. A 4D series given as one file with
    a single-channel backbone contributes its first frame (and a warning, once).
    """

    def __init__(self, entries: Sequence[Mapping[str, Any]], preprocessing: Mapping[str, Any] | None,
                 image_size: int | Sequence[int], in_chans: int = 1):
        bad = [i for i, e in enumerate(entries)
               if isinstance(e.get("label"), bool) or not isinstance(e.get("label"), int)]
        if bad:
            raise ValueError(f"Classification entries need an integer 'label'; entries {bad[:5]} have "
                             f"{[entries[i].get('label') for i in bad[:5]]}. Use a classification datalist.")
        self.entries = list(entries)
        self.transform = build_preprocessing(preprocessing)
        self.image_size = to_3tuple(image_size)
        self.resize = Resize(spatial_size=self.image_size, mode="trilinear")
        self.in_chans = in_chans
        self._warned_frames = False

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        entry = self.entries[index]
        volume = self.transform({"image": entry["image"]})["image"].float()
        channels = volume.shape[0]
        if channels != self.in_chans:
            if self.in_chans == 1 and not isinstance(entry["image"], list):
                if not self._warned_frames:
                    logger.warning("%s has %d frames; the single-channel backbone sees its first frame "
                                   "(further series are handled the same way).", entry["image"], channels)
                    self._warned_frames = True
                volume = volume[:1]
            else:
                raise ValueError(f"{entry['image']}: {channels} channels/modalities but the backbone takes "
                                 f"{self.in_chans}; give one file per modality matching the pretraining channels.")
        if tuple(volume.shape[1:]) != self.image_size:
            volume = self.resize(volume)
        # A plain tensor: MetaTensors carry per-volume metadata that MONAI refuses to batch when it
        # differs between items (which happened once other MONAI pipelines had run in the process).
        return convert_to_tensor(volume, track_meta=False).float().contiguous(), int(entry["label"])


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader: DataLoader, n_last_blocks: int,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the frozen backbone over a loader.

    Args:
        model: a :class:`dinov2.models.VisionTransformer3D` (put in eval mode here).
        loader: yields ``(images (B, C, H, W, D), labels (B,))``.
        n_last_blocks: how many trailing blocks' CLS and mean patch tokens to keep.
        device: where the backbone runs.

    Returns:
        ``(cls_tokens (N, n_last_blocks, E), patch_mean (N, n_last_blocks, E), labels (N,))`` on
        the CPU.
    """
    model.eval()
    cls_parts, mean_parts, label_parts = [], [], []
    # Thousands of patches through a large backbone take minutes: show rate and ETA.
    for images, labels in tqdm(loader, desc="features", unit="batch", leave=False, dynamic_ncols=True):
        outputs = model.get_intermediate_layers(images.to(device), n=n_last_blocks, return_class_token=True, norm=True)
        cls_parts.append(torch.stack([cls for _, cls in outputs], dim=1).float().cpu())
        mean_parts.append(torch.stack([patches.mean(dim=1) for patches, _ in outputs], dim=1).float().cpu())
        label_parts.append(torch.as_tensor(labels, dtype=torch.long))
    if not cls_parts:
        raise ValueError("No volume to extract features from (empty split).")
    return torch.cat(cls_parts), torch.cat(mean_parts), torch.cat(label_parts)


def model_fingerprint(model: torch.nn.Module) -> str:
    """Short hash of a few parameters (CLS token, position embedding, final norm): tells apart two
    checkpoints saved at the same path without hashing every weight."""
    h = hashlib.sha256()
    state = model.state_dict()
    for name in ("cls_token", "pos_embed", "norm.weight", "norm.bias"):
        if name in state:
            h.update(name.encode())
            h.update(state[name].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _checkpoint_identity(checkpoint: str | os.PathLike | None, model: torch.nn.Module) -> list:
    if checkpoint is None:
        return ["random_init", [[k, list(v.shape)] for k, v in model.state_dict().items()]]
    path = Path(checkpoint).resolve()
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def feature_cache_key(checkpoint: str | os.PathLike | None, model: torch.nn.Module, entries: Sequence[Mapping[str, Any]],
                      preprocessing: Mapping[str, Any] | None, image_size: int | Sequence[int],
                      n_last_blocks: int) -> str:
    """Hash of everything that changes the features of a split.

    Args:
        checkpoint: backbone file (its resolved path, size and modification time enter the key), or
            None for a random-init backbone (then every tensor shape enters the key: the fingerprint
            alone would not tell apart two depths drawn from the same seed).
        model: the loaded backbone (:func:`model_fingerprint` enters the key).
        entries: the split's entries (images and labels, in order).
        preprocessing: the dataset's preprocessing section.
        image_size: backbone input size.
        n_last_blocks: trailing blocks whose CLS and mean patch tokens are kept.

    Returns:
        20 hex characters.
    """
    payload = {
        "version": FEATURE_CACHE_VERSION,
        "checkpoint": _checkpoint_identity(checkpoint, model),
        "model": model_fingerprint(model),
        "entries": [[e["image"], e["label"]] for e in entries],
        "preprocessing": resolve_preprocessing_config(preprocessing),
        "image_size": list(to_3tuple(image_size)),
        "n_last_blocks": int(n_last_blocks),
    }
    payload["preprocessing"].pop("cache")  # where the pretraining cache lives does not change features
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def load_or_extract_features(model: torch.nn.Module, entries: Sequence[Mapping[str, Any]], *, split: str,
                             checkpoint: str | os.PathLike | None, cache_dir: str | os.PathLike | None,
                             preprocessing: Mapping[str, Any] | None, image_size: int | Sequence[int],
                             n_last_blocks: int, batch_size: int = 8, num_workers: int = 0,
                             device: torch.device | str = "cpu") -> FeatureSet:
    """Features of one split, read from ``cache_dir`` when an identical extraction was cached.

    Args:
        model: the frozen backbone.
        entries: the split's entries (``image`` absolute, ``label`` int).
        split: name used in the cache file name and in logs.
        checkpoint: the backbone's file (part of the cache key); None for a random-init backbone.
        cache_dir: folder of ``<split>_<key>.pt`` files; None disables caching.
        preprocessing, image_size, n_last_blocks: see :func:`feature_cache_key`.
        batch_size, num_workers: of the extraction loader (workers capped at the CPUs available).
        device: where the backbone runs.

    Returns:
        The split's :class:`FeatureSet`.
    """
    if batch_size < 1 or num_workers < 0 or n_last_blocks < 1:
        raise ValueError(f"batch_size >= 1, num_workers >= 0 and n_last_blocks >= 1 required, got "
                         f"{batch_size}, {num_workers}, {n_last_blocks}")
    cache_file = None
    if cache_dir is not None:
        key = feature_cache_key(checkpoint, model, entries, preprocessing, image_size, n_last_blocks)
        cache_file = Path(cache_dir) / f"{split}_{key}.pt"
        if cache_file.is_file():
            logger.info("Features of %s (%d volumes) read from the cache %s.", split, len(entries), cache_file)
            return FeatureSet(**torch.load(cache_file, map_location="cpu", weights_only=True))
    dataset = ClassificationVolumes(entries, preprocessing, image_size, in_chans=getattr(model, "in_chans", 1))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        num_workers=cap_workers(num_workers, "features.num_workers"))
    cls_tokens, patch_mean, labels = extract_features(model, loader, n_last_blocks, device)
    features = FeatureSet(cls_tokens, patch_mean, labels, [e["image"] for e in entries])
    logger.info("Extracted features of %s: %d volumes, CLS %s.", split, len(features), tuple(cls_tokens.shape))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        torch.save(features.to_dict(), tmp)
        os.replace(tmp, cache_file)  # a crash mid-write never leaves a half cache file behind
    return features
