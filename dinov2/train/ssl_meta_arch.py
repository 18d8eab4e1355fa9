"""Student, EMA teacher and the DINO + iBOT + KoLeo objective: one optimisation step.

Crops: per sample two global crops and ``n_local`` local crops, batched crop-major by the
collate (``dinov2/data/collate.py``). The teacher sees the two unmasked global crops; the
student sees the masked global crops and the local crops, both groups in one backbone pass
(attention once per crop size, token-wise layers on everything at once).

Objective::

    total = dino.loss_weight * DINO(student CLS logits of all crops, teacher targets of the
                                    OTHER global crops)
          + ibot.loss_weight * iBOT(student logits of masked patches, teacher targets there)
          + dino.koleo_loss_weight * sum over the 2 global crops of KoLeo(student CLS)

Teacher targets come from Sinkhorn-Knopp or an EMA-centred softmax (``centering.kind``), one
per head, statistics over the global batch. After the optimizer step the teacher moves
towards the student by EMA. The training loop (``train3d.py``) only schedules values, feeds
batches and saves state; everything about the method lives here.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dinov2 import distributed
from dinov2.data.crop_boxes import CROP_BOXES_KEY
from dinov2.data.device_augment import make_crops
from dinov2.layers.dino_head import DINOHead
from dinov2.loss import DINOLoss, KoLeoLoss, build_centering, iBOTPatchLoss, koleo_per_crop
from dinov2.models.build import backbone_kwargs_from_config, build_configured_backbone
from dinov2.models.vision_transformer import VisionTransformer3D, resample_pos_embed
from dinov2.optim.param_groups import get_param_groups
from dinov2.train.metrics import effective_rank, mean_row_entropy, prototype_usage_entropy
from dinov2.utils.config import with_packaged_defaults
from dinov2.utils.precision import autocast_context, native_bf16_support

logger = logging.getLogger(__name__)

N_GLOBAL_CROPS = 2  # the DINO augmentation always makes two global views
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STRATEGIES = ("ddp", "fsdp")


def backbone_from_config(cfg: Mapping[str, Any], teacher: bool = False) -> VisionTransformer3D:
    """Build the backbone the config describes.

    Reads ``student.{arch, patch_size, in_chans, drop_path_rate, drop_path_uniform, layerscale,
    ffn_layer, qkv_bias, proj_bias, ffn_bias, num_register_tokens, interpolate_offset}`` and
    ``crops.global_crops_size`` (the native grid of the position embedding, so global crops need
    no interpolation). These are the keys a teacher checkpoint's embedded config carries.

    Args:
        cfg: resolved config (DictConfig or nested dict).
        teacher: build without stochastic depth (the teacher is an EMA, never trained directly).
    """
    # One reader of the student.* keys for training and for checkpoint loading.
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    arch, kwargs = backbone_kwargs_from_config(plain)
    student = plain["student"]
    kwargs["drop_path_rate"] = 0.0 if teacher else float(student["drop_path_rate"])
    kwargs["drop_path_uniform"] = bool(student["drop_path_uniform"])
    return build_configured_backbone(arch, kwargs)


def _head(cfg_section: Mapping[str, Any], in_dim: int) -> DINOHead:
    return DINOHead(
        in_dim=in_dim,
        out_dim=int(cfg_section["head_n_prototypes"]),
        hidden_dim=int(cfg_section["head_hidden_dim"]),
        bottleneck_dim=int(cfg_section["head_bottleneck_dim"]),
        nlayers=int(cfg_section["head_nlayers"]),
        norm_last_layer=not bool(cfg_section["head_train_prototype_norm"]),
    )


class SSLNetwork(nn.Module):
    """Backbone + DINO head + iBOT head; the parameter layout of a teacher checkpoint.

    The same class serves as student and teacher; see :meth:`forward`.

    Args:
        backbone: the 3D ViT.
        dino_head: head on CLS tokens.
        ibot_head: head on masked patch tokens.
    """

    def __init__(self, backbone: VisionTransformer3D, dino_head: DINOHead, ibot_head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head

    def forward(self, global_crops: Tensor, mask_indices: Tensor, local_crops: Tensor | None = None,
                masks: Tensor | None = None) -> dict[str, Tensor]:
        """Student pass (masked global crops + local crops) or teacher pass (``masks=None``).

        Both passes go through ``forward`` so that a DDP or FSDP wrapper sees every call.

        Args:
            global_crops: ``(2B, C, G, G, G)`` crop-major.
            mask_indices: long ``(M,)`` indices of the student's masked tokens in
                ``masks.flatten()``; the patch tokens there go through the iBOT head.
            local_crops: ``(n_local * B, C, L, L, L)`` crop-major, or None (the teacher, or no
                local crops).
            masks: bool ``(2B, N)``, True where the student's patch is replaced by the mask
                token; None for the teacher, which sees the crops unmasked.

        Returns:
            ``cls_global (2B, E)`` (backbone CLS: KoLeo, monitors), ``dino_global (2B, K)``,
            ``dino_local (n_local * B, K)`` (``(0, K)`` without local crops) and
            ``ibot_masked (M, K_ibot)``.
        """
        if local_crops is not None:
            out_global, out_local = self.backbone.forward_features_list([global_crops, local_crops], [masks, None])
            cls_local = out_local["x_norm_clstoken"]
        else:
            out_global = self.backbone.forward_features(global_crops, masks)
            cls_local = out_global["x_norm_clstoken"][:0]
        cls_global = out_global["x_norm_clstoken"]
        # One head call on all CLS tokens: larger matrix products than one call per crop group.
        dino = self.dino_head(torch.cat([cls_global, cls_local]))
        patches = out_global["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        return {
            "cls_global": cls_global,
            "dino_global": dino[: cls_global.shape[0]],
            "dino_local": dino[cls_global.shape[0]:],
            "ibot_masked": self.ibot_head(patches),
        }


class SSLMetaArch(nn.Module):
    """DINO + iBOT + KoLeo self-distillation of a 3D ViT.

    State (``state_dict``): ``student.*``, ``teacher.*`` (each ``backbone.*``, ``dino_head.*``,
    ``ibot_head.*``) and the centering buffers ``dino_centering.*`` / ``ibot_centering.*``
    (EMA centers; empty for Sinkhorn-Knopp).

    Args:
        cfg: resolved training config (sections ``student``, ``crops``, ``dino``, ``ibot``,
            ``centering``, ``optim``, ``compute_precision``).
        device: where to put the networks.

    Example:
        >>> arch = SSLMetaArch(cfg, torch.device("cpu"))
        >>> losses = arch.forward_backward(batch, teacher_temp=0.04)
        >>> arch.optimizer_step(optimizer, scaler=None)
        >>> arch.update_teacher(momentum=0.992)
    """

    def __init__(self, cfg: Mapping[str, Any], device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        self.device = torch.device(device)
        precision = with_packaged_defaults("compute_precision", cfg["compute_precision"])
        if precision["dtype"] not in AUTOCAST_DTYPES:
            raise ValueError(
                f"compute_precision.dtype='{precision['dtype']}' is unknown; choose one of {', '.join(AUTOCAST_DTYPES)}."
            )
        self.precision = str(precision["dtype"])
        self.autocast_dtype = AUTOCAST_DTYPES[self.precision]
        if self.autocast_dtype == torch.float16 and self.device.type != "cuda":
            raise ValueError("compute_precision.dtype=fp16 needs CUDA; use bf16 or fp32 on CPU.")
        if self.autocast_dtype == torch.bfloat16 and not native_bf16_support(self.device):
            # Still correct, but emulated: 12-26x slower than fp32 on an AVX2 CPU (docs/benchmarks.md).
            logger.warning("compute_precision.dtype=bf16 has no hardware support on %s and runs emulated, much "
                           "slower than %s; set compute_precision.dtype=%s.", self.device,
                           *(("fp32", "fp32") if self.device.type == "cpu" else ("fp16", "fp16")))
        self.n_local_crops = int(cfg["crops"]["local_crops_number"])
        self.dino_weight = float(cfg["dino"]["loss_weight"])
        self.ibot_weight = float(cfg["ibot"]["loss_weight"])
        self.koleo_weight = float(cfg["dino"]["koleo_loss_weight"])
        for name, value in (("dino.loss_weight", self.dino_weight), ("ibot.loss_weight", self.ibot_weight),
                            ("dino.koleo_loss_weight", self.koleo_weight)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}.")

        backbone = backbone_from_config(cfg)
        embed_dim = backbone.embed_dim
        self.student = SSLNetwork(backbone, _head(cfg["dino"], embed_dim), _head(cfg["ibot"], embed_dim))
        self.teacher = SSLNetwork(backbone_from_config(cfg, teacher=True), copy.deepcopy(self.student.dino_head),
                                  copy.deepcopy(self.student.ibot_head))
        # Student and teacher start identical (the teacher only lacks stochastic depth).
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        if precision["grad_checkpointing"]:
            self.student.backbone.set_grad_checkpointing(True)

        c = cfg["centering"]
        student_temp = float(c["student_temp"])
        self.dino_centering = build_centering(c["kind"], int(cfg["dino"]["head_n_prototypes"]),
                                              momentum=float(c["momentum"]), n_iterations=int(c["sinkhorn_iterations"]))
        self.ibot_centering = build_centering(c["kind"], int(cfg["ibot"]["head_n_prototypes"]),
                                              momentum=float(c["momentum"]), n_iterations=int(c["sinkhorn_iterations"]))
        self.dino_loss = DINOLoss(int(cfg["dino"]["head_n_prototypes"]), student_temp=student_temp)
        self.ibot_loss = iBOTPatchLoss(int(cfg["ibot"]["head_n_prototypes"]), student_temp=student_temp)
        self.koleo_loss = KoLeoLoss()
        self.to(self.device)
        # What the student pass calls: the student itself, or its DDP wrapper (prepare_distributed).
        # Kept out of nn.Module's registry so the state dict holds each tensor once.
        self.__dict__["_student_forward"] = self.student
        self.teacher.eval()

    # ------------------------------------------------------------------ set-up
    def train(self, mode: bool = True) -> "SSLMetaArch":
        """Switch the student's mode; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def prepare_distributed(self, strategy: str = "ddp") -> None:
        """Wrap the student for multi-process training; nothing to do for one process.

        ``ddp`` wraps the student in DistributedDataParallel (gradients all-reduced in
        backward). ``fsdp`` shards student and teacher parameters with ``fully_shard`` (each
        transformer block, the heads, then the whole network), so the EMA update runs on
        matching local shards. Both run on GPUs (NCCL) and on CPU processes (gloo), which is how
        the tests check that FSDP computes what one process computes.
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"compute_precision.strategy='{strategy}' is unknown; choose one of {', '.join(STRATEGIES)}.")
        if distributed.get_world_size() == 1:
            return
        if strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.__dict__["_student_forward"] = DistributedDataParallel(self.student, device_ids=ids)
            return
        self.shard_with_fsdp()

    def shard_with_fsdp(self) -> None:
        """Shard student and teacher with FSDP over every process of the group (strategy ``fsdp``).

        :meth:`prepare_distributed` calls it when there are several processes; a group of one
        process may call it directly (the one-GPU check of ``tests/cuda``), shards being whole.
        """
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh(self.device.type, (distributed.get_world_size(),))
        mp = MixedPrecisionPolicy(param_dtype=self.autocast_dtype, reduce_dtype=torch.float32) \
            if self.autocast_dtype is not None else MixedPrecisionPolicy()
        for network in (self.student, self.teacher):
            for block in network.backbone.blocks:
                fully_shard(block, mesh=mesh, mp_policy=mp)
                # The student's crop groups go through Block.forward_list, not forward: FSDP gathers
                # a module's shards only around the methods it knows.
                register_fsdp_forward_method(block, "forward_list")
            fully_shard(network.dino_head, mesh=mesh, mp_policy=mp)
            fully_shard(network.ibot_head, mesh=mesh, mp_policy=mp)
            # FSDP leaves the root's parameters gathered after forward, expecting a backward to
            # free them; the teacher has no backward, and its EMA update must see local shards.
            fully_shard(network, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
        self._sharded = True

    @property
    def is_sharded(self) -> bool:
        """True once :meth:`prepare_distributed` sharded the networks with FSDP."""
        return getattr(self, "_sharded", False)

    def full_state_dict(self) -> dict[str, Tensor]:
        """Unsharded state (``student.*``, ``teacher.*``, centering buffers) on the CPU.

        Collective under FSDP (every rank must call it); a plain copy otherwise.
        """
        if self.is_sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}

    def load_full_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Inverse of :meth:`full_state_dict` (strict: every key must match)."""
        if self.is_sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self, dict(state), options=StateDictOptions(full_state_dict=True, strict=True))
            return
        self.load_state_dict(state, strict=True)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Unsharded optimizer state (collective under FSDP)."""
        if self.is_sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.student, optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`optimizer_state_dict`, whichever strategy wrote the state.

        One process and DDP key the state by parameter position, FSDP by parameter name. Position
        keys map onto names through the optimizer's parameter order (the same
        ``get_param_groups`` builds it in every run); name keys load by position in
        ``Optimizer.load_state_dict``, which follows the same order.
        """
        if self.is_sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.student, optimizer, self._keyed_by_name(optimizer, state),
                                     options=StateDictOptions(full_state_dict=True))
            return
        optimizer.load_state_dict(state)

    def _keyed_by_name(self, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> dict[str, Any]:
        """``state`` with parameter positions (``optimizer.state_dict()`` keys) replaced by student names."""
        groups = state["param_groups"]
        if not all(isinstance(k, int) for g in groups for k in g["params"]):
            return dict(state)
        name_of = {id(p): n for n, p in self.student.named_parameters()}
        names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
        positions = [k for g in groups for k in g["params"]]
        if sorted(positions) != list(range(len(names))):
            raise ValueError(f"The checkpoint's optimizer state covers {len(positions)} parameters, this student has "
                             f"{len(names)}: it was written for another architecture or parameter grouping.")
        return {"state": {names[k]: v for k, v in state["state"].items()},
                "param_groups": [{**g, "params": [names[k] for k in g["params"]]} for g in groups]}

    def teacher_state_dict(self) -> dict[str, Tensor]:
        """The teacher's ``backbone.*``, ``dino_head.*``, ``ibot_head.*`` tensors (CPU, unsharded; collective under FSDP)."""
        prefix = "teacher."
        return {k[len(prefix):]: v for k, v in self.full_state_dict().items() if k.startswith(prefix)}

    def build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the student's parameter groups (layer-wise LR decay, no WD on norms/biases)."""
        o = self.cfg["optim"]
        groups = get_param_groups(self.student, lr_decay_rate=float(o["layerwise_decay"]),
                                  patch_embed_lr_mult=float(o["patch_embed_lr_mult"]),
                                  decay_tokens=bool(o["token_weight_decay"]))
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=0.0, betas=(float(o["adamw_beta1"]), float(o["adamw_beta2"])),
                                 fused=fused or None)

    def load_pretrained_teacher(self, teacher_state: Mapping[str, Tensor]) -> None:
        """Start student and teacher from a teacher state dict (the high-resolution stage).

        Position embeddings of another grid are resampled to this model's grid; every other
        tensor must match in name and shape (a clear error otherwise).

        Args:
            teacher_state: ``backbone.*``, ``dino_head.*``, ``ibot_head.*`` tensors.
        """
        state = dict(teacher_state)
        key = "backbone.pos_embed"
        own = self.student.backbone
        if key in state and state[key].shape != own.pos_embed.shape:
            n_src = state[key].shape[1] - 1
            side = round(n_src ** (1 / 3))
            if side ** 3 != n_src:
                raise ValueError(f"Pretrained {key} has {n_src} patch entries, not a cube; cannot resample it.")
            state[key] = resample_pos_embed(state[key], (side,) * 3, own.patch_grid, interpolate_offset=0.0)
            logger.info("Resampled the pretrained position embedding from %s to %s tokens", (side,) * 3, own.patch_grid)
        own_state = self.student.state_dict()
        missing = sorted(set(own_state) - set(state))
        unexpected = sorted(set(state) - set(own_state))
        wrong_shape = [k for k in own_state if k in state and state[k].shape != own_state[k].shape]
        if missing or unexpected or wrong_shape:
            raise ValueError(
                f"Pretrained teacher does not fit student.arch/heads: missing {missing[:8]}, unexpected "
                f"{unexpected[:8]}, other shapes {wrong_shape[:8]}; set student.* / dino.head_* / ibot.head_* "
                "as in the checkpoint's embedded config."
            )
        for network in (self.student, self.teacher):
            network.load_state_dict(state)

    # ------------------------------------------------------------------ a step
    def _autocast(self):
        return autocast_context(self.precision, self.device)

    def _check_batch(self, global_crops: Tensor, local_crops: Tensor | None) -> int:
        if global_crops.shape[0] % N_GLOBAL_CROPS:
            raise ValueError(f"collated_global_crops has {global_crops.shape[0]} rows, not a multiple of {N_GLOBAL_CROPS}.")
        batch = global_crops.shape[0] // N_GLOBAL_CROPS
        n_local_rows = 0 if local_crops is None else local_crops.shape[0]
        if n_local_rows != self.n_local_crops * batch:
            raise ValueError(
                f"Batch holds {n_local_rows} local crops for {batch} samples but crops.local_crops_number="
                f"{self.n_local_crops}; the augmentation and the meta-architecture must share the config."
            )
        return batch

    def forward_backward(self, batch: Mapping[str, Any], teacher_temp: float,
                         scaler: torch.amp.GradScaler | None = None, monitors: bool = False) -> dict[str, Tensor]:
        """Losses of one batch and their gradients in the student (accumulated in ``.grad``).

        Args:
            batch: the collate's dict (``collated_global_crops``, ``collated_local_crops``, or
                with ``crops.augment_on_device`` the ``crop_boxes`` the crops are made from;
                ``collated_masks``, ``mask_indices_list``, ``masks_weight``).
            teacher_temp: this iteration's teacher temperature.
            scaler: fp16 gradient scaler, or None.
            monitors: also return collapse monitors (``teacher_entropy``,
                ``teacher_prototype_entropy``, ``teacher_cls_effective_rank``) for logging.

        Returns:
            Detached float32 scalars of THIS process: ``dino_loss``, ``ibot_loss``,
            ``koleo_loss`` (unweighted) and ``total_loss`` (weighted sum that was
            back-propagated), plus the monitors if asked.
        """
        global_crops, local_crops, masks, mask_indices, masks_weight = self._batch_to_device(batch)
        n_masked = int(mask_indices.numel())
        # Centering needs a consistent choice on every rank: skip iBOT only if no rank masked anything.
        any_masked = distributed.all_reduce_sum(torch.tensor([float(n_masked)], device=self.device)).item() > 0

        with self._autocast():
            with torch.no_grad():
                teacher_out = self.teacher(global_crops, mask_indices)
            student_out = self._student_forward(global_crops, mask_indices, local_crops, masks)
        dino_targets, ibot_targets = self._teacher_targets(teacher_out, teacher_temp, any_masked)
        losses = self._student_losses(student_out, dino_targets, ibot_targets, masks, masks_weight, n_masked)
        total = (self.dino_weight * losses["dino_loss"] + self.ibot_weight * losses["ibot_loss"]
                 + self.koleo_weight * losses["koleo_loss"])

        (scaler.scale(total) if scaler is not None else total).backward()

        out = {**{name: loss.detach() for name, loss in losses.items()}, "total_loss": total.detach()}
        if monitors:
            out.update(self._collapse_monitors(teacher_out, masks, teacher_temp))
        return out

    def _batch_to_device(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
        """The collate's tensors on this model's device, checked against the crop settings.

        Returns:
            ``(global_crops (2B, C, G, G, G), local_crops (n_local * B, C, L, L, L) or None,
            masks bool (2B, N), mask_indices long (M,), masks_weight (M,))``.
        """
        dev = self.device
        if CROP_BOXES_KEY in batch:  # crops.augment_on_device: the loader cut boxes, the crops are made here
            global_crops, local_crops = make_crops(batch[CROP_BOXES_KEY], dev)
        else:
            global_crops = batch["collated_global_crops"].to(dev, non_blocking=True)
            local_crops = batch["collated_local_crops"]
            local_crops = None if local_crops is None else local_crops.to(dev, non_blocking=True)
        masks = batch["collated_masks"].to(dev, non_blocking=True)
        mask_indices = batch["mask_indices_list"].to(dev, non_blocking=True)
        masks_weight = batch["masks_weight"].to(dev, non_blocking=True)
        self._check_batch(global_crops, local_crops)
        return global_crops, local_crops, masks, mask_indices, masks_weight

    @torch.no_grad()
    def _teacher_targets(self, teacher_out: Mapping[str, Tensor], teacher_temp: float,
                         any_masked: bool) -> tuple[Tensor, Tensor | None]:
        """Centred teacher targets; updates the centering statistics with this batch.

        Args:
            teacher_out: the teacher's :meth:`SSLNetwork.forward` outputs, ``dino_global (2B, K)``
                and ``ibot_masked (M, K_ibot)``.
            teacher_temp: this iteration's teacher temperature.
            any_masked: whether any rank masked a token (else the iBOT centering is skipped).

        Returns:
            ``(dino_targets (2B, K), ibot_targets (M, K_ibot) or None when nothing was masked)``.
        """
        dino_targets = self.dino_centering(teacher_out["dino_global"], teacher_temp)
        self.dino_centering.update(teacher_out["dino_global"])
        if not any_masked:
            return dino_targets, None
        ibot_targets = self.ibot_centering(teacher_out["ibot_masked"], teacher_temp)
        self.ibot_centering.update(teacher_out["ibot_masked"])
        return dino_targets, ibot_targets

    def _student_losses(self, student_out: Mapping[str, Tensor], dino_targets: Tensor, ibot_targets: Tensor | None,
                        masks: Tensor, masks_weight: Tensor, n_masked: int) -> dict[str, Tensor]:
        """The unweighted DINO, iBOT and KoLeo losses of the student (scalars in the autograd graph).

        Args:
            student_out: the student's :meth:`SSLNetwork.forward` outputs, ``cls_global (2B, E)``,
                ``dino_global (2B, K)``, ``dino_local (n_local * B, K)``, ``ibot_masked (M, K_ibot)``.
            dino_targets: ``(2B, K)`` teacher targets of the global crops, crop-major.
            ibot_targets: ``(M, K_ibot)`` teacher targets of the masked tokens, or None when no
                rank masked a token.
            masks: bool ``(2B, N)`` student masks.
            masks_weight: ``(M,)`` per-token weights of the iBOT loss.
            n_masked: ``M``, the masked tokens of this process.

        Returns:
            ``{"dino_loss", "ibot_loss", "koleo_loss"}``.
        """
        student_crops = list(student_out["dino_global"].chunk(N_GLOBAL_CROPS))
        if self.n_local_crops:
            student_crops += list(student_out["dino_local"].chunk(self.n_local_crops))
        dino_loss = self.dino_loss(student_crops, list(dino_targets.chunk(N_GLOBAL_CROPS)))
        if ibot_targets is not None:
            ibot_loss = self.ibot_loss.forward_masked(student_out["ibot_masked"], ibot_targets, masks,
                                                      n_masked_patches=n_masked, masks_weight=masks_weight)
        else:
            # Keep the iBOT head in the graph so DDP sees a gradient (of zero) for every parameter.
            ibot_loss = student_out["ibot_masked"].float().sum() * 0.0
        if self.koleo_weight > 0:
            koleo_loss = koleo_per_crop(student_out["cls_global"], N_GLOBAL_CROPS, self.koleo_loss)
        else:
            koleo_loss = dino_loss.new_zeros(())
        return {"dino_loss": dino_loss, "ibot_loss": ibot_loss, "koleo_loss": koleo_loss}

    def _collapse_monitors(self, teacher_out: Mapping[str, Tensor], masks: Tensor,
                           teacher_temp: float) -> dict[str, Tensor]:
        """Collapse monitors of this batch (float32 scalars, for logging only).

        Args:
            teacher_out: the teacher's outputs, ``dino_global (2B, K)`` and ``cls_global (2B, E)``.
            masks: bool ``(2B, N)`` student masks.
            teacher_temp: this iteration's teacher temperature.

        Returns:
            ``dino_uniform_loss``, ``ibot_uniform_loss``, ``teacher_entropy``,
            ``teacher_prototype_entropy`` and ``teacher_cls_effective_rank``.
        """
        out = {}
        # What each loss would be if the student predicted the uniform distribution (cross-
        # entropy ln K against any target): the line a collapsed run sits on. iBOT averages
        # over all global crops, unmasked ones adding 0, so its line scales with the masked share.
        out["dino_uniform_loss"] = torch.tensor(math.log(self.dino_loss.out_dim))
        masked_share = masks.any(dim=-1).float().mean().cpu()
        out["ibot_uniform_loss"] = masked_share * math.log(self.ibot_loss.patch_out_dim)
        with torch.no_grad():
            # The raw tempered softmax, not the centred targets: Sinkhorn-Knopp forces its
            # targets to use every prototype and would hide a collapse of the teacher itself.
            raw = torch.softmax(teacher_out["dino_global"].float() / teacher_temp, dim=-1)
            out["teacher_entropy"] = mean_row_entropy(raw)
            out["teacher_prototype_entropy"] = prototype_usage_entropy(raw)
            out["teacher_cls_effective_rank"] = effective_rank(teacher_out["cls_global"])
        return out

    def optimizer_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> Tensor:
        """Clip the student's gradients at ``optim.clip_grad`` and step; zero the gradients.

        With ``optim.clip_grad_per_module`` (the published recipe) the backbone, the DINO head
        and the iBOT head are each clipped to that norm on their own, so a large head gradient
        does not shrink the backbone's step; otherwise one global norm is clipped.

        Returns:
            The global gradient norm before clipping (float32 scalar; inf/NaN if the grads were).
        """
        if scaler is not None:
            scaler.unscale_(optimizer)
        clip = float(self.cfg["optim"]["clip_grad"])
        max_norm = clip if clip > 0 else float("inf")
        modules = ((self.student.backbone, self.student.dino_head, self.student.ibot_head)
                   if self.cfg["optim"]["clip_grad_per_module"] else (self.student,))
        norms = []
        for module in modules:
            params = [p for p in module.parameters() if p.grad is not None]
            if params:
                norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm).float())
        grad_norm = torch.stack(norms).pow(2).sum().sqrt() if norms else torch.zeros(())
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach().float()

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: ``teacher = momentum * teacher + (1 - momentum) * student``, parameter by parameter."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"Teacher momentum must lie in [0, 1], got {momentum}.")
        student = [p.detach() for p in self.student.parameters()]
        teacher = [p for p in self.teacher.parameters()]
        if len(student) != len(teacher):
            raise RuntimeError("Student and teacher have different parameter lists; they must share one architecture.")
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)
