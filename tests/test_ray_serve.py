"""Scale-out on Ray Serve (issue 12, part 5): the unchanged app as 2 replicas (Ray actors) of a
local Ray instance on loopback, reached through Ray's HTTP proxy.

Checks: predict and explain through the proxy equal the answers of the same app in-process;
/metrics answers through the proxy; each replica serves its own metrics on its own port (two
processes), and the requests counted there add up to the requests sent, so nothing is lost or
counted twice between replicas. Skipped, with the reason, only when Ray cannot start here.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import REPO, free_port, metric, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

SHIPPED = "middle-box-ica-lstm"
START_TIMEOUT_S = 180.0  # Ray's processes, then two replicas importing torch and warming the model up


def _two_free_ports() -> int:
    """A port p with p + 1 free too (the replicas' metrics ports), tried a bounded number of times."""
    for _ in range(50):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no two consecutive free ports on loopback")


def _settings(store: Path) -> dict[str, Any]:
    return {"store": str(store), "device": "cpu", "poll_interval_s": 0, "torch_threads": 1, "log_level": "warning"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shipped store (its model folder only)."""
    root = tmp_path_factory.mktemp("ray_store") / "store"
    root.mkdir()
    shutil.copytree(REPO / "model_store" / SHIPPED, root / SHIPPED)
    return root


@pytest.fixture(scope="module")
def ray_serve(store: Path) -> Iterator[dict[str, Any]]:
    ray = pytest.importorskip("ray")
    from ray import serve

    from service.ray_serve import DEPLOYMENT_NAME, build

    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
    except Exception as exc:  # noqa: BLE001  any reason Ray cannot start here is a skip, said plainly
        pytest.skip(f"Ray cannot start a local instance here: {type(exc).__name__}: {exc}")
    try:
        port, metrics_port = free_port(), _two_free_ports()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build(num_replicas=2, num_cpus=0.5, settings=_settings(store), metrics_port=metrics_port,
                    max_local_replicas=2)
        # serve.run waits for the replicas; in a thread, so the wait is bounded here
        errors: list[BaseException] = []

        def run() -> None:
            try:
                serve.run(app, name=DEPLOYMENT_NAME, route_prefix="/")
            except BaseException as exc:  # noqa: BLE001  reported below
                errors.append(exc)

        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        runner.join(START_TIMEOUT_S)
        assert not runner.is_alive(), f"Ray Serve app not running within {START_TIMEOUT_S} s"
        assert not errors, f"serve.run failed: {errors[0]!r}"
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ok(f"{url}/readyz"), 60, "readiness through Ray's proxy")
        yield {"url": url, "metrics": [f"http://127.0.0.1:{metrics_port + i}/metrics" for i in range(2)]}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def direct(store: Path) -> Iterator[TestClient]:
    """The same app in this process, no Ray: the reference answers."""
    from service.app import create_app
    from service.settings import Settings

    with TestClient(create_app(Settings(**_settings(store)))) as client:
        yield client


def _body(seed: int, b: int = 2, t: int = 12) -> dict[str, Any]:
    return {"inputs": np.random.default_rng(seed).normal(size=(b, t, 100)).round(4).tolist()}


def _same(a: Any, b: Any, where: str = "") -> None:
    """Equal JSON, numbers to float32 precision (different processes, same model and inputs)."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert np.isclose(a, b, rtol=1e-5, atol=1e-7), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_predict_explain_and_metrics_through_two_replicas(ray_serve: dict[str, Any], direct: TestClient) -> None:
    url = ray_serve["url"]
    sent = 0
    with httpx.Client(base_url=url, timeout=60) as c:
        for seed in range(4):
            body = _body(seed)
            r = c.post("/predict", json=body)
            sent += 1
            assert r.status_code == 200, r.text
            ref = direct.post("/predict", json=body)
            assert ref.status_code == 200, ref.text
            _same(r.json(), ref.json(), "predict")
        explain = {**_body(7, b=1), "method": "integrated_gradients", "target": "all", "parameters": {"steps": 8}}
        r = c.post("/explain", json=explain)
        assert r.status_code == 200, r.text
        ref = direct.post("/explain", json=explain)
        _same(r.json(), ref.json(), "explain")
        # errors keep the one format through the proxy
        bad = c.post("/predict", json={"inputs": [[[0.0] * 99]]})
        assert bad.status_code == 422 and set(bad.json()) == {"error", "code", "field", "request_id"}, bad.text

        proxied = c.get("/metrics")
        assert proxied.status_code == 200 and "icaserve_requests_total" in proxied.text

    # each replica's own metrics: two processes, and between them every predict counted once
    texts = [httpx.get(u, timeout=10).text for u in ray_serve["metrics"]]
    pids = [{s for s in t.splitlines() if s.startswith("icaserve_process_start_time_seconds{")} for t in texts]
    assert all(pids) and not pids[0] & pids[1], "the two metrics ports are not two replica processes"
    counted = sum(metric(t, "icaserve_requests_total", endpoint="/predict", status="200") for t in texts)
    assert counted == sent, f"replicas counted {counted} predict requests, {sent} were sent"
    explained = sum(metric(t, "icaserve_explanations_total", method="integrated_gradients") for t in texts)
    assert explained == 1
