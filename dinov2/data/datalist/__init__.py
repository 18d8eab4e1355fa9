"""Datalists: build them from folders, write them, and load them with validation.

Two JSON formats (:mod:`.format`; documented in ``docs/datalists.md``):

* pretraining: a list of ``{"image": path, "shape": [X, Y, Z(, C)], "spacing": [sx, sy, sz]}``;
* finetuning: ``{"training": [...], "validation": [...], "test": [...]}`` of
  ``{"image": path or [path per modality], "label": path or int}`` (Decathlon-compatible: other
  top-level keys such as ``"labels"`` or ``"description"`` are kept and ignored).

One room per concern:

==================  ==========================================================================
:mod:`.format`      the splits, :class:`Problem`, :class:`DatalistError`, :class:`Skipped`, paths
:mod:`.build`       discover pretraining volumes; match, split and subset finetuning cases
:mod:`.load`        load either format and validate every entry at once
:mod:`.write`       write a datalist atomically (absolute or relative paths), the skip report
:mod:`.nnunet`      an nnU-Net raw dataset checked, turned into a finetuning datalist and a preset
:mod:`.cli`         ``python -m dinov2.data.datalist pretrain | finetune | nnunet | validate``
==================  ==========================================================================

Every public name is re-exported here, so ``from dinov2.data.datalist import X`` works for all.
"""

from .build import (
    DEFAULT_MODALITY_REGEX,
    MIN_FILES_FOR_PROCESSES,
    build_finetune_datalist,
    build_pretrain_datalist,
    header_entry,
    match_cases,
    split_entries,
    subset_training,
)
from .cli import main
from .format import SPLITS, DatalistError, Problem, Skipped
from .load import load_datalist, load_finetune_datalist, load_pretrain_datalist
from .write import write_datalist, write_skipped_report

__all__ = [
    "DEFAULT_MODALITY_REGEX", "MIN_FILES_FOR_PROCESSES", "SPLITS", "DatalistError", "Problem", "Skipped",
    "build_finetune_datalist", "build_pretrain_datalist", "header_entry", "load_datalist", "load_finetune_datalist",
    "load_pretrain_datalist", "main", "match_cases", "split_entries", "subset_training", "write_datalist",
    "write_skipped_report",
]
