"""Volumetric segmentation finetuning: heads, the backbone wrapper, preset-driven data, training
loop, metrics, sliding-window inference and label-map previews.

Entry points: ``python -m dinov2.eval.segmentation`` (finetune, :mod:`.finetune`) and
``python -m dinov2.eval.segmentation.predict`` (label maps from a finetuned checkpoint). The
finetuned checkpoint itself is read and written by :mod:`dinov2.checkpoints.finetuned`; the
dataset presets are :mod:`dinov2.eval.presets`. Nothing is imported here, so ``-m`` runs the
entry points without a double import.
"""
