"""The FastAPI application: routes, upload handling and the JSON error answers.

Routes (OpenAPI page at ``/docs``; the formats are described in :mod:`dinov2.serve`):

* ``POST /v1/segment``: a volume → its label map (``.nii.gz`` body) + ``X-Volumes-mL`` header.
* ``POST /v1/embed``: a volume → backbone features as JSON.
* ``GET /v1/model``: architecture, classes, preprocessing, version; ``GET /healthz``.

Every error is ``{"error": ..., "detail": ...}`` with a 4xx/5xx status, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from functools import partial
from typing import Callable

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

import dinov2

from .errors import ServiceError, service_error
from .inference import ServedModel, describe, embed_nifti, segment_nifti
from .jobs import InferenceQueue
from .uploads import Upload, receive_upload, volume_path

VOLUMES_HEADER = "X-Volumes-mL"
_BINARY = {"type": "string", "format": "binary"}
UPLOAD_BODY = {"requestBody": {"required": True, "description": "a NIfTI file (.nii, .nii.gz) or a zip of one DICOM "
               "series: the body itself, or the field 'file' of a multipart form", "content": {
                   "application/octet-stream": {"schema": _BINARY},
                   "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                                      "properties": {"file": _BINARY}}}}}}
ERRORS = {code: {"description": text, "content": {"application/json": {"example": {"error": "...", "detail": "..."}}}}
          for code, text in {400: "empty body or form without 'file'", 413: "upload above --max-upload-mb",
                             415: "a form, and python-multipart is not installed",
                             422: "not a usable volume (the detail says why)", 503: "queue full, retry later",
                             504: "past --timeout-s"}.items()}
SEGMENT_OK = {200: {"description": "the label map (.nii.gz, the input's shape and affine); header "
                    f"{VOLUMES_HEADER}: JSON {{class name: mL}}", "content": {"application/gzip": {"schema": _BINARY}}}}


@dataclass
class ServiceOptions:
    """Limits of one server.

    Attributes:
        concurrency: inferences at once; max_queue: requests that may wait for one.
        max_upload_bytes: largest body (a zip may unpack to 4x that); timeout_s: wait + inference, per request.
    """

    concurrency: int = 1
    max_queue: int = 64
    max_upload_bytes: int = 512 * 2**20
    timeout_s: float = 300.0


def create_app(served: ServedModel, options: ServiceOptions) -> FastAPI:
    """The application serving ``served`` within ``options``."""
    queue = InferenceQueue(options.concurrency, options.max_queue, options.timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        queue.shutdown()

    app = FastAPI(title="dinov2-3d segmentation service", version=dinov2.__version__, lifespan=lifespan,
                  description="Segment and embed 3D medical volumes with one finetuned dinov2-3d model.")
    _add_error_handlers(app)

    @app.get("/healthz", summary="liveness and queue state")
    async def healthz() -> dict:
        return {"status": "ok", **queue.state()}

    @app.get("/v1/model", summary="the served model: architecture, classes, preprocessing, version")
    async def model() -> dict:
        limits = {"concurrency": options.concurrency, "max_queue": options.max_queue,
                  "max_upload_mb": options.max_upload_bytes / 2**20, "timeout_s": options.timeout_s}
        return {**describe(served), "service": limits}

    @app.post("/v1/segment", summary="label map of a volume, in its own space, and class volumes",
              openapi_extra=UPLOAD_BODY, responses={**SEGMENT_OK, **ERRORS}, response_class=Response)
    async def segment(request: Request, frame: int | None = Query(None, ge=0, description="frame of a 4D NIfTI"),
                      filename: str | None = Query(None, description="the file's name, for messages")) -> Response:
        upload = await receive_upload(request, options.max_upload_bytes, filename)
        data, volumes = await _run(queue, upload, partial(_segment_job, served, upload, frame, options))
        name = upload.name if upload.name != "the upload" else "upload"
        return Response(data, media_type="application/gzip", headers={
            VOLUMES_HEADER: json.dumps(volumes, separators=(",", ":")),
            "Content-Disposition": f'attachment; filename="{_stem(name)}_seg.nii.gz"'})

    @app.post("/v1/embed", summary="backbone CLS and mean patch features of a volume",
              openapi_extra=UPLOAD_BODY, responses=ERRORS)
    async def embed(request: Request, frame: int | None = Query(None, ge=0, description="frame of a 4D NIfTI"),
                    filename: str | None = Query(None, description="the file's name, for messages")) -> dict:
        upload = await receive_upload(request, options.max_upload_bytes, filename)
        return await _run(queue, upload, partial(_embed_job, served, upload, frame, options))

    return app


async def _run(queue: InferenceQueue, upload: Upload, job: Callable):
    """``job()`` through the queue; its folder goes when it ends; its errors become ServiceErrors."""
    try:
        return await queue.run(job, cleanup=upload.cleanup)
    except Exception as exc:  # noqa: BLE001 - every failure is answered in words
        raise service_error(exc, upload.name) from exc


def _segment_job(served: ServedModel, upload: Upload, frame: int | None, options: ServiceOptions):
    """(label map bytes, volumes) of an upload; runs in a worker thread."""
    image = volume_path(upload, served.preset.in_channels, options.max_upload_bytes)
    output = upload.workdir / "labels.nii.gz"
    volumes = segment_nifti(served, image, output, frame)
    return output.read_bytes(), volumes


def _embed_job(served: ServedModel, upload: Upload, frame: int | None, options: ServiceOptions) -> dict:
    """Backbone features of an upload; runs in a worker thread."""
    return embed_nifti(served, volume_path(upload, served.preset.in_channels, options.max_upload_bytes), frame)


def _stem(name: str) -> str:
    """``scan.nii.gz`` → ``scan`` (quotes dropped: the name goes into a header)."""
    for suffix in (".nii.gz", ".nii", ".zip", ".dcm"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return "".join(c for c in name if c.isprintable() and c not in '"\\') or "upload"


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as ``{"error", "detail"}``; unexpected ones logged with their traceback."""

    @app.exception_handler(ServiceError)
    async def service(_request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http(_request: Request, exc: HTTPException) -> JSONResponse:
        error = {404: "not found", 405: "method not allowed"}.get(exc.status_code, "bad request")
        return JSONResponse({"error": error, "detail": str(exc.detail)}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": "invalid request", "detail": detail}, 422)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(service_error(exc, "the request").body(), 500)
