"""A small client of the HTTP service, on the standard library only (``urllib``).

Example::

    from dinov2.serve import Client

    client = Client("http://127.0.0.1:8000")
    result = client.segment("scan.nii.gz", out="seg.nii.gz")   # or a DICOM series folder / zip
    print(result.volumes_ml)                                    # {"ventricles": 12.5, ...}
    features = client.embed("scan.nii.gz")                      # {"cls": [[...]], "patch_mean": [[...]], ...}

Connection errors (server starting, restarting) and 503 answers (queue full) are retried with
exponential back-off; other errors raise :class:`ServeError` carrying the server's message.
"""

from __future__ import annotations

import io
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VOLUMES_HEADER = "X-Volumes-mL"


class ServeError(Exception):
    """The server answered with an error (or could not be reached).

    Attributes:
        status: HTTP status (0 when no answer came).
        error: the server's short name of the problem (``"invalid volume"``...).
        detail: the server's explanation.
    """

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(f"HTTP {status} {error}: {detail}" if status else f"{error}: {detail}")
        self.status, self.error, self.detail = status, error, detail


@dataclass
class Segmentation:
    """Answer of :meth:`Client.segment`.

    Attributes:
        data: the label map, ``.nii.gz`` bytes (shape and affine of the input).
        volumes_ml: ``{class or region name: mL}``.
        path: where it was written (``out``), else None.
    """

    data: bytes
    volumes_ml: dict[str, float]
    path: Path | None = None


class Client:
    """Client of one ``python -m dinov2.serve`` server.

    Args:
        url: the server's base URL.
        timeout: seconds to wait for an answer (an inference on a CPU may take minutes).
        retries: extra attempts after a connection error or a 503.
        backoff: seconds before the first retry; doubled each time.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 600.0, retries: int = 3,
                 backoff: float = 0.5):
        self.url, self.timeout, self.retries, self.backoff = url.rstrip("/"), timeout, retries, backoff

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: ``{"status": "ok", "running", "queued", "concurrency"}``."""
        return json.loads(self._request("GET", "/healthz")[1])

    def model(self) -> dict[str, Any]:
        """``GET /v1/model``: architecture, classes, preprocessing, version, limits."""
        return json.loads(self._request("GET", "/v1/model")[1])

    def segment(self, path: str | os.PathLike, out: str | os.PathLike | None = None,
                frame: int | None = None) -> Segmentation:
        """Segment a NIfTI file, a zip of one DICOM series, or a DICOM series folder (zipped on the fly).

        Args:
            path: the volume.
            out: where to write the label map (``.nii.gz``); None keeps it in memory only.
            frame: frame of a 4D NIfTI.

        Raises:
            ServeError: the server's answer to a bad volume, a full queue, a timeout...
        """
        headers, data = self._request("POST", "/v1/segment", _body(Path(path)), _query(path, frame))
        result = Segmentation(data, json.loads(headers.get(VOLUMES_HEADER) or "{}"))
        if out is not None:
            result.path = Path(out)
            result.path.parent.mkdir(parents=True, exist_ok=True)
            result.path.write_bytes(data)
        return result

    def embed(self, path: str | os.PathLike, frame: int | None = None) -> dict[str, Any]:
        """Backbone features ``{"cls": (M, E), "patch_mean": (M, E), ...}`` of a volume (see :meth:`segment`)."""
        return json.loads(self._request("POST", "/v1/embed", _body(Path(path)), _query(path, frame))[1])

    def _request(self, method: str, route: str, body: bytes | None = None, query: str = ""):
        """``(headers, body)`` of a 2xx answer, after retries; raises :class:`ServeError` otherwise."""
        url = f"{self.url}{route}{'?' + query if query else ''}"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=body, method=method,
                                             headers={"Content-Type": "application/octet-stream"} if body else {})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    return answer.headers, answer.read()
            except urllib.error.HTTPError as exc:
                error = _server_error(exc)
                if exc.code != 503 or attempt == self.retries:
                    raise error from None
                delay = _retry_after(exc, self.backoff * 2**attempt)
            except OSError as exc:  # URLError, refused / reset connections, timeouts
                reason = getattr(exc, "reason", exc)
                if body is not None:
                    self._raise_if_too_large(len(body))  # the server cuts off an upload above its limit
                if isinstance(reason, TimeoutError) or attempt == self.retries:
                    raise ServeError(0, "no answer", f"{url}: {reason}") from None
                delay = self.backoff * 2**attempt
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _raise_if_too_large(self, size: int) -> None:
        """Raise the 413 the server sent while it closed the connection (the client was still sending)."""
        try:
            with urllib.request.urlopen(f"{self.url}/v1/model", timeout=10) as answer:
                limit_mb = float(json.loads(answer.read())["service"]["max_upload_mb"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if size > limit_mb * 2**20:
            raise ServeError(413, "upload too large", f"the upload ({size / 2**20:.1f} MB) is larger than the "
                             f"server's limit of {limit_mb:g} MB (--max-upload-mb)")


def _body(path: Path) -> bytes:
    """The bytes to upload: the file, or a DICOM folder zipped in memory."""
    if not path.is_dir():
        return path.read_bytes()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(p for p in path.iterdir() if p.is_file()):
            archive.write(file, file.name)
    return buffer.getvalue()


def _query(path: str | os.PathLike, frame: int | None) -> str:
    params = {"filename": Path(path).name + (".zip" if Path(path).is_dir() else "")}
    if frame is not None:
        params["frame"] = str(frame)
    return urllib.parse.urlencode(params)


def _server_error(exc: urllib.error.HTTPError) -> ServeError:
    """The server's ``{"error", "detail"}`` (or its raw text) as a :class:`ServeError`."""
    text = exc.read().decode("utf-8", "replace")
    try:
        body = json.loads(text)
        return ServeError(exc.code, str(body.get("error", exc.reason)), str(body.get("detail", "")))
    except (ValueError, AttributeError):
        return ServeError(exc.code, str(exc.reason), text[:500])


def _retry_after(exc: urllib.error.HTTPError, default: float) -> float:
    """The server's ``Retry-After`` seconds (capped at 30), else ``default``."""
    value = exc.headers.get("Retry-After", "")
    return min(30.0, float(value)) if value.replace(".", "", 1).isdigit() else default
