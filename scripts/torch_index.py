"""Decide where scripts/setup_env.sh installs torch from (standard library only).

Prints the extra pip arguments for installing torch on stdout, one per line (nothing means
pip's default index), and one ``[setup] ...`` line on stderr saying which build and why:

- an NVIDIA GPU is present (``nvidia-smi -L`` lists one, or /proc/driver/nvidia/gpus has
  entries): pip's default index, as before (GPU users install their CUDA build first, see README);
- no GPU and PyTorch's CPU index is reachable: ``--index-url https://download.pytorch.org/whl/cpu``
  (the CPU wheel, ~200 MB);
- no GPU and that index is unreachable (checked with a 5 s probe): the default index, and the
  line says what that may cost (on PyPI, Linux x86_64 torch is the CUDA build: the wheel plus
  its nvidia-* packages are several GB).

``DINOV2_TORCH_INDEX`` overrides the detection: ``auto`` (default), ``cpu`` (CPU index, no
probe), ``cuda`` or ``default`` (pip's default index), or an index URL (``--index-url URL``).

Usage: torch_index.py [--spec torch==2.13.0] [--gpu yes|no] [--reachable yes|no]
(--gpu / --reachable replace the detection and the probe; the tests use them.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import ssl
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Callable

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
ENV_VAR = "DINOV2_TORCH_INDEX"
PROBE_TIMEOUT_S = 5.0


def gpu_present() -> bool:
    """True when an NVIDIA GPU is visible: ``nvidia-smi -L`` lists one, or the driver lists one."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and any(line.startswith("GPU ") for line in out.stdout.splitlines()):
                return True
        except (OSError, subprocess.SubprocessError):
            pass
    gpus = Path("/proc/driver/nvidia/gpus")
    try:
        return gpus.is_dir() and any(gpus.iterdir())
    except OSError:
        return False


def index_reachable(url: str = CPU_INDEX, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when ``url/torch/`` answers within ``timeout`` seconds (DNS included)."""
    result = [False]

    def probe():
        cafile = os.environ.get("PIP_CERT")
        context = ssl.create_default_context(cafile=cafile if cafile and os.path.isfile(cafile) else None)
        try:
            req = urllib.request.Request(url.rstrip("/") + "/torch/", method="HEAD")
            with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
                result[0] = 200 <= resp.status < 400
        except Exception:
            result[0] = False

    # urlopen's timeout does not cover name resolution: bound the whole probe with a thread.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return result[0]


def decide(spec: str, override: str | None, gpu: Callable[[], bool],
           reachable: Callable[[], bool]) -> tuple[list[str], str]:
    """Return (extra pip arguments, the one-line message). ``gpu`` and ``reachable`` are only
    called when the decision needs them (no GPU check or probe when overridden)."""
    choice = (override or "").strip()
    if choice.lower() in ("", "auto"):
        if gpu():
            return [], (f"[setup] installing {spec} from the default index (NVIDIA GPU found; "
                        f"install your CUDA build first to choose it, see README)")
        if reachable():
            return ["--index-url", CPU_INDEX], (
                f"[setup] installing {spec} CPU build from {CPU_INDEX} (no NVIDIA GPU found; "
                f"~200 MB)")
        return [], (f"[setup] installing {spec} from the default index (no NVIDIA GPU found, but "
                    f"{CPU_INDEX} is unreachable; on PyPI for Linux x86_64 that is the CUDA build, "
                    f"several GB with its nvidia-* packages, instead of the ~200 MB CPU wheel)")
    if choice.lower() == "cpu":
        return ["--index-url", CPU_INDEX], f"[setup] installing {spec} CPU build from {CPU_INDEX} ({ENV_VAR}=cpu)"
    if choice.lower() in ("cuda", "default"):
        return [], f"[setup] installing {spec} from the default index ({ENV_VAR}={choice})"
    if "://" in choice:
        return ["--index-url", choice], f"[setup] installing {spec} from {choice} ({ENV_VAR})"
    raise ValueError(f"{ENV_VAR}={choice!r}: expected auto, cpu, cuda, default or an index URL")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="torch", help="the requirement, for the message")
    parser.add_argument("--gpu", choices=("yes", "no"), help="skip GPU detection")
    parser.add_argument("--reachable", choices=("yes", "no"), help="skip the CPU index probe")
    args = parser.parse_args(argv)
    gpu = (lambda: args.gpu == "yes") if args.gpu else gpu_present
    reachable = (lambda: args.reachable == "yes") if args.reachable else index_reachable
    try:
        pip_args, message = decide(args.spec, os.environ.get(ENV_VAR), gpu, reachable)
    except ValueError as err:
        print(f"[setup] error: {err}", file=sys.stderr)
        return 2
    print(message, file=sys.stderr)
    for arg in pip_args:
        print(arg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
