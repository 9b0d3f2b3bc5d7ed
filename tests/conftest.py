"""Shared fixtures: a tiny model store, and real uvicorn servers over it.

- `model_store` (session): a store in a temporary folder, built with `training.export.export_model`
  from small untrained models (seeded, so every run publishes the same weights):

      ica   v1, v2   ICA-LSTM (matrix variant), different weights per version
      lstm  v1       plain LSTM, also with its ONNX file

  All take N_FEATURES = 6 features, classes CLASS_NAMES, train_length 12, max_length 64, and have
  the non-trivial normalisation NORMALIZATION. Treat it as read-only; tests that change a store
  take a copy first (`copy_store`).
- `server_factory` (session): `server_factory(store, {"MAX_WAIT_MS": 50, ...})` starts
  `python -m icaserve.cli serve` on a free loopback port with those
  ICASERVE_* settings (the prefix may be left out), waits until GET /readyz answers 200 and
  returns a `Server` (`.url`, `.client()`, `.stop()`, `.log()`). Whatever is still running at the
  end of the session is stopped (SIGTERM, then SIGKILL). Call `.stop()` yourself (e.g. from a
  module- or class-scoped fixture) to free the machine early.

The machine running these tests may be small and shared: servers default to one torch thread
and to the CPU, and polling for new versions is off unless a test turns it on.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

N_FEATURES = 6
CLASS_NAMES = ["down", "flat", "up"]
FEATURE_NAMES = [f"sensor_{i}" for i in range(N_FEATURES)]
TRAIN_LENGTH = 12
MAX_LENGTH = 64
NORMALIZATION = {
    "mean": [0.5, -1.0, 0.25, 2.0, 0.0, -0.3],
    "std": [1.5, 0.5, 2.0, 1.0, 0.8, 3.0],
}
# Small attention so saliency stays cheap on a small machine.
ICA_ARCH = {"attention": "ica", "hidden": 8, "r": 4, "d_a": 16}
LSTM_ARCH = {"attention": "none", "hidden": 8}

READY_TIMEOUT_S = 90.0

# Apps built in this process (TestClient over create_app) serve no gRPC: its default port (8081)
# would be shared by every test and every concurrent run. Servers get it with grpc=True.
os.environ.setdefault("ICASERVE_GRPC_ENABLED", "false")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread for in-process tests, as the service runs by default: the RNNs' per-step
    GEMMs are tiny, and with two threads on a busy 2-core machine every step waits at an OpenMP
    barrier (measured 30-100x slower). No result depends on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def publish(store_root: str | Path, name: str, *, seed: int, arch: dict[str, Any] | None = None,
            with_onnx: bool = False, **export_kwargs: Any) -> int:
    """Build a seeded untrained model and publish it with `export_model`; returns its version."""
    from model_store import ModelStore
    from training.export import export_model
    from training.models import ModelConfig, build_model

    arch = dict(ICA_ARCH if arch is None else arch)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(n_features=N_FEATURES, n_classes=len(CLASS_NAMES), **arch))
    kwargs: dict[str, Any] = dict(
        class_names=CLASS_NAMES, feature_names=FEATURE_NAMES, normalization=NORMALIZATION,
        train_length=TRAIN_LENGTH, max_length=MAX_LENGTH, with_onnx=with_onnx,
        description=f"test model {name} (seed {seed})",
    )
    kwargs.update(export_kwargs)
    return export_model(ModelStore(store_root), name, model, **kwargs)


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of the shared tiny store (read-only: copy it before changing anything)."""
    root = tmp_path_factory.mktemp("model_store")
    assert publish(root, "ica", seed=0) == 1
    assert publish(root, "ica", seed=1) == 2
    assert publish(root, "lstm", seed=2, arch=LSTM_ARCH, with_onnx=True) == 1
    return root


@pytest.fixture(scope="session")
def copy_store(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    """`copy_store()` -> a fresh private copy of `model_store` that a test may change."""

    def make() -> Path:
        dest = tmp_path_factory.mktemp("store_copy") / "store"
        shutil.copytree(model_store, dest, ignore=shutil.ignore_patterns(".staging", ".lock"))
        return dest

    return make


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One uvicorn subprocess serving `service.app:create_app`."""

    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path, env: dict[str, str], store: Path) -> None:
        self.proc = proc
        self.url = url
        self.log_path = log_path
        self.env = env  # the ICASERVE_* settings it was started with
        self.store = store

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 60.0)
        return httpx.Client(base_url=self.url, **kwargs)

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    @property
    def grpc_target(self) -> str:
        """host:port of its gRPC endpoint (started with `server_factory(..., grpc=True)`)."""
        assert self.env.get("ICASERVE_GRPC_ENABLED") == "true", "started without grpc=True"
        return f"127.0.0.1:{self.env['ICASERVE_GRPC_PORT']}"

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 15.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def start_server(store: Path, settings: dict[str, Any] | None, log_dir: Path,
                 ready_timeout_s: float = READY_TIMEOUT_S, grpc: bool = False) -> Server:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ICASERVE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    icaserve = {
        "ICASERVE_STORE": str(store),
        "ICASERVE_DEVICE": "cpu",
        "ICASERVE_TORCH_THREADS": "1",
        "ICASERVE_WORKERS": "1",  # one process, so a test sees one registry and one set of counters
        "ICASERVE_POLL_INTERVAL_S": "0",
        "ICASERVE_LOG_LEVEL": "warning",
        "ICASERVE_GRPC_ENABLED": "false",  # gRPC (a second port) only when a test asks: grpc=True
    }
    for key, value in (settings or {}).items():
        key = key.upper()
        icaserve[key if key.startswith("ICASERVE_") else f"ICASERVE_{key}"] = str(value)
    env.update(icaserve)
    last_error = ""
    for _attempt in range(3):  # a port taken between free_port() and bind: try another
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = log_dir / f"server-{port}.log"
        if grpc:  # the Open Inference Protocol over gRPC on a free port of its own (Server.grpc_target)
            icaserve.update(ICASERVE_GRPC_ENABLED="true", ICASERVE_GRPC_PORT=str(free_port()))
            env.update(icaserve)
        with open(log_path, "wb") as log:
            # `icaserve serve` itself, so test servers get its uvicorn options (service.server:
            # protocol, connection and header limits); the log level comes from ICASERVE_LOG_LEVEL.
            proc = subprocess.Popen(
                [sys.executable, "-m", "icaserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        server = Server(proc, url, log_path, dict(icaserve), store)
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        last_error = server.log()
        server.stop()
        if "address already in use" not in last_error.lower() and "cannot listen on" not in last_error:
            break
    raise RuntimeError(f"server did not become ready within {ready_timeout_s} s; its log:\n{last_error}")


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """`server_factory(store, settings=None, grpc=False)` -> a ready `Server`; all are stopped at
    session end. `grpc=True` also serves gRPC on a free port (`Server.grpc_target`)."""
    log_dir = tmp_path_factory.mktemp("server_logs")
    started: list[Server] = []

    def factory(store: Path, settings: dict[str, Any] | None = None,
                ready_timeout_s: float = READY_TIMEOUT_S, grpc: bool = False) -> Server:
        server = start_server(store, settings, log_dir, ready_timeout_s, grpc)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


# -- helpers shared by the test modules ------------------------------------------------------------

def metric(text: str, sample: str, **labels: str) -> float:
    """Sum of the Prometheus samples named `sample` whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, server: Any = None) -> None:
    """Poll `condition` every 0.1 s until it holds; fail after a generous `timeout_s`, with the
    server's log when one is given. Synchronisation by condition, never by sleeping a guess."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.1)
    log = f"\nserver log:\n{server.log()}" if server is not None else ""
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}{log}")


def assert_error(r: httpx.Response, status: int, code: str | None = None, field: Any = ...) -> dict:
    """The one error format: {"error": str, "code": str, "field": str|null, "request_id": str}."""
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:500]}"
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error", "code", "field", "request_id"}, body
    assert isinstance(body["error"], str) and body["error"], body
    assert isinstance(body["code"], str) and body["code"], body
    assert body["field"] is None or isinstance(body["field"], str), body
    assert isinstance(body["request_id"], str) and body["request_id"], body
    assert r.headers.get("x-request-id") == body["request_id"]
    if code is not None:
        assert body["code"] == code, body
    if field is not ...:
        assert body["field"] == field, body
    return body


def raw_sequence(length: int, seed: int = 0) -> np.ndarray:
    """A raw-valued T x N float32 sequence around the test models' training distribution."""
    rng = np.random.default_rng(seed)
    x = np.asarray(NORMALIZATION["mean"]) + np.asarray(NORMALIZATION["std"]) * rng.normal(size=(length, N_FEATURES))
    return np.round(x, 4).astype(np.float32)
