"""Errors of the HTTP service: each becomes one JSON answer ``{"error": ..., "detail": ...}``.

A request never ends in a traceback: a problem with the upload is a 4xx whose ``detail`` says in
words what is wrong (the reason of :class:`~dinov2.data.validation.InputVolumeError`, with the
uploaded file's name instead of the server's temporary path); anything else is logged with its
traceback on the server and answered as a 500 with one line.
"""

from __future__ import annotations

import logging

from dinov2.data.validation import find_input_error
from dinov2.utils.errors import explain_resource_error

logger = logging.getLogger("dinov2.serve")


class ServiceError(Exception):
    """A request the service answers with ``status`` and ``{"error": error, "detail": detail}``.

    Attributes:
        status: HTTP status code.
        error: short name of the problem (``"invalid volume"``, ``"upload too large"``...).
        detail: what is wrong and what to do, in words.
        headers: extra response headers (``Retry-After`` of a 503).
    """

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail = status, error, detail
        self.headers = dict(headers or {})

    def body(self) -> dict[str, str]:
        """The JSON body: ``{"error": ..., "detail": ...}``."""
        return {"error": self.error, "detail": self.detail}


def upload_too_large(limit_bytes: int, what: str = "the upload", flag: str = "--max-upload-mb") -> ServiceError:
    """The 413 for a body (or an unpacked zip) above its limit (``flag`` says where it comes from)."""
    limit = f"{limit_bytes / 2**20:g} MB ({flag})"
    return ServiceError(413, "upload too large", f"{what} is larger than this server's limit of {limit}; crop or "
                        "compress the volume, or raise the limit")


def service_error(exc: BaseException, upload_name: str) -> ServiceError:
    """The :class:`ServiceError` that answers ``exc``, raised while handling ``upload_name``.

    Args:
        exc: what a job raised.
        upload_name: the uploaded file's name (or ``"the upload"``), shown instead of temporary paths.

    Returns:
        ``exc`` itself for a ServiceError; a 422 for a bad volume; a 503 when the server ran out of
        memory or disk; otherwise a 500 (its traceback goes to the server's log, not to the client).
    """
    if isinstance(exc, ServiceError):
        return exc
    found = find_input_error(exc)
    if found is not None:
        return ServiceError(422, "invalid volume", f"{upload_name}: {found.reason}")
    resource = explain_resource_error(exc, "Send smaller volumes, or lower --concurrency.",
                                      "Free space in the temporary folder (TMPDIR).")
    if resource is not None:
        return ServiceError(503, "server out of resources", resource, {"Retry-After": "10"})
    logger.error("request for %s failed", upload_name, exc_info=exc)
    text = " ".join(str(exc).split())[:300] or type(exc).__name__
    return ServiceError(500, "internal error", f"{type(exc).__name__}: {text} (the server's log has the traceback)")
