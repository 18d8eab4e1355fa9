"""Evaluation of pretrained backbones: one package per task, each with its own entry point.

==========================  ==============================================================
:mod:`.segmentation`        finetune for segmentation (``python -m dinov2.eval.segmentation``)
                            and predict (``python -m dinov2.eval.segmentation.predict``)
:mod:`.linear`              linear probing (``python -m dinov2.eval.linear``)
:mod:`.visualisation`       PCA / attention views (``python -m dinov2.eval.visualisation``)
:mod:`.evidence`            teacher vs random init vs raw intensities (``python -m dinov2.eval.evidence``)
:mod:`.presets`             dataset presets shared by segmentation and linear probing
==========================  ==============================================================

Nothing is imported here, so each ``-m`` entry point runs without a double import.
"""
