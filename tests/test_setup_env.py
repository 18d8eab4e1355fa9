"""scripts/torch_index.py: where scripts/setup_env.sh installs torch from (issue #13).

No test reaches the internet: GPU presence and the CPU index's reachability are injected, or
stood in for by a fake ``nvidia-smi`` and a server on the loopback interface.
"""

import functools
import http.server
import importlib.util
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "torch_index.py"
SPEC = "torch==2.13.0"
CPU_ARGS = ["--index-url", "https://download.pytorch.org/whl/cpu"]


def _load():
    spec = importlib.util.spec_from_file_location("torch_index", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ti = _load()


def _never():
    raise AssertionError("the decision should not need this check")


def _const(value):
    return lambda: value


def test_gpu_present_uses_the_default_index_without_probing():
    args, message = ti.decide(SPEC, None, gpu=_const(True), reachable=_never)
    assert args == []
    assert "default index" in message and "GPU found" in message and SPEC in message


def test_no_gpu_and_reachable_cpu_index_installs_the_cpu_wheel():
    args, message = ti.decide(SPEC, "", gpu=_const(False), reachable=_const(True))
    assert args == CPU_ARGS
    assert "CPU build" in message and "no NVIDIA GPU found" in message


def test_no_gpu_and_unreachable_cpu_index_falls_back_to_the_default_index_and_says_so():
    args, message = ti.decide(SPEC, "auto", gpu=_const(False), reachable=_const(False))
    assert args == []
    assert "unreachable" in message and "default index" in message
    assert "200 MB" in message and "several GB" in message
    assert "\n" not in message


@pytest.mark.parametrize("override, expected", [
    ("cpu", CPU_ARGS), ("CPU", CPU_ARGS), ("cuda", []), ("default", []),
    ("https://download.pytorch.org/whl/cu128", ["--index-url", "https://download.pytorch.org/whl/cu128"]),
])
@pytest.mark.parametrize("gpu", [True, False])
def test_the_override_wins_and_skips_detection(override, expected, gpu):
    args, message = ti.decide(SPEC, override, gpu=_never, reachable=_never)
    assert args == expected
    assert ti.ENV_VAR in message


def test_an_unknown_override_is_an_error():
    with pytest.raises(ValueError, match=ti.ENV_VAR):
        ti.decide(SPEC, "rocm-please", gpu=_never, reachable=_never)


def _cli(*args, env_value=None):
    env = {k: v for k, v in os.environ.items() if k != ti.ENV_VAR}
    if env_value is not None:
        env[ti.ENV_VAR] = env_value
    return subprocess.run([sys.executable, str(SCRIPT), "--spec", SPEC, *args],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("gpu, reachable, override, stdout", [
    ("yes", "yes", None, []),
    ("no", "yes", None, CPU_ARGS),
    ("no", "no", None, []),
    ("no", "no", "cpu", CPU_ARGS),
    ("yes", "yes", "cpu", CPU_ARGS),
    ("no", "yes", "default", []),
])
def test_cli_prints_pip_arguments_on_stdout_and_one_line_on_stderr(gpu, reachable, override, stdout):
    proc = _cli("--gpu", gpu, "--reachable", reachable, env_value=override)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("[setup] installing " + SPEC)


def test_cli_rejects_an_unknown_override():
    proc = _cli("--gpu", "no", "--reachable", "no", env_value="bogus")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "DINOV2_TORCH_INDEX" in proc.stderr


def _fake_nvidia_smi(tmp_path, monkeypatch, body):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + body + "\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


def test_gpu_detection_reads_nvidia_smi(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch, 'echo "GPU 0: NVIDIA H200 (UUID: GPU-0000)"')
    assert ti.gpu_present()


@pytest.mark.skipif(Path("/proc/driver/nvidia/gpus").is_dir(), reason="this machine has an NVIDIA driver")
def test_gpu_detection_is_false_when_nvidia_smi_fails_or_lists_nothing(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch, 'echo "NVIDIA-SMI has failed" >&2; exit 9')
    assert not ti.gpu_present()
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert not ti.gpu_present()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_probe_on_loopback(tmp_path, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "torch").mkdir()
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert ti.index_reachable(f"http://127.0.0.1:{server.server_port}/", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert not ti.index_reachable(f"http://127.0.0.1:{port}/", timeout=2)
