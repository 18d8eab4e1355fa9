"""Export a finetuned segmenter or a bare backbone to ONNX, checked against PyTorch before it is kept.

What exports, and which input sizes the graph takes (``B`` is dynamic everywhere):

=====================  ======================================  =====================================
checkpoint             outputs                                 spatial size ``H, W, D``
=====================  ======================================  =====================================
teacher (backbone)     ``cls_token (B, E)``,                   any multiples of the patch size
                       ``patch_tokens (B, N, E)`` (final norm)
UNETR, Linear,         ``logits (B, K, H, W, D)``              any multiples of the patch size
UNetFusion heads
DPT head               ``logits (B, K, H, W, D)``              any multiples of ``lcm(32, p)``
ViTAdapterUNETR,       ``logits (B, K, H, W, D)``              fixed: the training window
DinoUNet heads
=====================  ======================================  =====================================

The adapter's deformable attention (ViTAdapterUNETR, DinoUNet) turns its feature-pyramid sizes
into Python numbers (level sizes, reference-point grids, split sizes), which any trace fixes;
prediction only ever feeds it windows of the training size, so the graph takes that size and
ONNX Runtime refuses others. A head not listed in :data:`SIZE_FREE_HEADS` is exported the same
way. A free-size graph's sides must be multiples of :func:`spatial_multiple` (the patch, or the
head's own requirement where it is stricter: DPT's 1/32 level).

Exporter: the TorchScript tracer (``dynamo=False``). Both exporters handle every head with a
dynamic batch; on the tiny test models the dynamo exporter took 5-76 s per export against
0.3-4 s, needs an example batch of 2 (it specialises a batch of 1), and it also fixed the
adapter's spatial size without a word, so it brought nothing here. The tracer fixes every size
computed in Python, which is why the position embedding is traced through
:mod:`dinov2.export.positional` and every written graph is compared with PyTorch at a second
batch (and spatial) size before the file is kept: a graph that differs is never written.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from dinov2.checkpoints.layouts import FINETUNED_SEGMENTATION_FORMAT, load_torch_file
from dinov2.models.vision_transformer import VisionTransformer3D
from dinov2.utils.errors import UsageError, UserError

from .errors import ExportError
from .metadata import backbone_metadata, input_section, segmentation_metadata, write_metadata
from .positional import traceable_position_embedding
from .runtime import cpu_session, import_onnx, import_onnxruntime

logger = logging.getLogger(__name__)

# GridSample on 5D volumes (the adapter's deformable attention) exists from opset 20 on.
OPSET = 20
INPUT = "image"
# Heads whose graph was checked to take any window size (tests/export); any other head is exported
# for its training window, which is all sliding-window prediction feeds it.
SIZE_FREE_HEADS = ("UNETR", "Linear", "DPT", "UNetFusion")
# Largest |ONNX - PyTorch| accepted, relative to the largest |PyTorch output| (at least 1). Float
# rounding stays far below; a size fixed by the trace gives differences of order 1.
VERIFY_TOLERANCE = 1e-3
CHECKPOINT_EXPECTED = ("a best_model.pth of python -m dinov2.eval.segmentation or a teacher_checkpoint.pth of "
                       "pretraining")


class BackboneTokens(nn.Module):
    """A backbone as an export: ``(B, C, H, W, D)`` → ``cls_token (B, E)``, ``patch_tokens (B, N, E)``.

    Both after the final LayerNorm (``x_norm_clstoken`` / ``x_norm_patchtokens`` of
    ``forward_features``); ``N = (H/p)(W/p)(D/p)`` with ``D/p`` fastest.
    """

    def __init__(self, backbone: VisionTransformer3D):
        super().__init__()
        self.backbone = backbone

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W, D)`` → ``(B, E)``, ``(B, N, E)``."""
        out = self.backbone.forward_features(image)
        return out["x_norm_clstoken"], out["x_norm_patchtokens"]


@dataclass
class ExportPlan:
    """What to trace and how.

    Attributes:
        module: traced in eval mode; its outputs are :attr:`outputs`.
        backbone: the ViT inside (its position embedding is traced differently).
        example: ``(2, C, *size)``, the trace's input.
        outputs: output names.
        dynamic_spatial: whether ``H, W, D`` are free (multiples of :attr:`spatial_multiple`).
        spatial_multiple: what every spatial side must be a multiple of.
        metadata: stored with the graph (:mod:`dinov2.export.metadata`).
        what: the model in words, for messages.
    """

    module: nn.Module
    backbone: VisionTransformer3D
    example: torch.Tensor
    outputs: list[str]
    dynamic_spatial: bool
    spatial_multiple: int
    metadata: dict = field(repr=False)
    what: str = ""


def _read_kind(path: str | os.PathLike) -> tuple[Path, bool]:
    """The checkpoint's path and whether it is a finetuned segmenter (else it is read as a backbone).

    Reads the file once more than the loaders do: export is a one-off, and the loaders take paths.
    """
    path, obj = load_torch_file(path, "cpu", True, expected=CHECKPOINT_EXPECTED,
                                hint="Check the path given with --checkpoint.")
    return path, isinstance(obj, Mapping) and obj.get("format") == FINETUNED_SEGMENTATION_FORMAT


def _example(channels: int, size) -> torch.Tensor:
    # Batch 2: the exported batch axis is then seen as a variable by the trace, never as 1.
    return torch.rand(2, channels, *size, generator=torch.Generator().manual_seed(0))


def spatial_multiple(model: nn.Module) -> int:
    """What every window side of a segmenter must be a multiple of: the patch, or the head's own
    ``multiple`` where it has one (DPT: ``lcm(32, p)``; DinoUNet: ``lcm(16, p)``)."""
    return math.lcm(model.backbone.patch_size, int(getattr(model.head, "multiple", 1)))


def segmentation_plan(path: Path) -> ExportPlan:
    """The plan for ``best_model.pth``: its model, window size and metadata (what predict reads)."""
    from omegaconf import OmegaConf  # noqa: PLC0415

    from dinov2.checkpoints.finetuned import load_finetuned  # noqa: PLC0415
    from dinov2.utils.config import with_packaged_defaults  # noqa: PLC0415

    model, preset, info = load_finetuned(path)
    # The same evaluation settings predict derives from the checkpoint, resolved now, so the file
    # does not depend on a later toolkit's packaged defaults.
    evaluation = OmegaConf.to_container(with_packaged_defaults(
        "evaluation", info["config"].get("evaluation", {}), default="eval/segmentation_default"), resolve=True)
    dynamic, multiple = model.head_name in SIZE_FREE_HEADS, spatial_multiple(model)
    io = input_section(preset.in_channels, preset.roi_size, dynamic, multiple)
    return ExportPlan(model.eval(), model.backbone, _example(preset.in_channels, preset.roi_size), ["logits"], dynamic,
                      multiple, segmentation_metadata(preset, info, evaluation, io, path.name),
                      f"{model.head_name} segmenter")


def backbone_plan(path: Path) -> ExportPlan:
    """The plan for a teacher (or any backbone) checkpoint: CLS and patch tokens at its native size."""
    from dinov2.checkpoints.backbone_reader import load_pretrained_backbone  # noqa: PLC0415

    backbone, report = load_pretrained_backbone(path)
    kwargs = dict(report.model_kwargs)
    spec = {"arch": kwargs.pop("arch", None), "kwargs": kwargs}
    io = input_section(backbone.in_chans, backbone.img_size, True, backbone.patch_size)
    return ExportPlan(BackboneTokens(backbone).eval(), backbone, _example(backbone.in_chans, backbone.img_size),
                      ["cls_token", "patch_tokens"], True, backbone.patch_size,
                      backbone_metadata(backbone, spec, io, path.name, report.iteration), "backbone")


def plan_export(checkpoint: str | os.PathLike) -> ExportPlan:
    """Read ``checkpoint`` (finetuned segmenter or backbone) and plan its export.

    Raises:
        FileNotFoundError, CheckpointError: no such file, or not a checkpoint of either kind.
    """
    path, finetuned = _read_kind(checkpoint)
    return segmentation_plan(path) if finetuned else backbone_plan(path)


def dynamic_axes(plan: ExportPlan) -> dict[str, dict[int, str]]:
    """``torch.onnx.export``'s ``dynamic_axes``: batch everywhere, spatial axes where the model allows."""
    image = {0: "batch", 2: "height", 3: "width", 4: "depth"} if plan.dynamic_spatial else {0: "batch"}
    if plan.outputs == ["logits"]:
        return {INPUT: image, "logits": image}
    tokens = {0: "batch", 1: "tokens"} if plan.dynamic_spatial else {0: "batch"}
    return {INPUT: image, "cls_token": {0: "batch"}, "patch_tokens": tokens}


def trace_to_onnx(plan: ExportPlan, target: Path) -> None:
    """Trace ``plan.module`` on its example and write the graph to ``target``.

    Raises:
        ExportError: the tracer or the ONNX conversion failed (one line: the model and why).
    """
    try:
        with traceable_position_embedding(plan.backbone), torch.no_grad(), warnings.catch_warnings():
            # TracerWarnings name sizes the trace fixes; verify_export checks what they warn about.
            warnings.simplefilter("ignore")
            torch.onnx.export(plan.module, (plan.example,), os.fspath(target), dynamo=False, opset_version=OPSET,
                              input_names=[INPUT], output_names=plan.outputs, dynamic_axes=dynamic_axes(plan))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the exporter raises, the user gets one line
        raise ExportError(f"The {plan.what} cannot be exported to ONNX ({type(exc).__name__}: "
                          f"{_first_line(exc)}); nothing was written.") from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def verification_inputs(plan: ExportPlan) -> list[torch.Tensor]:
    """The example (batch 2) and a batch of 1, at another size on two axes where the model allows.

    The first axis grows by one multiple, the second keeps its size (an axis the position
    embedding copies), the third shrinks by one (or grows by two when it is a single multiple).
    """
    size = list(plan.example.shape[2:])
    if plan.dynamic_spatial:
        m = plan.spatial_multiple
        size = [size[0] + m, size[1], size[2] - m if size[2] > m else size[2] + 2 * m]
    second = torch.rand(1, plan.example.shape[1], *size, generator=torch.Generator().manual_seed(1))
    return [plan.example, second]


def verify_export(plan: ExportPlan, path: Path) -> list[dict]:
    """Run the graph with ONNX Runtime (CPU) on :func:`verification_inputs` and compare with PyTorch.

    Returns:
        Per input ``{"shape", "max_abs_diff"}``.

    Raises:
        ExportError: the graph fails on an input, or differs by more than :data:`VERIFY_TOLERANCE`.
    """
    session = cpu_session(path)
    results = []
    for image in verification_inputs(plan):
        with torch.no_grad():
            reference = plan.module(image)
        reference = reference if isinstance(reference, tuple) else (reference,)
        try:
            outputs = session.run(plan.outputs, {INPUT: image.numpy()})
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's errors are one class per status code
            raise ExportError(f"The ONNX export of the {plan.what} fails on an input of shape {list(image.shape)} "
                              f"({_first_line(exc)}); nothing was written.") from exc
        shapes, expected = [list(o.shape) for o in outputs], [list(r.shape) for r in reference]
        if shapes != expected:  # checked first: broadcasting would compare the wrong voxels
            raise ExportError(f"The ONNX export of the {plan.what} returns shapes {shapes} for an input of shape "
                              f"{list(image.shape)}, PyTorch {expected}; nothing was written.")
        diff = max(float((torch.from_numpy(o) - r).abs().max()) for o, r in zip(outputs, reference))
        scale = max(1.0, max(float(r.abs().max()) for r in reference))
        if not diff <= VERIFY_TOLERANCE * scale:
            raise ExportError(f"The ONNX export of the {plan.what} does not reproduce PyTorch on an input of shape "
                              f"{list(image.shape)} (max abs difference {diff:.3g}); nothing was written.")
        results.append({"shape": list(image.shape), "max_abs_diff": diff})
    return results


def check_output_path(output: str | os.PathLike) -> Path:
    """``output`` as a path, after checking its name and that its folder can be written (created if missing).

    Raises:
        UsageError: not a ``.onnx`` name, a folder, or a folder that cannot be written.
    """
    path = Path(output)
    if path.suffix != ".onnx":
        raise UsageError(f"--output {path}: name the file with the .onnx suffix (e.g. model.onnx).")
    if path.is_dir():
        raise UsageError(f"--output {path} is a folder; name the file to write, e.g. {path / 'model.onnx'}.")
    probe = path.with_name(f".{path.name}.{os.getpid()}.probe")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--output {path}: cannot write in the folder {path.parent} ({exc.strerror or exc}); "
                         "choose a writable folder.") from exc
    return path


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike) -> tuple[Path, dict]:
    """Export ``checkpoint`` to ONNX at ``output``, with its metadata, verified against PyTorch.

    The graph is written under a temporary name in the output folder and renamed only when
    everything succeeded: a failed export leaves no file.

    Args:
        checkpoint: ``best_model.pth`` (finetuned segmenter) or a teacher / backbone checkpoint.
        output: the ``.onnx`` file.

    Returns:
        ``(written path, metadata)``.

    Raises:
        FileNotFoundError, CheckpointError: the checkpoint. UsageError: the output path.
        MissingExportDependency: onnx / onnxruntime not installed. ExportError: not exportable.
    """
    target = check_output_path(output)
    onnx = import_onnx()
    import_onnxruntime()  # both before a large checkpoint is read
    plan = plan_export(checkpoint)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial.onnx")
    try:
        trace_to_onnx(plan, tmp)
        checks = verify_export(plan, tmp)
        metadata = {**plan.metadata, "export": {"torch": torch.__version__, "opset": OPSET,
                                                "exporter": "torch.onnx (TorchScript)", "verified": checks}}
        write_metadata(tmp, metadata)
        onnx.checker.check_model(os.fspath(tmp))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("%s exported to %s (batch dynamic, spatial %s); ONNX Runtime vs PyTorch max abs difference %s",
                plan.what, target, "dynamic" if plan.dynamic_spatial else f"fixed at {list(plan.example.shape[2:])}",
                ", ".join(f"{c['max_abs_diff']:.1e} at {c['shape']}" for c in checks))
    return target, metadata
