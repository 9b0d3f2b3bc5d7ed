"""The server a benchmark drives: `icaserve serve` (one worker, so one pid to measure) on a free
loopback port, started and stopped by the benchmark itself."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Started with only the given ICASERVE_* settings (inherited ones are dropped); ready when
    /readyz answers 200. Its stderr is drained (a full pipe would stall the server) and its tail kept
    for error messages."""

    def __init__(self, store: Path, env: dict[str, str], ready_timeout_s: float = 180.0,
                 root: Path = ROOT, command: list[str] | None = None,
                 ready: tuple[str, str, bytes] = ("GET", "/readyz", b"")) -> None:
        """`root`: the source tree to run (another commit's worktree, for side-by-side runs);
        `command`: another server to run instead of `icaserve serve` ({port} is filled in);
        `ready`: the (method, path, body) request that answers 200 once the server is ready."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full = {k: v for k, v in os.environ.items() if not k.startswith("ICASERVE_")}
        full.update({"ICASERVE_STORE": str(store), **env})
        full["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
        argv = [sys.executable, "-m", "icaserve.cli", "serve", "--host", "127.0.0.1", "--port", "{port}",
                "--workers", "1"] if command is None else command
        self.proc = subprocess.Popen(
            [a.replace("{port}", str(self.port)) for a in argv],
            cwd=root, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._err_tail: list[bytes] = []
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited: " + self.log_tail()[-2000:])
            try:
                if httpx.request(ready[0], f"{self.url}{ready[1]}", content=ready[2], timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready within {ready_timeout_s:g} s")

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self._err_tail = (self._err_tail + [line])[-200:]

    def log_tail(self) -> str:
        return b"".join(self._err_tail).decode(errors="replace")

    def rss_mib(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode
