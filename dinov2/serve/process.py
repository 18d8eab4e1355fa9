"""Run a server in a child process (tests, benchmarks, notebooks): start it, wait for it, stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Sequence


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """``python -m dinov2.serve`` in a child process, its output in ``log``.

    Args:
        checkpoint: the model to serve.
        log: file that receives the server's stdout and stderr.
        args: more flags (``--concurrency 2``...).
        port: port to listen on (default: a free one).
        env: extra environment variables.

    Example:
        >>> with ServerProcess("best_model.pth", Path("server.log")) as server:
        ...     Client(server.url).health()
    """

    def __init__(self, checkpoint: str | os.PathLike, log: Path, args: Sequence[str] = (), port: int | None = None,
                 env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        command = [sys.executable, "-m", "dinov2.serve", "--checkpoint", os.fspath(checkpoint),
                   "--port", str(self.port), *args]
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 60.0) -> "ServerProcess":
        """Return once ``/healthz`` answers.

        Raises:
            RuntimeError: the process ended or did not answer within ``timeout`` s (with its log's end).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2):
                    return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not answer within {timeout:g} s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the server's output."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> int:
        """Interrupt the server (as Ctrl-C does), kill it if it does not end; returns its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> "ServerProcess":
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
