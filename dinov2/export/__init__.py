"""Export finetuned segmenters and pretrained backbones to ONNX, with the preprocessing they expect.

==========================  ==================================================================
:mod:`.onnx_export`         trace, verify against PyTorch, write atomically (which models take
                            which input sizes: its docstring)
:mod:`.positional`          the position embedding as traceable tensor operations
:mod:`.metadata`            the JSON stored in the file's ``metadata_props`` (preset, settings)
:mod:`.runtime`             the optional ``onnx`` / ``onnxruntime`` packages, imported lazily
:mod:`.errors`              one-line errors: missing extra, not exportable, not our ONNX file
==========================  ==================================================================

Command: ``python -m dinov2.export --checkpoint best_model.pth --format onnx --output model.onnx``.
The exported segmenter runs in ``python -m dinov2.eval.segmentation.predict --model model.onnx``
(:mod:`dinov2.eval.segmentation.onnx_model`). Nothing heavy is imported here.
"""

from .errors import INSTALL_HINT, ExportError, MissingExportDependency, OnnxModelError
from .metadata import FORMAT, FORMAT_VERSION, METADATA_KEY, parse_metadata, read_metadata

__all__ = ["FORMAT", "FORMAT_VERSION", "INSTALL_HINT", "METADATA_KEY", "ExportError", "MissingExportDependency",
           "OnnxModelError", "parse_metadata", "read_metadata"]
