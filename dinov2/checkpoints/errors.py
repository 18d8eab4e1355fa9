"""The errors of checkpoint reading: a file that cannot be used as asked, and why.

Both messages name the file and the fix. :class:`FinetunedModelError` is raised where a backbone
is expected but a finetuned segmentation model (or its resumable state) was given.
"""

from dinov2.utils.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file cannot be used as asked; the message names the file and the fix."""


class FinetunedModelError(CheckpointError):
    """A finetuned segmentation model (or its resumable state) given where a backbone is expected."""
