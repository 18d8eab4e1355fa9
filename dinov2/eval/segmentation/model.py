"""The finetuning model: a 3D ViT backbone, a segmentation head, and the multi-modal merge.

Parameter names: backbone ``backbone.*`` (so :func:`dinov2.optim.param_groups.get_param_groups`
applies layer-wise LR decay to it), head ``head.*``, modality merge ``merge.*``.

Several modalities with a single-channel backbone (the usual case: 3DINO backbones are
pretrained on one channel): every modality goes through the backbone on its own (as extra batch
entries) and the features of each tap are merged (``concat``: a learned 1×1×1 convolution over
the concatenated modalities, initialised to their mean; ``mean``: the plain average). The heads'
own convolutional paths see all channels of the image.

How a head is fed: one that ``drives_backbone`` (ViTAdapterUNETR, DinoUNet) gets the model itself
as its backbone interface and runs the blocks in stages; every other head gets the 4 tapped maps of
:meth:`SegmentationModel.features`, with each tap's CLS token when it ``needs_cls`` (DPT with an
``add`` / ``project`` read-out).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from dinov2.checkpoints.backbone_reader import load_pretrained_backbone
from dinov2.layers.patch_embed import PatchGridError
from dinov2.models import VisionTransformer3D, build_model
from dinov2.models.build import build_random_backbone, is_random_init

from .heads import (DinoUNetHead, DPTHead, LinearHead, UNETRHead, UNetFusionHead, ViTAdapterUNETRHead,
                    evenly_spaced_taps, last_taps)
from .heads.blocks import guard_cpu_bf16_convs

logger = logging.getLogger(__name__)

HEAD_NAMES = ("UNETR", "ViTAdapterUNETR", "Linear", "DinoUNet", "DPT", "UNetFusion")
MERGE_MODES = ("concat", "mean")


def no_weights(pretrained_weights: object) -> bool:
    """Whether ``--pretrained-weights`` asks for a random-init backbone: ``none`` in any case, or empty.

    The training loop asks this to decide what a resumable state must keep, so it must agree with
    :func:`dinov2.models.build.is_random_init` (``NONE`` included).
    """
    return pretrained_weights is not None and (is_random_init(str(pretrained_weights))
                                               or str(pretrained_weights).strip() == "")


def canonical_head_name(name: str) -> str:
    """Case-insensitive match of ``name`` against :data:`HEAD_NAMES`."""
    for head in HEAD_NAMES:
        if str(name).lower() == head.lower():
            return head
    raise ValueError(f"Unknown segmentation head '{name}'. Choose one of {', '.join(HEAD_NAMES)} "
                     "(--segmentation-head / model.head).")


def head_taps(head: str, depth: int) -> list[int]:
    """Block indices a head reads: the last 4 for Linear, 4 evenly spaced for every other head."""
    return last_taps(depth) if canonical_head_name(head) == "Linear" else evenly_spaced_taps(depth)


class ModalityMerge(nn.Module):
    """Merge per-modality backbone features of each tap into one map.

    Args:
        num_modalities: ``M`` (1 makes this an identity).
        embed_dim: channels ``E`` per modality.
        num_taps: number of taps (one merge per tap).
        mode: ``"concat"`` (learned, initialised to the mean) or ``"mean"``.
    """

    def __init__(self, num_modalities: int, embed_dim: int, num_taps: int, mode: str = "concat"):
        super().__init__()
        if mode not in MERGE_MODES:
            raise ValueError(f"Unknown modality merge '{mode}'; choose one of {MERGE_MODES} (model.modality_merge)")
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
        self.num_modalities, self.mode = num_modalities, mode
        self.proj = nn.ModuleList()
        if num_modalities > 1 and mode == "concat":
            for _ in range(num_taps):
                conv = nn.Conv3d(num_modalities * embed_dim, embed_dim, kernel_size=1)
                with torch.no_grad():  # start as the average so pretrained features keep their scale
                    eye = torch.eye(embed_dim) / num_modalities
                    conv.weight.copy_(eye.repeat(1, num_modalities)[..., None, None, None])
                    conv.bias.zero_()
                self.proj.append(conv)

    def forward(self, features: torch.Tensor, tap: int) -> torch.Tensor:
        """``(B*M, E, h, w, d)`` (modality fastest) → ``(B, E, h, w, d)``."""
        m = self.num_modalities
        if m == 1:
            return features
        bm, e, *grid = features.shape
        grouped = features.reshape(bm // m, m, e, *grid)
        if self.mode == "mean":
            return grouped.mean(1)
        return self.proj[tap](grouped.reshape(bm // m, m * e, *grid))


class SegmentationModel(nn.Module):
    """Backbone + head; also the backbone interface the adapter-style heads drive (ViTAdapterUNETR, DinoUNet).

    Args:
        backbone: a :class:`VisionTransformer3D`.
        head_name: one of :data:`HEAD_NAMES`.
        head: the head module (built by :func:`build_head`).
        in_channels: image channels (modalities).
        merge_mode: see :class:`ModalityMerge`.
        train_backbone: finetune the backbone (else frozen: no gradients, eval mode).

    Example:
        >>> backbone = build_model("vit_tiny_3d", patch_size=16, img_size=32)
        >>> model = build_segmentation_model(backbone, "UNETR", in_channels=1, out_channels=4)
        >>> model(torch.randn(1, 1, 32, 32, 32)).shape
        torch.Size([1, 4, 32, 32, 32])
    """

    def __init__(self, backbone: VisionTransformer3D, head_name: str, head: nn.Module, in_channels: int,
                 merge_mode: str = "concat", train_backbone: bool = False):
        super().__init__()
        if not isinstance(backbone, VisionTransformer3D):
            raise ValueError(f"backbone must be a VisionTransformer3D, got {type(backbone).__name__}")
        if in_channels == backbone.in_chans:
            modalities = 1
        elif backbone.in_chans == 1:
            modalities = in_channels
        else:
            raise ValueError(f"The data has {in_channels} channels but the backbone takes {backbone.in_chans}; "
                             "use a backbone with 1 channel (each modality separately) or with as many as the data.")
        self.backbone, self.head = backbone, head
        self.head_name = canonical_head_name(head_name)
        self.in_channels = in_channels
        self.taps = head_taps(self.head_name, backbone.depth)
        self.merge = ModalityMerge(modalities, backbone.embed_dim, len(self.taps), merge_mode)
        self.train_backbone = train_backbone
        self.backbone.requires_grad_(train_backbone)
        if not train_backbone:
            self.backbone.eval()

    # ------------------------------------------------------------------ mode
    def train(self, mode: bool = True) -> "SegmentationModel":
        """Like ``nn.Module.train``; a frozen backbone stays in eval mode (no drop-path, fixed norms)."""
        super().train(mode)
        if not self.train_backbone:
            self.backbone.eval()
        return self

    @property
    def num_modalities(self) -> int:
        """Modalities that go through the backbone separately (1 when it takes all channels)."""
        return self.merge.num_modalities

    def _split_modalities(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[1] != self.in_channels:
            raise ValueError(f"Expected {self.in_channels} image channels, got {image.shape[1]}")
        if self.num_modalities == 1:
            return image
        b, m, *spatial = image.shape
        return image.reshape(b * m, 1, *spatial)

    # -------------------------------------------------------------- features
    def features(self, image: torch.Tensor, with_cls: bool = False) -> list:
        """Merged features of the head's taps (no gradient through a frozen backbone).

        Args:
            image: ``(B, C, H, W, D)``.
            with_cls: also return each tap's final-normed CLS token, merged over modalities
                like the patch tokens.

        Returns:
            4 tensors ``(B, E, H/p, W/p, D/p)``, shallowest first; with ``with_cls`` 4 pairs
            ``(patches (B, E, H/p, W/p, D/p), cls (B, E))``.
        """
        grad = self.train_backbone and torch.is_grad_enabled()
        with contextlib.nullcontext() if grad else torch.no_grad():
            feats = self.backbone.get_intermediate_layers(self._split_modalities(image), self.taps, reshape=True,
                                                          return_class_token=with_cls, norm=True)
        if not with_cls:
            return [self.merge(f, k) for k, f in enumerate(feats)]
        # The CLS token as a 1-voxel map goes through the same per-tap merge as its patches.
        return [(self.merge(p, k), self.merge(c[:, :, None, None, None], k).flatten(1))
                for k, (p, c) in enumerate(feats)]

    def forward(self, image: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """``(B, C, H, W, D)`` → logits ``(B, K, H, W, D)`` (a list at decreasing resolution when
        a head with deep supervision is training)."""
        if getattr(self.head, "drives_backbone", False):
            return self.head(image, self)
        return self.head(image, self.features(image, with_cls=getattr(self.head, "needs_cls", False)))

    # ------------------------------------------------- interface for the adapter
    def embed(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Tokens ``(B*M, 1+R+N, E)`` before the first block, and the patch grid."""
        x = self._split_modalities(image)
        return self.backbone.prepare_tokens_with_masks(x), tuple(self.backbone.patch_embed.grid_size(x.shape[2:]))

    def run_blocks(self, tokens: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Apply blocks ``start .. stop-1`` to ``(B*M, T, E)`` tokens."""
        for block in self.backbone.blocks[start:stop]:
            tokens = block(tokens)
        return tokens

    def patch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B*M, 1+R+N, E)`` → the patch part ``(B*M, N, E)``."""
        return tokens[:, 1 + self.backbone.num_register_tokens:]

    def set_patch_tokens(self, tokens: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Tokens with their patch part replaced by ``patches``."""
        return torch.cat([tokens[:, :1 + self.backbone.num_register_tokens], patches], dim=1)

    def merge_tokens(self, patches: torch.Tensor, tap: int, grid: Sequence[int]) -> torch.Tensor:
        """Final-normed, modality-merged patch tokens: ``(B*M, N, E)`` → ``(B, N, E)``."""
        x = self.backbone.norm(patches)
        bm, n, e = x.shape
        x = x.transpose(1, 2).reshape(bm, e, *grid)
        return self.merge(x, tap).flatten(2).transpose(1, 2)


def build_head(head_name: str, backbone: VisionTransformer3D, in_channels: int, out_channels: int,
               options: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a head for ``backbone``.

    Args:
        head_name: one of :data:`HEAD_NAMES`.
        backbone: gives ``embed_dim``, ``patch_size``, ``depth``, ``num_heads``.
        in_channels: image channels.
        out_channels: classes / label channels.
        options: head-specific keyword arguments (the config section of the head, see
            :data:`HEAD_OPTION_SECTIONS`).
    """
    head = _construct_head(canonical_head_name(head_name), backbone, in_channels, out_channels, dict(options or {}))
    return guard_cpu_bf16_convs(head)


def _construct_head(head_name: str, backbone: VisionTransformer3D, in_channels: int, out_channels: int,
                    options: dict) -> nn.Module:
    """The head module of a canonical ``head_name`` (see :func:`build_head`)."""
    e, p = backbone.embed_dim, backbone.patch_size
    if head_name == "UNETR":
        return UNETRHead(e, p, in_channels, out_channels, **options)
    if head_name == "Linear":
        return LinearHead(e, out_channels, **options)
    if head_name == "DPT":
        return DPTHead(e, p, out_channels, **options)
    if head_name == "UNetFusion":
        return UNetFusionHead(e, p, out_channels, **options)
    # The heads that drive the backbone through the ViT-Adapter interaction.
    if options.get("num_heads") is None:
        options["num_heads"] = backbone.num_heads
    head_class = DinoUNetHead if head_name == "DinoUNet" else ViTAdapterUNETRHead
    return head_class(e, p, in_channels, out_channels, taps=evenly_spaced_taps(backbone.depth), **options)


def build_segmentation_model(backbone: VisionTransformer3D, head_name: str, in_channels: int, out_channels: int,
                             head_options: Mapping[str, Any] | None = None, merge_mode: str = "concat",
                             train_backbone: bool = False) -> SegmentationModel:
    """Head + wrapper around ``backbone`` (see :class:`SegmentationModel`)."""
    head = build_head(head_name, backbone, in_channels, out_channels, head_options)
    return SegmentationModel(backbone, head_name, head, in_channels, merge_mode, train_backbone)


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def build_backbone(pretrained_weights: str | None, arch: str, backbone_kwargs: Mapping[str, Any] | None = None,
                   img_size: Sequence[int] | int | None = None) -> tuple[VisionTransformer3D, dict]:
    """The backbone to finetune: from a teacher checkpoint, or randomly initialised.

    Args:
        pretrained_weights: checkpoint path (ours or the published 3DINO-ViT), or ``"none"``
            for an explicit random-initialisation baseline. A wrong path raises.
        arch: registry name used with ``"none"`` (the checkpoint describes itself otherwise).
        backbone_kwargs: constructor overrides used with ``"none"``.
        img_size: native input size (the training crop); the checkpoint's position embedding is
            resampled to it once at load time.

    Returns:
        ``(backbone, spec)``; ``spec = {"arch": name or None, "kwargs": {...}}`` rebuilds the same
        architecture with :func:`backbone_from_spec` (stored in finetuned checkpoints).
    """
    try:
        return _build_backbone(pretrained_weights, arch, backbone_kwargs, img_size)
    except PatchGridError as exc:
        if img_size is None:
            raise
        side = max(exc.patch_size)
        raise ValueError(f"The training crop / sliding window {list(exc.spatial)} (--image-size, dataset.image_size) is "
                         f"not a multiple of the backbone's patch size {side}: pass a multiple of {side}, e.g. "
                         f"--image-size {max(side, round(max(exc.spatial) / side) * side)}.") from exc


def _build_backbone(pretrained_weights, arch, backbone_kwargs, img_size) -> tuple[VisionTransformer3D, dict]:
    if pretrained_weights is None or no_weights(pretrained_weights):
        backbone, kwargs = build_random_backbone(arch, backbone_kwargs, img_size, flag="model.arch=<registry name>")
        return backbone, {"arch": kwargs.pop("arch"), "kwargs": _plain(kwargs)}
    backbone, report = load_pretrained_backbone(pretrained_weights, img_size=img_size)
    kwargs = dict(report.model_kwargs)
    arch_name = kwargs.pop("arch", None)
    kwargs["img_size"] = list(backbone.img_size)
    return backbone, {"arch": arch_name, "kwargs": _plain(kwargs)}


def backbone_from_spec(spec: Mapping[str, Any]) -> VisionTransformer3D:
    """Rebuild the (uninitialised) backbone architecture described by ``spec``."""
    kwargs = dict(spec.get("kwargs") or {})
    for key in ("img_size",):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    if spec.get("arch"):
        return build_model(spec["arch"], **kwargs)
    return VisionTransformer3D(**kwargs)


HEAD_OPTION_SECTIONS = {"UNETR": "unetr", "ViTAdapterUNETR": "adapter", "Linear": "linear",
                        "DinoUNet": "dinounet", "DPT": "dpt", "UNetFusion": "unetfusion"}


def head_options(model_cfg: Mapping[str, Any], head_name: str) -> dict:
    """Head keyword arguments from the ``model`` config section of the head (:data:`HEAD_OPTION_SECTIONS`)."""
    return dict(model_cfg[HEAD_OPTION_SECTIONS[canonical_head_name(head_name)]])
