"""What the pre-flight check costs: files per second read in full (1 and N threads) and from its cache.

Builds a datalist of ``--files`` entries from the installed sample volumes (symbolic links, so each
entry is a distinct path for the cache), then times ``checked_pretrain_entries``: a first run
that reads every file in full, with 1 thread and with ``--threads`` threads (the cache emptied
between them), and a second run that answers from the cache (one ``stat`` per file). The files
are in the page cache after the first read, so the figures are decompression and checking
(CPU), not disk: on a network filesystem the first run also waits for the data.

    python scripts/benchmark.py preflight --files 240 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence


def _datalist(folder: Path, files: int) -> tuple[Path, int]:
    """``files`` links to the small sample volumes (every side <= 128 voxels); the datalist and their bytes."""
    from dinov2.data.image_io import read_header
    from dinov2.sample_data import find_pretraining_volumes

    volumes = [p for p in find_pretraining_volumes() if max(read_header(p).shape[:3]) <= 128]
    entries, size = [], 0
    for i in range(files):
        source = Path(volumes[i % len(volumes)])
        link = folder / f"v{i:05d}{''.join(source.suffixes)}"
        link.symlink_to(source)
        entries.append({"image": str(link)})
        size += source.stat().st_size
    path = folder / "pretrain.json"
    path.write_text(json.dumps(entries))
    return path, size


def _timed(datalist: Path, cache_file: Path, threads: int) -> tuple[float, float]:
    """Wall and CPU seconds of one pre-flight over ``datalist`` with ``threads`` reading threads."""
    from dinov2.data import preflight

    original = preflight.run_preflight

    def with_threads(checks, **kwargs):
        return original(checks, **{**kwargs, "workers": threads})

    preflight.run_preflight = with_threads
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        preflight.checked_pretrain_entries(datalist, cache=preflight.PreflightCache(cache_file), progress=False)
        return time.perf_counter() - wall, time.process_time() - cpu
    finally:
        preflight.run_preflight = original


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python scripts/benchmark.py preflight", description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=240, help="datalist entries (links to the sample volumes)")
    parser.add_argument("--threads", type=int, default=2, help="reading threads of the parallel run")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        datalist, size = _datalist(folder, args.files)
        for label, threads, keep_cache in (("full read, 1 thread", 1, False),
                                           (f"full read, {args.threads} threads", args.threads, False),
                                           ("from the cache", args.threads, True)):
            cache_file = folder / "preflight.json"
            if not keep_cache and cache_file.exists():
                os.remove(cache_file)
            wall, cpu = _timed(datalist, cache_file, threads)
            rows.append({"run": label, "files": args.files, "wall_s": wall, "cpu_s": cpu,
                         "files_per_s": args.files / wall, "mb_per_s": size / wall / 1e6})
    load = os.getloadavg()[0]
    print(f"\nPre-flight over {args.files} files ({size / 1e6:.0f} MB compressed), load average {load:.2f}\n")
    print("| run | wall s | CPU s | files/s | MB/s (compressed) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['files_per_s']:.0f} | {r['mb_per_s']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
