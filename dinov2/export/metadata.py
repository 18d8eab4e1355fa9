"""What an exported model expects, stored in its ONNX file: one JSON string in ``metadata_props``.

Key :data:`METADATA_KEY`; the value (``format_version`` 1)::

    {"format": "dinov2_3d_onnx", "format_version": 1, "kind": "segmentation" | "backbone",
     "input": {"name": "image", "layout": "BCHWD", "channels": C, "dynamic_batch": true,
               "dynamic_spatial": bool, "spatial_multiple": m, "example_size": [H, W, D]},
     "outputs": ["logits"] | ["cls_token", "patch_tokens"],
     "source": {"checkpoint": file name, "iteration": int | null, ...},
     # segmentation only: exactly what predict reads from best_model.pth
     "head": "UNETR" | "ViTAdapterUNETR" | "Linear" | "DinoUNet" | "DPT" | "UNetFusion",
     "preset": the checkpoint's dataset preset (DatasetPreset.from_config rebuilds it),
     "evaluation": the run's evaluation settings over the packaged defaults (overlap, blend, ...),
     "summary": the same, spelled out for other runtimes (never read back: derived from the two above)
     # backbone only
     "backbone": {"arch", "kwargs", "embed_dim", "patch_size", "num_register_tokens", "native_size"}}

ONNX Runtime shows it as ``session.get_modelmeta().custom_metadata_map[METADATA_KEY]``, so a
reader needs no ``onnx`` package.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from dinov2.eval.presets import DatasetPreset

from .errors import OnnxModelError
from .runtime import import_onnx

METADATA_KEY = "dinov2_3d"
FORMAT = "dinov2_3d_onnx"
FORMAT_VERSION = 1
KINDS = ("segmentation", "backbone")
# What a reader needs of each kind (the rest is for people and other runtimes).
REQUIRED = {"segmentation": ("input", "outputs", "head", "preset", "evaluation"),
            "backbone": ("input", "outputs", "backbone")}


def input_section(channels: int, example_size, dynamic_spatial: bool, spatial_multiple: int) -> dict:
    """The ``input`` entry: the one input ``image`` of shape ``(B, C, H, W, D)``."""
    return {"name": "image", "layout": "BCHWD", "channels": int(channels), "dynamic_batch": True,
            "dynamic_spatial": bool(dynamic_spatial), "spatial_multiple": int(spatial_multiple),
            "example_size": [int(s) for s in example_size]}


def preprocessing_summary(preset: DatasetPreset, evaluation: Mapping[str, Any]) -> dict:
    """What the preset and evaluation settings mean for a runtime without this toolkit."""
    return {
        "modalities": list(preset.modalities), "orientation": preset.orientation,
        "spacing_mm": list(preset.spacing), "intensity": dict(preset.intensity),
        "crop_foreground": preset.crop_foreground, "window": list(preset.roi_size),
        "channel_names": preset.channel_names, "multilabel": preset.multilabel,
        "activation": "sigmoid" if preset.multilabel else "softmax",
        "region_label_values": {k: list(v) for k, v in preset.regions.items()} if preset.multilabel else None,
        "overlap": evaluation["overlap"], "blend": evaluation["blend"],
    }


def segmentation_metadata(preset: DatasetPreset, info: Mapping[str, Any], evaluation: Mapping[str, Any],
                          io: Mapping[str, Any], checkpoint: str) -> dict:
    """Metadata of a finetuned segmenter.

    Args:
        preset: its dataset preset (``preset.raw`` is stored).
        info: the checkpoint dict without weights (:func:`dinov2.checkpoints.finetuned.load_finetuned`).
        evaluation: resolved evaluation settings (overlap, blend, sw_batch_size, ...).
        io: :func:`input_section`.
        checkpoint: the source file's name.
    """
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": "segmentation", "input": dict(io),
        "outputs": ["logits"], "head": info["head"], "preset": dict(preset.raw), "evaluation": dict(evaluation),
        "summary": preprocessing_summary(preset, evaluation),
        "source": {"checkpoint": checkpoint, "iteration": info.get("iteration"), "metric": info.get("metric")},
    }


def backbone_metadata(backbone, spec: Mapping[str, Any], io: Mapping[str, Any], checkpoint: str,
                      iteration: int | None) -> dict:
    """Metadata of a bare backbone (outputs: normalised CLS token and patch tokens).

    Args:
        backbone: the :class:`~dinov2.models.vision_transformer.VisionTransformer3D`.
        spec: ``{"arch": name or None, "kwargs": {...}}`` it was built with.
        io: :func:`input_section`.
        checkpoint: the source file's name.
        iteration: the training iteration stored in the checkpoint, if any.
    """
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": "backbone", "input": dict(io),
        "outputs": ["cls_token", "patch_tokens"],
        "backbone": {"arch": spec.get("arch"), "kwargs": dict(spec.get("kwargs") or {}),
                     "embed_dim": backbone.embed_dim, "patch_size": backbone.patch_size,
                     "num_register_tokens": backbone.num_register_tokens, "native_size": list(backbone.img_size)},
        "source": {"checkpoint": checkpoint, "iteration": iteration},
    }


def dumps(metadata: Mapping[str, Any]) -> str:
    """The JSON string stored in the file (strict: no NaN, sorted keys for stable files)."""
    return json.dumps(metadata, sort_keys=True, allow_nan=False, default=_plain)


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} cannot be stored in ONNX metadata")


def write_metadata(path: str | os.PathLike, metadata: Mapping[str, Any]) -> None:
    """Store ``metadata`` under :data:`METADATA_KEY` in the ONNX file at ``path`` (other entries kept)."""
    onnx = import_onnx()
    # External weights (models over 2 GB) stay where they are: only the graph file is rewritten.
    model = onnx.load(os.fspath(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    props[METADATA_KEY] = dumps(metadata)
    onnx.helper.set_model_props(model, props)
    onnx.save(model, os.fspath(path))


def parse_metadata(props: Mapping[str, str], path: str | os.PathLike) -> dict:
    """The metadata of an exported model from its ``metadata_props`` (or ORT's ``custom_metadata_map``).

    Raises:
        OnnxModelError: no entry of ours, not JSON, another format, or a newer ``format_version``.
    """
    text = props.get(METADATA_KEY)
    if text is None:
        raise OnnxModelError(f"{path} is an ONNX model without dinov2 metadata (preprocessing, classes): export the "
                             "model with python -m dinov2.export --checkpoint best_model.pth --format onnx.")
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OnnxModelError(f"{path}: its dinov2 metadata is not valid JSON ({exc.msg}); export it again.") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT or metadata.get("kind") not in KINDS:
        raise OnnxModelError(f"{path}: its '{METADATA_KEY}' metadata is not of format '{FORMAT}'; export it again.")
    version = metadata.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise OnnxModelError(f"{path} has metadata format_version {version}; this toolkit reads up to "
                             f"{FORMAT_VERSION}. Update the toolkit.")
    missing = [key for key in REQUIRED[metadata["kind"]] if key not in metadata]
    if missing:
        raise OnnxModelError(f"{path}: its dinov2 metadata lacks {', '.join(missing)}; export the model again.")
    return metadata


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of the ONNX file at ``path`` (with the ``onnx`` package; see :func:`parse_metadata`)."""
    onnx = import_onnx()
    model = onnx.load(os.fspath(path), load_external_data=False)
    return parse_metadata({p.key: p.value for p in model.metadata_props}, path)


def preset_from_metadata(metadata: Mapping[str, Any]) -> DatasetPreset:
    """The :class:`DatasetPreset` of a segmentation export (as ``load_finetuned`` rebuilds it)."""
    return DatasetPreset.from_config(metadata["preset"])
