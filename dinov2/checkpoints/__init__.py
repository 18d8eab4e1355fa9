"""Checkpoints, side by side: every file this toolkit reads or writes that holds weights.

==========================  ==================================================================
:mod:`.layouts`             open a file and recognise its layout (ours, the published 3DINO-ViT
                            teacher, plain or wrapped state dicts); key normalisation
:mod:`.backbone_reader`     load a pretrained backbone from any of those layouts, building the
                            model from the embedded config or the tensor shapes
:mod:`.teacher_export`      write our self-describing teacher checkpoint, or the published layout
:mod:`.training_state`      the pretraining run's full state: save, find, prune, resume
:mod:`.finetuned`           the finetuned segmentation model (``best_model.pth``): save, rebuild
:mod:`.errors`              :class:`CheckpointError`, :class:`FinetunedModelError`
==========================  ==================================================================

Arrows out: :mod:`dinov2.models` (registry and :mod:`dinov2.models.build`), :mod:`dinov2.utils`
(atomic writes), :mod:`dinov2.distributed` (rank 0 writes the training state) and, for the
finetuned model only, :mod:`dinov2.eval.presets` and (when rebuilding)
:mod:`dinov2.eval.segmentation.model`.
"""

from .backbone_reader import (
    BackboneLoadReport,
    build_model_from_checkpoint,
    infer_backbone_kwargs,
    load_pretrained_backbone,
    resize_pos_embed_to_model,
)
from .errors import CheckpointError, FinetunedModelError
from .finetuned import load_finetuned, save_finetuned
from .layouts import (
    TEACHER_FORMAT_VERSION,
    CheckpointContents,
    load_head_state_dicts,
    normalize_state_dict_keys,
    read_checkpoint,
)
from .teacher_export import save_teacher_checkpoint, to_plain_config, to_published_layout
from .training_state import TrainingCheckpointer

__all__ = [
    "BackboneLoadReport", "CheckpointContents", "CheckpointError", "FinetunedModelError", "TEACHER_FORMAT_VERSION",
    "TrainingCheckpointer", "build_model_from_checkpoint", "infer_backbone_kwargs", "load_finetuned",
    "load_head_state_dicts", "load_pretrained_backbone", "normalize_state_dict_keys", "read_checkpoint",
    "resize_pos_embed_to_model", "save_finetuned", "save_teacher_checkpoint", "to_plain_config",
    "to_published_layout",
]
