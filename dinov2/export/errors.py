"""The errors of exporting and of reading exported models: each one line that names the file and the fix.

All are :class:`~dinov2.utils.errors.UserError` subclasses, so every entry point prints them as
one ``ERROR:`` line and exits with code 1 (no traceback; ``--debug`` shows it).
"""

from __future__ import annotations

from dinov2.utils.errors import UserError

INSTALL_HINT = "pip install 'dinov2-3d[export]'"


class MissingExportDependency(UserError, ImportError):
    """``onnx`` or ``onnxruntime`` (the optional ``export`` extra) is not installed."""


class ExportError(UserError, RuntimeError):
    """A model that cannot be exported faithfully; nothing was written."""


class OnnxModelError(UserError, ValueError):
    """An ``.onnx`` file that is not a model exported by :mod:`dinov2.export` (or a newer one)."""
