"""The one exception type of the evidence command: a user error whose message names the fix."""

from __future__ import annotations

from dinov2.utils.errors import UserError


class EvidenceError(UserError, ValueError):
    """The evidence cannot be computed as asked (bad file, bad option); the message says what to change."""
