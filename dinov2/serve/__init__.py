"""HTTP service for one finetuned segmentation model: ``python -m dinov2.serve --checkpoint best_model.pth``.

FastAPI and Uvicorn are an optional extra (``pip install 'dinov2-3d[serve]'``), imported only by
the server; :class:`Client` needs the standard library only. OpenAPI page: ``/docs``.

Uploads (``POST /v1/segment`` and ``POST /v1/embed``): the request body is the file itself
(``curl --data-binary @scan.nii.gz``), or the field ``file`` of a multipart form
(``curl -F file=@scan.nii.gz``). Accepted: a NIfTI file (``.nii`` / ``.nii.gz``; 3D, or 4D with
``?frame=N``, or 4D whose frames are the model's modalities), a zip of one DICOM series, or one
multi-frame DICOM file; recognised by content, the name does not matter. Query parameters:
``frame`` (4D inputs), ``filename`` (the name used in messages and in the answer's file name).

``POST /v1/segment`` answers ``200`` with

* body: the label map, gzip-compressed NIfTI (``application/gzip``), with the shape and affine of
  the input (of the NIfTI the DICOM series reads as: RAS affine, axes columns/rows/slices), the
  same file ``python -m dinov2.eval.segmentation.predict`` writes (uint8 class indices; for
  multi-label presets the preset's label values);
* header ``X-Volumes-mL``: JSON ``{class or region name: volume in mL}`` for every foreground
  class (``0.0`` when absent) = voxel count × ``|det(affine[:3, :3])|`` / 1000;
* header ``Content-Disposition``: ``attachment; filename="<name>_seg.nii.gz"``.

So ``curl -D headers.txt -o seg.nii.gz --data-binary @scan.nii.gz http://host:8000/v1/segment``
gives both, and a viewer loads the body as it would load the scan.

``POST /v1/embed`` answers JSON ``{"cls": [[E floats]] (M, E), "patch_mean": (M, E), "streams":
[M names], "embed_dim": E, "windows": n, "window_size": [3], "preprocessed_shape": [3]}``: the
backbone's normalised CLS token and mean patch token over ``n`` windows of the model's input
size, after the model's preprocessing (``M`` = 1 unless the backbone takes modalities one at a
time).

``GET /v1/model``: package and version, checkpoint, head, architecture, classes or regions,
modalities, preprocessing (orientation, spacing, intensity, foreground crop, window size),
inference settings and the service's limits. ``GET /healthz``: ``{"status": "ok", "running",
"queued", "concurrency"}``.

Errors are JSON ``{"error": short name, "detail": what is wrong and what to do}``: 400 empty body
or no ``file`` field, 413 above ``--max-upload-mb`` (a zip may unpack to 4x that), 415 a form on a
server without python-multipart, 422 not a usable volume (not a volume, truncated, 2D/4D/5D, wrong
channel count, a zip with no or several series...), 503 queue full (``Retry-After``), 504 past
``--timeout-s`` (queue wait + inference), 500 a bug (traceback in the server's log only). The
server keeps serving after any of them.
"""

from .client import Client, Segmentation, ServeError

__all__ = ["Client", "Segmentation", "ServeError"]
