"""Unsupervised views of a frozen 3D ViT (``python -m dinov2.eval.visualisation``): token PCA or CLS attention.

``--vis-type pca``: the last block's normalised patch tokens of every input are pooled over the
foreground (jointly when several images are given), a PCA is fitted, every token is projected,
each component is scaled to ``[0, 1]`` (1st - 99th percentile of the foreground tokens) and
upsampled to the image. Written per image: one NIfTI per component
(``<name>_pca_<c>.nii.gz``), the foreground mask (``<name>_foreground.nii.gz``) and
``<name>_pca.png`` showing components 1-3 as RGB (by default; ``--rgb-components``) on axial,
coronal and sagittal slices, with the background removed by the foreground mask or by
component 0 (``--background pc0``: a first PCA on all tokens, thresholded at 0.5 after
scaling, with the sign that puts the intensity foreground high).

``--vis-type mhsa``: the CLS-to-patch attention of every head of the LAST block, one NIfTI per
head (``<name>_attn_head<h>.nii.gz``; each head's token weights sum to 1 over the patches, every
voxel carrying its patch's weight) and ``<name>_attn.png``.

Every NIfTI has the input's spatial shape and affine. A 4D input contributes the frame chosen by
``--frame`` (default 0). ``summary.json`` lists the files and the explained variance.

Example::

    python -m dinov2.eval.visualisation --pretrained-weights out/eval/training_99/teacher_checkpoint.pth \\
        --image-path brain.nii.gz --output-dir out/vis --vis-type pca --input-type full_image

``--pretrained-weights none --arch vit_large_3d`` shows a randomly initialised backbone instead
(seeded by ``--seed``; ``--backbone-kwarg patch_size=8`` sets constructor arguments): the
baseline that tells what pretraining added.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
import yaml

from dinov2.checkpoints.backbone_reader import load_pretrained_backbone
from dinov2.models.build import build_random_backbone, is_random_init
from dinov2.utils.device import add_device_argument, resolve_device
from dinov2.utils.entry_point import add_debug_flag, entry_point, start_entry_point
from dinov2.utils.errors import UsageError

from .attention import display_scale
from .inputs import VisVolume, load_vis_volume, to_tensor
from .montage import attention_montage, pca_montage
from .pca import fit_pca, scale_scores
from .tokens import INPUT_TYPES, TokenMaps, compute_token_maps, to_voxels, token_fraction

logger = logging.getLogger("dinov2.eval.visualisation")

VIS_TYPES = ("pca", "mhsa")
BACKGROUNDS = ("mask", "pc0")
# A token is foreground when at least half of its patch is.
TOKEN_FOREGROUND_FRACTION = 0.5


def save_like(data: np.ndarray, volume: VisVolume, path: Path) -> Path:
    """Write ``(X, Y, Z)`` data as float32 NIfTI with the input's affine (and so its space)."""
    if tuple(data.shape) != volume.shape:
        raise ValueError(f"Map of shape {tuple(data.shape)} is not on the input grid {volume.shape}")
    image = nib.Nifti1Image(np.asarray(data, dtype=np.float32), volume.affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)
    return path


def _token_matrix(maps: TokenMaps) -> torch.Tensor:
    """``(E, h, w, d)`` features → ``(h * w * d, E)``."""
    return maps.features.flatten(1).T


def _pc0_foreground(tokens: list[torch.Tensor], intensity_fg: list[torch.Tensor]) -> list[torch.Tensor]:
    """Foreground tokens from the first principal component of all tokens (see module docstring)."""
    first = fit_pca(torch.cat(tokens), 1)
    scores = [first.transform(t)[:, 0] for t in tokens]
    all_scores = torch.cat(scores)
    low, high = all_scores.min(), all_scores.max()
    scaled = [(s - low) / (high - low).clamp_min(1e-12) for s in scores]
    inside = torch.cat([s[m] for s, m in zip(scaled, intensity_fg)]).mean()
    outside_parts = [s[~m] for s, m in zip(scaled, intensity_fg)]
    outside = torch.cat(outside_parts).mean() if sum(p.numel() for p in outside_parts) else 1 - inside
    if inside < outside:  # SVD sign is arbitrary: orient PC0 so the head / body is high
        scaled = [1 - s for s in scaled]
    return [s > 0.5 for s in scaled]


def run_pca(model: torch.nn.Module, volumes: list[VisVolume], output_dir: Path, input_type: str,
            n_components: int = 10, rgb_components: Sequence[int] = (1, 2, 3), background: str = "mask",
            image_size=None, overlap: float = 0.5) -> dict:
    """PCA outputs of one or more volumes fitted jointly (see module docstring); returns the summary."""
    if len(rgb_components) != 3 or max(rgb_components) >= n_components or min(rgb_components) < 0:
        raise ValueError(f"--rgb-components needs 3 indices below --n-components ({n_components}), "
                         f"got {list(rgb_components)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    maps = [compute_token_maps(model, to_tensor(v), v.spacing, input_type, image_size, overlap, features=True)
            for v in volumes]
    tokens = [_token_matrix(m) for m in maps]
    intensity_fg = [token_fraction(torch.from_numpy(v.foreground), m.geometry).flatten() >= TOKEN_FOREGROUND_FRACTION
                    for v, m in zip(volumes, maps)]
    token_fg = _pc0_foreground(tokens, intensity_fg) if background == "pc0" else intensity_fg
    fit_tokens = torch.cat([t[m] for t, m in zip(tokens, token_fg)])
    if fit_tokens.shape[0] <= n_components:
        images = ", ".join(str(v.path) for v in volumes)
        raise ValueError(f"Only {fit_tokens.shape[0]} foreground tokens in {images} for {n_components} components; use "
                         "a larger input, a smaller patch size or fewer --n-components.")
    pca = fit_pca(fit_tokens, n_components)
    scores = [pca.transform(t) for t in tokens]
    scaled, _, _ = scale_scores(torch.cat(scores), torch.cat(token_fg))
    summary = {"vis_type": "pca", "input_type": input_type, "n_components": n_components,
               "background": background, "rgb_components": list(rgb_components), "fitted_tokens": pca.n_tokens,
               "explained_variance_ratio": [round(float(v), 6) for v in pca.explained_variance_ratio],
               "images": []}
    start = 0
    for volume, m, fg in zip(volumes, maps, token_fg):
        n = fg.numel()
        grid_maps = scaled[start:start + n].T.reshape(n_components, *m.geometry.grid)
        start += n
        voxels = to_voxels(grid_maps, m.geometry).numpy()
        if background == "pc0":
            mask = to_voxels(fg.float().reshape(1, *m.geometry.grid), m.geometry, mode="nearest")[0].numpy() > 0.5
        else:
            mask = volume.foreground
        files = [str(save_like(voxels[c], volume, output_dir / f"{volume.stem}_pca_{c}.nii.gz"))
                 for c in range(n_components)]
        mask_file = save_like(mask.astype(np.float32), volume, output_dir / f"{volume.stem}_foreground.nii.gz")
        rgb = np.stack([voxels[c] for c in rgb_components], axis=-1)
        png = output_dir / f"{volume.stem}_pca.png"
        pca_montage(volume.scaled, rgb, mask, volume.affine, rgb_components).save(png)
        summary["images"].append({"image": str(volume.path), "frame": volume.frame, "shape": list(volume.shape),
                                  "token_grid": list(m.geometry.grid), "components": files,
                                  "foreground": str(mask_file), "montage": str(png)})
    return summary


def run_mhsa(model: torch.nn.Module, volumes: list[VisVolume], output_dir: Path, input_type: str,
             image_size=None, overlap: float = 0.5) -> dict:
    """Last-block CLS attention maps of each volume; returns the summary."""
    summary = {"vis_type": "mhsa", "input_type": input_type, "images": []}
    for volume in volumes:
        m = compute_token_maps(model, to_tensor(volume), volume.spacing, input_type, image_size, overlap,
                               features=False, attention=True)
        # nearest: every voxel carries its patch's weight, so the token weights stay readable
        voxels = to_voxels(m.attention, m.geometry, mode="nearest")
        files = [str(save_like(voxels[h].numpy(), volume, output_dir / f"{volume.stem}_attn_head{h}.nii.gz"))
                 for h in range(voxels.shape[0])]
        shown = display_scale(voxels, torch.from_numpy(volume.foreground)).numpy()
        png = output_dir / f"{volume.stem}_attn.png"
        attention_montage(volume.scaled, shown, volume.foreground, volume.affine).save(png)
        summary["images"].append({"image": str(volume.path), "frame": volume.frame, "shape": list(volume.shape),
                                  "token_grid": list(m.geometry.grid), "heads": files, "montage": str(png)})
    return summary


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dinov2.eval.visualisation", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained-weights", required=True,
                        help="backbone checkpoint (teacher_checkpoint.pth), or 'none' for a random-init baseline of --arch")
    parser.add_argument("--arch", default=None, help="registry name of the random-init backbone (with "
                        "--pretrained-weights none), e.g. vit_large_3d")
    parser.add_argument("--backbone-kwarg", nargs="+", default=[], metavar="KEY=VALUE",
                        help="constructor argument of the random-init backbone, e.g. patch_size=8")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-init backbone")
    parser.add_argument("--image-path", required=True, nargs="+",
                        help="NIfTI volume(s) or DICOM series folder(s) (FOLDER::SERIES picks one of several); "
                        "PCA is fitted on all jointly")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--vis-type", choices=VIS_TYPES, default="pca")
    parser.add_argument("--input-type", choices=INPUT_TYPES, default="full_image")
    parser.add_argument("--n-components", type=int, default=10)
    parser.add_argument("--rgb-components", type=int, nargs=3, default=[1, 2, 3], help="components shown as R, G, B")
    parser.add_argument("--background", choices=BACKGROUNDS, default="mask",
                        help="foreground from the intensity mask (or --mask-path) or from PCA component 0")
    parser.add_argument("--mask-path", nargs="+", default=None, help="foreground mask per image (same grid)")
    parser.add_argument("--frame", type=int, default=0, help="frame of a 4D input")
    parser.add_argument("--image-size", type=int, nargs="+", default=None,
                        help="resize target / sliding window (1 or 3 ints; default: the model's native size)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (rounded to whole patches)")
    add_device_argument(parser, default="cpu", key=None)
    add_debug_flag(parser)
    return parser


def _backbone_kwargs(items: Sequence[str]) -> dict:
    """``["patch_size=8", "ffn_layer=swiglu"]`` -> constructor kwargs (values read as YAML scalars)."""
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--backbone-kwarg '{item}' is not KEY=VALUE (e.g. patch_size=8).")
        kwargs[key] = yaml.safe_load(value)
    return kwargs


def _backbone(args: argparse.Namespace, image_size) -> torch.nn.Module:
    """The checkpoint's backbone, or the seeded random-init baseline for ``--pretrained-weights none``."""
    device = resolve_device(args.device, key="--device")
    if not is_random_init(args.pretrained_weights):
        model, _ = load_pretrained_backbone(args.pretrained_weights, map_location=device)
        return model
    model, _ = build_random_backbone(args.arch, _backbone_kwargs(args.backbone_kwarg), image_size, flag="--arch",
                                     seed=args.seed)
    return model.to(device)


# Every ValueError of this command names a flag or file to fix: one ERROR line.
@entry_point(user_errors=(ValueError,))
def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the process exit code (1 with one ``ERROR:`` line for a user error)."""
    args = get_args_parser().parse_args(argv)
    start_entry_point()
    if args.mask_path is not None and len(args.mask_path) != len(args.image_path):
        raise UsageError(f"{len(args.mask_path)} masks for {len(args.image_path)} images: give one per image.")
    image_size = None
    if args.image_size is not None:
        if len(args.image_size) not in (1, 3):
            raise UsageError(f"--image-size takes 1 or 3 ints, got {args.image_size}")
        image_size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
    model = _backbone(args, image_size).eval()
    masks = args.mask_path or [None] * len(args.image_path)
    volumes = [load_vis_volume(p, frame=args.frame, mask_path=m) for p, m in zip(args.image_path, masks)]
    for v in volumes:
        if v.n_frames > 1:
            logger.info("%s: 4D series of %d frames; showing frame %d.", v.path, v.n_frames, v.frame)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.vis_type == "pca":
        summary = run_pca(model, volumes, output_dir, args.input_type, args.n_components, args.rgb_components,
                          args.background, image_size, args.overlap)
    else:
        summary = run_mhsa(model, volumes, output_dir, args.input_type, image_size, args.overlap)
    summary["pretrained_weights"] = os.fspath(args.pretrained_weights)
    summary["random_init"] = is_random_init(args.pretrained_weights)
    with open(Path(args.output_dir) / "summary.json", "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    logger.info("Wrote %s outputs for %d image(s) to %s.", args.vis_type, len(summary["images"]), args.output_dir)
    return 0

