"""From a request body to a NIfTI file on disk: receiving, recognising and unpacking uploads.

An upload is saved under a private temporary folder, then recognised by its first bytes (its name
is only a hint): gzip → ``.nii.gz``, zip → a DICOM series, ``DICM`` at byte 128 → a DICOM file,
anything else → ``.nii`` (the volume checks of :func:`~dinov2.data.validation.read_volume` then
say what it really is). A DICOM series (or multi-frame DICOM file) is converted to NIfTI with the
affine MONAI reads it with (RAS), so the label map comes back on the series' own grid.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from dinov2.data.image_io import is_dicom_candidate, is_image_dataset, is_multiframe, read_dicom_slice_headers
from dinov2.data.validation import read_error, read_volume

from .errors import ServiceError, upload_too_large

GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with files; an empty zip
SAVED_NAMES = {"nifti-gz": "upload.nii.gz", "nifti": "upload.nii", "zip": "upload.zip", "dicom": "upload.dcm"}
CHUNK = 1 << 20
# A zip of DICOM slices may unpack to a few times its size; more than this is refused (zip bombs).
UNPACK_FACTOR = 4


class UploadTooLarge(Exception):
    """The body grew past the limit while it was being received."""


@dataclass
class Upload:
    """One received upload.

    Attributes:
        workdir: the request's private temporary folder (removed by :meth:`cleanup`).
        path: the saved body, named after its kind (``upload.nii.gz``, ``upload.zip``...).
        kind: ``"nifti-gz"``, ``"nifti"``, ``"zip"`` or ``"dicom"``.
        name: the client's file name, or ``"the upload"`` (for messages and the answer's file name).
    """

    workdir: Path
    path: Path
    kind: str
    name: str

    def cleanup(self) -> None:
        """Remove the request's temporary folder."""
        shutil.rmtree(self.workdir, ignore_errors=True)


def upload_kind(head: bytes) -> str:
    """Kind of an upload from its first 132 bytes (see the module docstring)."""
    if head.startswith(GZIP_MAGIC):
        return "nifti-gz"
    if head.startswith(ZIP_MAGICS):
        return "zip"
    if head[128:132] == b"DICM":
        return "dicom"
    return "nifti"


def limited_receive(receive, limit: int):
    """An ASGI ``receive`` that raises :class:`UploadTooLarge` once the body passes ``limit`` bytes."""
    received = 0

    async def wrapped():
        nonlocal received
        message = await receive()
        if message.get("type") == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise UploadTooLarge()
        return message

    return wrapped


async def receive_upload(request, limit: int, filename: str | None = None) -> Upload:
    """Save the body of ``request`` (a Starlette ``Request``) under a new temporary folder.

    The body is the file itself, or a ``multipart/form-data`` form whose ``file`` field is.

    Args:
        request: the request; its body has not been read.
        limit: largest accepted body in bytes.
        filename: the client's file name (query parameter), else the form's, else none.

    Returns:
        The :class:`Upload`; the caller owns its folder.

    Raises:
        ServiceError: 413 above ``limit`` (announced or received), 400 for an empty body or a
            form without a ``file`` field.
    """
    from starlette.requests import ClientDisconnect  # noqa: PLC0415 - the serving extra is imported lazily

    announced = request.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > limit:
        raise upload_too_large(limit)
    workdir, upload = Path(tempfile.mkdtemp(prefix="dinov2-serve-")), None
    try:
        name = await _save_body(request, limit, workdir / "upload.bin")
        upload = _recognised(workdir, workdir / "upload.bin", filename or name)
        return upload
    except UploadTooLarge:
        raise upload_too_large(limit) from None
    except ClientDisconnect:  # nobody reads this answer; it only ends the request quietly
        raise ServiceError(400, "upload interrupted", "the client closed the connection during the upload") from None
    finally:
        if upload is None:
            shutil.rmtree(workdir, ignore_errors=True)


async def _save_body(request, limit: int, target: Path) -> str | None:
    """Write the uploaded file to ``target``; returns the form's file name (None for a raw body)."""
    from starlette.requests import Request  # noqa: PLC0415 - the serving extra is imported lazily

    body = Request(request.scope, limited_receive(request.receive, limit))
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        with open(target, "wb") as handle:
            async for chunk in body.stream():
                handle.write(chunk)
        return None
    if not _multipart_parser_installed():
        raise ServiceError(415, "multipart not supported", "this server lacks python-multipart, so it cannot read "
                           "forms; send the file itself as the body (curl --data-binary @scan.nii.gz ...)")
    async with body.form(max_files=1, max_fields=16) as form:
        field = form.get("file")
        if field is None or isinstance(field, str):
            raise ServiceError(400, "no file", "the multipart form has no file in a field named 'file' "
                               "(curl -F file=@scan.nii.gz ...), or send the file itself as the body")
        with open(target, "wb") as handle:  # in a thread: a large spooled file would stall the event loop
            await asyncio.to_thread(shutil.copyfileobj, field.file, handle, CHUNK)
        return field.filename


def _multipart_parser_installed() -> bool:
    """Whether Starlette can parse forms (python-multipart, under its new or its old module name)."""
    return any(importlib.util.find_spec(name) is not None for name in ("python_multipart", "multipart"))


def _recognised(workdir: Path, saved: Path, name: str | None) -> Upload:
    """Rename the saved body after its kind (the readers go by the suffix)."""
    if saved.stat().st_size == 0:
        raise ServiceError(400, "empty upload", "the request body is empty: send a NIfTI file (.nii, .nii.gz) or "
                           "a zip of one DICOM series as the body, or as the field 'file' of a multipart form")
    with open(saved, "rb") as handle:
        kind = upload_kind(handle.read(132))
    path = saved.rename(workdir / SAVED_NAMES[kind])
    return Upload(workdir, path, kind, Path(name).name if name else "the upload")


def volume_path(upload: Upload, channels: int, max_upload: int) -> Path:
    """The NIfTI file to segment for ``upload`` (a DICOM series or file is converted first).

    Args:
        upload: the received upload.
        channels: image channels of the model (the DICOM series is checked against them).
        max_upload: the upload limit in bytes; the files of a zip may add up to ``UNPACK_FACTOR`` times it.

    Raises:
        ServiceError: 413/422 for a zip that is too large, damaged, or holds no or several series.
        InputVolumeError: a DICOM volume that cannot be read.
    """
    if upload.kind in ("nifti-gz", "nifti"):
        return upload.path
    unpacked = UNPACK_FACTOR * max_upload
    source = upload.path if upload.kind == "dicom" else dicom_source(upload.path, upload.workdir, unpacked)
    return dicom_to_nifti(source, upload.workdir / "dicom.nii.gz", channels)


def dicom_source(archive: Path, workdir: Path, max_unpacked: int) -> Path:
    """Unpack ``archive`` and return its one DICOM series (a folder of its slices) or multi-frame file.

    Raises:
        ServiceError: 413 when the files add up to more than ``max_unpacked`` bytes; 422 for a
            damaged zip, unreadable DICOM headers, no DICOM image, or several series.
    """
    files = _unpack(archive, workdir / "unpacked", max_unpacked)
    readable, errors = read_dicom_slice_headers(p for p in files if is_dicom_candidate(p))
    if errors:
        raise ServiceError(422, "invalid DICOM", f"{len(errors)} DICOM file(s) of the zip are unreadable "
                           f"({errors[0].path.name[6:]}: {errors[0].reason}); export the series again")
    images = [(p, ds) for p, ds in readable if is_image_dataset(ds)]
    series = Counter(str(ds.get("SeriesInstanceUID", "")) for _, ds in images)
    if not series:
        raise ServiceError(422, "no DICOM series", f"the zip holds {len(files)} file(s) but no DICOM image (files "
                           "named .dcm or starting with the DICOM preamble); zip the folder of one series")
    if len(series) > 1:
        raise ServiceError(422, "several DICOM series", f"the zip holds {len(series)} DICOM series (with "
                           f"{', '.join(str(n) for n in series.values())} images); send one series per request")
    if len(images) == 1 and is_multiframe(images[0][1]):
        return images[0][0]
    folder = workdir / "series"
    folder.mkdir()
    for path, _ in images:  # only the series' slices: other files would trip the DICOM reader
        path.rename(folder / path.name)
    return folder


def _unpack(archive: Path, folder: Path, max_unpacked: int) -> list[Path]:
    """Extract the regular files of ``archive`` flat into ``folder`` (numbered: no clashes, no paths)."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = [m for m in zipped.infolist() if not m.is_dir() and not _hidden(m.filename)]
            if sum(m.file_size for m in members) > max_unpacked:
                raise upload_too_large(max_unpacked, "the unpacked zip", f"{UNPACK_FACTOR} x --max-upload-mb")
            folder.mkdir()
            files = []
            for number, member in enumerate(members):
                target = folder / f"{number:05d}_{Path(member.filename).name}"
                with zipped.open(member) as source, open(target, "wb") as handle:
                    shutil.copyfileobj(source, handle, CHUNK)
                files.append(target)
            return files
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as exc:
        raise ServiceError(422, "invalid zip", f"the upload starts like a zip archive but cannot be unpacked "
                           f"({type(exc).__name__}: {exc}); zip the series folder again") from None


def _hidden(member: str) -> bool:
    """macOS resource forks and dot files are never slices."""
    return member.startswith("__MACOSX/") or Path(member).name.startswith(".")


def dicom_to_nifti(source: Path, target: Path, channels: int) -> Path:
    """Write the DICOM series folder (or multi-frame file) ``source`` as the NIfTI file ``target``.

    The voxels ``(X, Y, Z)`` (columns, rows, slices) and the RAS affine are the ones MONAI's readers
    give (:func:`~dinov2.data.readers.image_readers`), as for every DICOM input of the toolkit.

    Raises:
        InputVolumeError: the series cannot be read, is not 3D, or does not give ``channels`` channels.
    """
    from monai.transforms import LoadImage  # noqa: PLC0415 - heavy; only DICOM uploads need it

    from dinov2.data.readers import image_readers  # noqa: PLC0415

    read_volume(source, channels=channels, frame_flag=None, read_voxels=False)
    try:
        image = LoadImage(reader=image_readers(), image_only=True)(os.fspath(source))
    except Exception as exc:  # noqa: BLE001 - every reader failure becomes one message
        raise read_error(source, exc) from exc
    nib.save(nib.Nifti1Image(np.asarray(image), np.asarray(image.affine, dtype=np.float64)), target)
    return target
