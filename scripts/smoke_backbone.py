"""Smoke run of the 3D ViT backbone on a real brain volume shipped inside a PyPI package.

Loads the first real volume found by :mod:`dinov2.data.sample_data`, scales its intensities to
[-1, 1], centre-crops it to a multiple of the patch size, and embeds it with a randomly
initialised ViT. Prints the feature shapes and the time taken. Used by ``scripts/demo.sh``
until the full pretrain → finetune → visualise demo lands.
"""

from __future__ import annotations

import argparse
import time

import nibabel as nib
import numpy as np
import torch

from dinov2.data.sample_data import find_pretraining_volumes
from dinov2.models import build_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small_3d")
    parser.add_argument("--patch-size", type=int, default=16)
    args = parser.parse_args(argv)

    path = next(p for p in find_pretraining_volumes() if "MNI152_T1_2mm" in p.name or "2mm" in p.name)
    image = nib.load(path)
    volume = np.asarray(image.dataobj, dtype=np.float32)
    lo, hi = np.percentile(volume, [0.05, 99.95])
    volume = np.clip((volume - lo) / max(hi - lo, 1e-6) * 2 - 1, -1, 1)
    p = args.patch_size
    starts = [(s - s // p * p) // 2 for s in volume.shape[:3]]
    volume = volume[tuple(slice(a, a + s // p * p) for a, s in zip(starts, volume.shape[:3]))]
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    print(f"volume: {path}\n  shape {tuple(image.shape)}, spacing {tuple(float(z) for z in image.header.get_zooms()[:3])} mm → input {tuple(x.shape)}", flush=True)

    torch.manual_seed(0)
    model = build_model(args.arch, img_size=96, patch_size=p).eval()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.forward_features(x)
        attn = model.get_last_self_attention(x)
    elapsed = time.perf_counter() - start
    print(f"{args.arch} (random init, {sum(t.numel() for t in model.parameters()) / 1e6:.1f} M parameters)")
    print(f"  CLS token       {tuple(out['x_norm_clstoken'].shape)}")
    print(f"  patch tokens    {tuple(out['x_norm_patchtokens'].shape)}  grid {model.patch_embed.grid_size(x.shape[2:])}")
    print(f"  last attention  {tuple(attn.shape)}  (sums to 1 over patches: {torch.allclose(attn.sum(-1), torch.ones(1))})")
    print(f"  forward + attention in {elapsed:.2f} s on {torch.get_num_threads()} CPU threads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
