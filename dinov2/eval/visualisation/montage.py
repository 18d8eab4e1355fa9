"""PNG montages of axial, coronal and sagittal slices (Pillow only, no plotting library).

Volumes are shown in the closest canonical (RAS) orientation found from the affine, in the
neurological convention: the subject's left on the image's left, anterior or superior at the
top. Each panel is resampled so a pixel has the same size in millimetres along both axes.
"""

from __future__ import annotations

from typing import Sequence

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw

VIEWS = ("axial", "coronal", "sagittal")
# An inferno-like ramp (black - purple - red - orange - pale yellow) for heat maps.
_HEAT_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)
TITLE_HEIGHT = 14
PANEL_MM = 1.0  # millimetres per output pixel


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Map ``[0, 1]`` values to RGB ``uint8`` along an inferno-like ramp (shape ``(*values.shape, 3)``)."""
    v = np.clip(np.nan_to_num(values), 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    low = np.floor(v).astype(int).clip(0, len(_HEAT_ANCHORS) - 2)
    t = (v - low)[..., None]
    rgb = _HEAT_ANCHORS[low] * (1 - t) + _HEAT_ANCHORS[low + 1] * t
    return rgb.round().astype(np.uint8)


def _canonical(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Volume ``(X, Y, Z, ...)`` reoriented to RAS array axes; also its voxel sizes and the ornt."""
    ornt = nib.orientations.io_orientation(affine)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    canonical = nib.orientations.apply_orientation(volume, ornt)
    order = ornt[:, 0].astype(int)
    ras_zooms = np.empty(3)
    ras_zooms[order] = zooms
    return canonical, ras_zooms, ornt


def _to_ras_index(index: Sequence[float], shape: Sequence[int], ornt: np.ndarray) -> list[int]:
    out = [0, 0, 0]
    for axis, (target, flip) in enumerate(ornt):
        value = int(round(index[axis]))
        out[int(target)] = shape[axis] - 1 - value if flip < 0 else value
    return out


def _panels(volume: np.ndarray, affine: np.ndarray,
            center: Sequence[float]) -> list[tuple[np.ndarray, tuple[float, float]]]:
    """Three display slices (rows top to bottom) and their pixel sizes (row mm, column mm)."""
    canonical, zooms, ornt = _canonical(volume, affine)
    i, j, k = _to_ras_index(center, volume.shape[:3], ornt)
    slices = [
        (canonical[:, :, k], (zooms[1], zooms[0])),   # axial: rows = anterior..posterior, columns = left..right
        (canonical[:, j, :], (zooms[2], zooms[0])),   # coronal: rows = superior..inferior
        (canonical[i, :, :], (zooms[2], zooms[1])),   # sagittal: rows = superior..inferior, columns = back..front
    ]
    return [(np.swapaxes(s, 0, 1)[::-1], size) for s, size in slices]


def _panel_image(rgb: np.ndarray, pixel_mm: tuple[float, float]) -> Image.Image:
    rows, cols = rgb.shape[:2]
    size = (max(1, round(cols * pixel_mm[1] / PANEL_MM)), max(1, round(rows * pixel_mm[0] / PANEL_MM)))
    return Image.fromarray(np.ascontiguousarray(rgb)).resize(size, Image.Resampling.BILINEAR)


def gray(anatomy: np.ndarray, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """``uint8`` grey levels of intensities in ``[low, high]``, as RGB ``(*shape, 3)``."""
    g = (np.clip((anatomy - low) / (high - low), 0, 1) * 255).round().astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def foreground_center(mask: np.ndarray) -> list[float]:
    """Centre of the bounding box of a bool ``(X, Y, Z)`` mask (the volume centre if empty)."""
    if not mask.any():
        return [(s - 1) / 2 for s in mask.shape]
    idx = np.argwhere(mask)
    return list((idx.min(axis=0) + idx.max(axis=0)) / 2)


def montage(rows: Sequence[np.ndarray], titles: Sequence[str], affine: np.ndarray,
            center: Sequence[float]) -> Image.Image:
    """Grid of RGB slices: one row per volume, columns axial / coronal / sagittal.

    Args:
        rows: RGB ``uint8`` volumes ``(X, Y, Z, 3)`` on one grid.
        titles: one label per row.
        affine: ``(4, 4)`` affine of that grid.
        center: voxel index ``(i, j, k)`` the three slices pass through.

    Returns:
        The montage as a Pillow RGB image.
    """
    if len(rows) != len(titles) or not rows:
        raise ValueError(f"Need one title per row and at least one row, got {len(rows)} rows and {len(titles)} titles")
    grid = [[_panel_image(p, size) for p, size in _panels(volume, affine, center)] for volume in rows]
    widths = [max(row[c].width for row in grid) for c in range(3)]
    heights = [max(p.height for p in row) + TITLE_HEIGHT for row in grid]
    canvas = Image.new("RGB", (sum(widths), TITLE_HEIGHT + sum(heights)), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for c, view in enumerate(VIEWS):  # header: one view per column
        draw.text((sum(widths[:c]) + 2, 1), view, fill=(160, 160, 160))
    y = TITLE_HEIGHT
    for row, title, height in zip(grid, titles, heights):
        draw.text((2, y + 1), title, fill=(255, 255, 255))
        x = 0
        for c, panel in enumerate(row):
            canvas.paste(panel, (x, y + TITLE_HEIGHT))
            x += widths[c]
        y += height
    return canvas


def pca_montage(anatomy: np.ndarray, rgb: np.ndarray, mask: np.ndarray, affine: np.ndarray,
                components: Sequence[int]) -> Image.Image:
    """Anatomy, then three PCA components as RGB with the background removed.

    Args:
        anatomy: ``(X, Y, Z)`` intensities in ``[-1, 1]``.
        rgb: ``(X, Y, Z, 3)`` components scaled to ``[0, 1]``.
        mask: bool ``(X, Y, Z)`` foreground (black elsewhere).
        affine: the grid's affine.
        components: the component indices shown as red, green, blue (for the title).
    """
    colour = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8) * mask[..., None]
    label = "PCA " + "/".join(str(c) for c in components) + " as RGB"
    return montage([gray(anatomy), colour], ["anatomy", label], affine, foreground_center(mask))


def heat_overlay(base: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values`` in ``[0, 1]`` drawn over RGB ``base`` as heat colours, more opaque where higher.

    Args:
        base: RGB ``uint8`` ``(*shape, 3)`` (e.g. :func:`gray` of the anatomy).
        values: ``(*shape)`` in ``[0, 1]``.

    Returns:
        RGB ``uint8`` ``(*shape, 3)``.
    """
    alpha = np.clip(values, 0, 1)[..., None] * 0.8
    return (base.astype(np.float64) * (1 - alpha) + heat_colors(values) * alpha).round().astype(np.uint8)


def attention_montage(anatomy: np.ndarray, maps: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> Image.Image:
    """Anatomy, then one row per head with its attention (scaled to ``[0, 1]``) over the anatomy.

    Args:
        anatomy: ``(X, Y, Z)`` intensities in ``[-1, 1]``.
        maps: ``(heads, X, Y, Z)`` display-scaled attention.
        mask: bool ``(X, Y, Z)`` foreground (sets the slice position).
        affine: the grid's affine.
    """
    base = gray(anatomy)
    rows = [base] + [heat_overlay(base, m) for m in maps]
    titles = ["anatomy"] + [f"head {h}" for h in range(len(maps))]
    return montage(rows, titles, affine, foreground_center(mask))


def axial_row(volumes: Sequence[np.ndarray], titles: Sequence[str], affine: np.ndarray,
              center: Sequence[float]) -> Image.Image:
    """The axial slices of RGB volumes side by side, each titled (a compact preview, e.g. for TensorBoard).

    Args:
        volumes: RGB ``uint8`` volumes ``(X, Y, Z, 3)`` on one grid.
        titles: one label per volume.
        affine: ``(4, 4)`` affine of that grid (orientation and pixel size, as in :func:`montage`).
        center: voxel index ``(i, j, k)`` the slice passes through.

    Returns:
        A Pillow RGB image, one panel per volume from left to right.
    """
    if len(volumes) != len(titles) or not volumes:
        raise ValueError(f"Need one title per volume and at least one volume, got {len(volumes)} and {len(titles)}")
    panels = [_panel_image(*_panels(volume, affine, center)[0]) for volume in volumes]
    canvas = Image.new("RGB", (sum(p.width for p in panels), TITLE_HEIGHT + max(p.height for p in panels)))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for panel, title in zip(panels, titles):
        canvas.paste(panel, (x, TITLE_HEIGHT))
        draw.text((x + 2, 1), title, fill=(255, 255, 255))
        x += panel.width
    return canvas


# Distinct colours for label values, with the names the legend uses: value v >= 1 takes entry
# (v - 1) modulo the table, so a structure keeps its colour in every case whichever labels are
# present. Background (0) is never drawn.
LABEL_COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (230, 25, 75)), ("green", (60, 180, 75)), ("blue", (0, 130, 200)), ("yellow", (255, 225, 25)),
    ("magenta", (240, 50, 230)), ("cyan", (70, 240, 240)), ("orange", (245, 130, 48)),
    ("purple", (145, 30, 180)), ("lime", (210, 245, 60)), ("pink", (250, 190, 212)),
    ("teal", (0, 128, 128)), ("brown", (170, 110, 40)), ("olive", (128, 128, 0)), ("navy", (0, 0, 128)),
)
LABEL_ALPHA = 0.55
LEGEND_LINE = 14


def label_colour(value: int) -> tuple[str, tuple[int, int, int]]:
    """Name and RGB of the colour that draws label ``value`` (``value != 0``)."""
    return LABEL_COLOURS[(value - 1) % len(LABEL_COLOURS)]


def label_montage(anatomy: np.ndarray, labels: np.ndarray, affine: np.ndarray,
                  names: dict[int, str] | None = None) -> Image.Image:
    """Anatomy, then the label map drawn over it, with a colour legend underneath.

    Slices pass through the centre of the labelled region (the volume centre if nothing is
    labelled), so a preview shows the structures rather than an empty corner.

    Args:
        anatomy: ``(X, Y, Z)`` intensities in ``[-1, 1]``.
        labels: integer ``(X, Y, Z)`` label map on the same grid (0 = background).
        affine: the grid's ``(4, 4)`` affine.
        names: label value → name for the legend (default: the value).

    Returns:
        The montage as a Pillow RGB image.
    """
    if anatomy.shape != labels.shape:
        raise ValueError(f"anatomy {anatomy.shape} and labels {labels.shape} must share one grid")
    base = gray(anatomy)
    overlay, legend = label_overlay(base, labels, names)
    image = montage([base, overlay], ["anatomy", "labels"], affine, foreground_center(labels != 0))
    return with_legend(image, legend or [("no label found", (160, 160, 160))])


def label_overlay(base: np.ndarray, labels: np.ndarray, names: dict[int, str] | None = None
                  ) -> tuple[np.ndarray, list[tuple[str, tuple[int, int, int]]]]:
    """Every non-zero label value of ``labels`` painted over RGB ``base`` in its colour (:func:`label_colour`).

    Args:
        base: RGB ``uint8`` ``(*shape, 3)``.
        labels: integer ``(*shape)`` label map (0 = background, not drawn).
        names: label value → name for the legend (default: the value).

    Returns:
        ``(overlay, legend)``: RGB ``uint8`` ``(*shape, 3)`` and one ``(text, colour)`` per value drawn.
    """
    names = names or {}
    overlay = base.astype(np.float64)
    legend = []
    for value in (int(v) for v in np.unique(labels) if v != 0):
        colour_name, colour = label_colour(value)
        where = labels == value
        overlay[where] = (1 - LABEL_ALPHA) * overlay[where] + LABEL_ALPHA * np.asarray(colour, dtype=np.float64)
        legend.append((f"{value} {names.get(value, '')}".strip() + f" ({colour_name})", colour))
    return overlay.round().astype(np.uint8), legend


def with_legend(image: Image.Image, entries: Sequence[tuple[str, tuple[int, int, int]]]) -> Image.Image:
    """``image`` with rows of coloured legend entries ``(text, RGB)`` appended below, wrapped to its width."""
    draw = ImageDraw.Draw(image)
    lines: list[list[tuple[str, tuple[int, int, int], int]]] = [[]]
    x = 2
    for text, colour in entries:
        width = int(draw.textlength(text)) + 24  # swatch + gap
        if lines[-1] and x + width > image.width:
            lines.append([])
            x = 2
        lines[-1].append((text, colour, x))
        x += width
    canvas = Image.new("RGB", (image.width, image.height + LEGEND_LINE * len(lines) + 4), (0, 0, 0))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        y = image.height + 2 + row * LEGEND_LINE
        for text, colour, x in line:
            draw.rectangle((x, y + 2, x + 9, y + 11), fill=colour)
            draw.text((x + 13, y), text, fill=(255, 255, 255))
    return canvas
