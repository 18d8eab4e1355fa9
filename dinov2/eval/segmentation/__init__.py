"""Volumetric segmentation finetuning: heads, the backbone wrapper, preset-driven data, training
loop, metrics, sliding-window inference and the self-describing finetuned checkpoint.

Entry points: :mod:`dinov2.eval.segmentation3d` (finetune) and :mod:`dinov2.eval.predict`.
"""
