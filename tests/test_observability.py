"""Observability and deployment (issue 4): metrics, logs, the Prometheus/Grafana stack, Docker.

- A real Prometheus server (Debian's `prometheus` binary, on loopback, scraping every second)
  scrapes a real server after predict, explain and error traffic; every PromQL expression of the
  Grafana dashboard, read from its JSON, must return data, and `up` must be 1.
- JSON logs: a request's log line carries the id of its `X-Request-ID` response header; keys
  never reach the log.
- The README's metric table (between `<!-- metrics:start -->` and `<!-- metrics:end -->`) matches
  the families on a live /metrics: names, types and labels.
- Static checks of Dockerfile, docker-compose.yml, the Prometheus config (`promtool check
  config`) and the Grafana provisioning and dashboard.
- `icaserve serve --workers 2`: counters are totals over workers whichever worker answers the
  scrape; a worker killed mid-request is replaced, counters do not go backwards and its in-flight
  request does not linger.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from conftest import N_FEATURES, READY_TIMEOUT_S, REPO, free_port

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "icaserve.json"
DATASOURCES = REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = REPO / "deploy" / "grafana" / "provisioning" / "dashboards" / "icaserve.yml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"

API_KEY = "obs-inference-key-5b1f0c9d"
ADMIN_KEY = "obs-admin-key-77e2a4c1"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Grafana's built-in variables, as the test's Prometheus (1 s scrapes) should read them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m"}


def seq(t: int = 8, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).normal(size=(t, N_FEATURES)).round(4).tolist()


def families(text: str) -> dict[str, tuple[str, set[str]]]:
    """Exposed families as written in `# TYPE` lines (counters with `_total`): type and labels."""
    out = {}
    for f in text_string_to_metric_families(text):
        name = f.name + "_total" if f.type == "counter" else f.name
        labels = {k for s in f.samples for k in s.labels} - {"le"}
        out[name] = (f.type, labels)
    return out


def sample_sum(text: str, sample: str, **labels: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel (rows' nested panels too)."""
    def walk(panels: list[dict]) -> list[dict]:
        out = []
        for p in panels:
            out.append(p)
            out.extend(walk(p.get("panels", [])))
        return out

    queries = [(p["title"], t["expr"]) for p in walk(json.loads(DASHBOARD.read_text())["panels"])
               for t in p.get("targets", []) if t.get("expr")]
    assert queries, "the dashboard has no queries"
    return queries


def as_promql(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def readme_metric_table() -> dict[str, tuple[str, set[str]]]:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- metrics:start -->(.*?)<!-- metrics:end -->", text, re.S)
    assert m, "README.md has no <!-- metrics:start --> ... <!-- metrics:end --> block"
    rows = {}
    for line in m.group(1).strip().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or cells[0] in ("metric", "") or set(cells[0]) <= {"-"}:
            continue
        name = cells[0].strip("`")
        rows[name] = (cells[1], set(re.findall(r"`([a-z_]+)`", cells[2])))
    assert rows, "the README metric table is empty"
    return rows


# -- one server with JSON logs and keys, a reload failure, and a real Prometheus scraping it --------


@pytest.fixture(scope="module")
def obs_server(server_factory, copy_store):
    store = copy_store()
    # polling off: versions appear through the admin reloads only, so the load counts are exact
    server = server_factory(store, {"DEFAULT_MODEL": "ica", "LOG_JSON": "true", "LOG_LEVEL": "info",
                                    "API_KEY": API_KEY, "ADMIN_KEY": ADMIN_KEY, "POLL_INTERVAL_S": "0"})
    yield server
    server.stop()


def publish_corrupt_version(store: Path, name: str) -> int:
    """A copy of the latest version of `name` as the next one, with its TorchScript altered."""
    versions = sorted(int(p.name) for p in (store / name).iterdir() if p.name.isdigit())
    new = versions[-1] + 1
    tmp = store / f".tmp-{name}-{new}"
    shutil.copytree(store / name / str(versions[-1]), tmp)
    manifest = json.loads((tmp / "manifest.json").read_text())
    manifest["version"] = new
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    data = bytearray((tmp / "model.ts").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp / "model.ts").write_bytes(bytes(data))
    tmp.rename(store / name / str(new))
    return new


def send_traffic(server, sent: dict[str, Any], reload_failure: bool) -> None:
    """Predict (JSON API and V2), explain with four methods, and errors of four kinds."""
    x = seq(8)

    def expect(r: httpx.Response, status: int, code: str | None = None) -> None:
        assert r.status_code == status, r.text
        if code:
            assert r.json()["code"] == code
            sent["errors"][code] = sent["errors"].get(code, 0) + 1
        else:
            sent["ok"] += 1

    with server.client(headers=AUTH) as c:
        for path in ("/predict", "/models/ica/predict", "/models/ica/versions/1/predict", "/models/lstm/predict"):
            for i in range(3):
                expect(c.post(path, json={"inputs": [seq(8, seed=i)]}), 200)
        expect(c.post("/v2/models/ica/infer", json={"inputs": [
            {"name": "x", "shape": [1, 8, N_FEATURES], "datatype": "FP32", "data": x}]}), 200)
        for method, params in (("gradient", {}), ("integrated_gradients", {"steps": 8}),
                               ("smoothgrad", {"samples": 4}), ("occlusion", {})):
            expect(c.post("/explain", json={"inputs": [x, seq(5, seed=3)], "method": method,
                                            "parameters": params}), 200)
        expect(c.post("/predict", json={"inputs": [[[1.0, 2.0]]]}), 422, "invalid_input")
        expect(c.post("/models/nope/predict", json={"inputs": [x]}), 404, "not_found")
        expect(c.post("/predict", content=b"{not json", headers={"content-type": "application/json"}), 400,
               "malformed_body")
        if reload_failure:  # a reload that refuses a corrupted version (the current one keeps serving)
            publish_corrupt_version(server.store, "ica")
        r = c.post("/admin/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert r.status_code == 200 and r.json()["serving"]["ica"] == 2, r.text
        assert "ica/3" in r.json()["refused"]  # refused (again, on the second round), v2 keeps serving
        sent["ok"] += 1
    with server.client() as c:
        expect(c.post("/predict", json={"inputs": [x]}), 401, "unauthorized")
        expect(c.post("/predict", json={"inputs": [x]}, headers={"Authorization": "Bearer obs-inference-key-5b1f0c9e"}),
               401, "unauthorized")


def sent_total(sent: dict[str, Any]) -> int:
    return sent["ok"] + sum(sent["errors"].values())


@pytest.fixture(scope="module")
def traffic(obs_server, prometheus_or_none) -> dict[str, Any]:
    """Two rounds of traffic, with a Prometheus scrape between them when Prometheus runs: rate()
    sees no increase in a series' first sample, so the second round is what the rates show."""
    sent: dict[str, Any] = {"ok": 0, "errors": {}}
    send_traffic(obs_server, sent, reload_failure=True)
    if prometheus_or_none is not None:
        deadline = time.monotonic() + 30
        while total(prometheus_or_none, "sum(icaserve_requests_total)") < sent_total(sent):
            assert time.monotonic() < deadline, "Prometheus did not scrape the first round"
            time.sleep(0.5)
    send_traffic(obs_server, sent, reload_failure=False)
    return sent


@pytest.fixture(scope="module")
def prometheus_or_none(obs_server, tmp_path_factory):
    """A real Prometheus scraping `obs_server` every second (its URL), or None when not installed."""
    if PROMETHEUS is None:
        yield None
        return
    work = tmp_path_factory.mktemp("prometheus")
    target = obs_server.url.removeprefix("http://")
    (work / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "icaserve", "metrics_path": "/metrics",
                            "static_configs": [{"targets": [target]}]}],
    }))
    port = free_port()
    log = open(work / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:  # ready, and a first scrape of the idle server is in
            assert proc.poll() is None, (work / "prometheus.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200 and query(url, "up"):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def prometheus(prometheus_or_none):
    if prometheus_or_none is None:
        pytest.skip("the `prometheus` binary is not installed (bash scripts/install.sh --test installs "
                    "Debian's package as root); the real-Prometheus test needs it")
    return prometheus_or_none


def query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {r.text}"
    return body["data"]["result"]


def total(prom: str, expr: str) -> float:
    return sum(float(i["value"][1]) for i in query(prom, expr))


def show(result: list[dict]) -> str:
    def one(item: dict) -> str:
        labels = ",".join(f"{k}={v}" for k, v in sorted(item["metric"].items()) if k not in ("job", "instance"))
        return f"{{{labels}}} {float(item['value'][1]):.4g}"

    return "; ".join(one(i) for i in result[:8]) + (f" (+{len(result) - 8} more)" if len(result) > 8 else "")


def test_every_dashboard_query_returns_data_from_a_real_prometheus(obs_server, traffic, prometheus):
    queries = [(title, as_promql(expr)) for title, expr in dashboard_queries()]
    deadline = time.monotonic() + 30
    while True:  # until a scrape after the second round is in, and every query has data
        done = total(prometheus, "sum(icaserve_requests_total)") >= sent_total(traffic)
        results = {expr: query(prometheus, expr) for _, expr in queries}
        empty = [expr for expr, res in results.items() if not res]
        if done and not empty:
            break
        assert time.monotonic() < deadline, f"no data from Prometheus for: {empty}"
        time.sleep(1)
    assert [float(i["value"][1]) for i in query(prometheus, 'up{job="icaserve"}')] == [1.0]
    print("\nPromQL results (panel | expression | value):\n" +
          "\n".join(f"{title} | {expr} | {show(results[expr])}" for title, expr in queries))

    # and the data says what the traffic did
    assert total(prometheus, "sum(icaserve_requests_total)") == sent_total(traffic)
    for kind, n in traffic["errors"].items():
        assert total(prometheus, f'sum(icaserve_errors_total{{kind="{kind}"}})') == n, kind
    assert total(prometheus, 'sum(icaserve_explanations_total{method="integrated_gradients"})') == 4
    # refused once per admin reload (two rounds): an admin reload retries refused versions
    assert total(prometheus, 'sum(icaserve_model_load_failures_total{model="ica",reason="ChecksumMismatch"})') == 2
    loaded = {(i["metric"]["model"], i["metric"]["version"]) for i in query(prometheus, "icaserve_model_loaded == 1")}
    assert loaded == {("ica", "2"), ("lstm", "1"), ("ica", "1")}  # v1 loaded on demand, v3 refused
    for expr, result in results.items():
        if expr.startswith("histogram_quantile"):  # the second round moved every histogram
            for item in result:
                assert 0 < float(item["value"][1]) < 60, (expr, item)
    p99 = {i["metric"]["endpoint"] for i in results[as_promql(
        "histogram_quantile(0.99, sum by (le, endpoint) (rate(icaserve_request_duration_seconds_bucket"
        "[$__rate_interval])))")]}
    assert {"/predict", "/explain", "/models/{name}/predict", "/v2/models/{name}/infer"} <= p99


def test_json_logs_carry_the_request_id_and_never_a_key(obs_server, traffic):
    with obs_server.client(headers=AUTH) as c:
        given = c.post("/predict", json={"inputs": [seq(4)]}, headers={"X-Request-ID": "obs-given-id-42"})
        fresh = c.post("/explain", json={"inputs": [seq(4)]})
        unsafe = c.post("/predict", json={"inputs": [seq(4)]}, headers={"X-Request-ID": "bad id\twith spaces"})
        failed = c.post("/predict", json={"inputs": [[[1.0]]]}, headers={"X-Request-ID": "obs-failed-id"})
    assert given.headers["x-request-id"] == "obs-given-id-42"
    assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{32}", unsafe.headers["x-request-id"])
    assert failed.json()["request_id"] == failed.headers["x-request-id"] == "obs-failed-id"

    deadline = time.monotonic() + 10
    while True:
        log = obs_server.log_path.read_text(errors="replace")
        lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        access = {r.get("request_id"): r for r in lines if r.get("name") == "icaserve.access"}
        if "obs-failed-id" in access or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for response, path, status in ((given, "/predict", 200), (fresh, "/explain", 200), (unsafe, "/predict", 200),
                                   (failed, "/predict", 422)):
        rid = response.headers["x-request-id"]
        assert rid in access, f"no access log line with request id {rid}"
        line = access[rid]
        assert (line["path"], line["status"], line["level"]) == (path, status, "INFO"), line
        assert line["model"] == "ica" and isinstance(line["duration_ms"], float)
    assert all({"time", "level", "name", "message", "request_id"} <= set(r) for r in lines)
    plain = [line for line in log.splitlines() if line.strip() and not line.startswith("{")]
    assert not plain, f"log lines that are not JSON: {plain[:5]}"
    # the keys were sent (right and wrong) many times; neither they nor the near miss are logged
    assert API_KEY not in log and ADMIN_KEY not in log and "obs-inference-key" not in log
    assert "Bearer" not in log and "authorization" not in log.lower()


def test_readme_metric_table_matches_metrics(obs_server, traffic):
    with obs_server.client() as c:
        exposed = families(c.get("/metrics").text)
    table = readme_metric_table()
    assert set(table) == set(exposed), (
        f"in README only: {sorted(set(table) - set(exposed))}; on /metrics only: {sorted(set(exposed) - set(table))}")
    for name, (typ, labels) in exposed.items():
        doc_type, doc_labels = table[name]
        assert doc_type == typ, name
        # `pid` is documented for gauges that carry it only with several workers
        assert labels <= doc_labels and doc_labels - labels <= {"pid"}, (name, labels, doc_labels)
    assert all(name.startswith("icaserve_") for name in exposed)


# -- static checks: Docker, compose, Prometheus config, Grafana provisioning ------------------------


def test_dockerfile():
    text = DOCKERFILE.read_text()
    steps = [line for line in re.sub(r"\\\n", " ", text).splitlines() if line and not line.startswith("#")]
    instructions = [s.split()[0] for s in steps]
    assert steps[0] == "FROM python:3.11-slim"
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    torch_step = next(i for i, s in enumerate(steps) if "pip install" in s and "torch==" in s)
    assert "torch==${TORCH_VERSION}" in steps[torch_step] and "--index-url" in steps[torch_step]
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M)
    install_step = next(i for i, s in enumerate(steps) if re.search(r"pip install \.( |$)", s))
    assert torch_step < install_step
    copied = [s.split()[1] for s in steps if s.startswith("COPY ")]
    for src in copied:
        assert (REPO / src).exists(), f"COPY {src}: no such file"
    assert "model_store/" in copied
    pyproject = (REPO / "pyproject.toml").read_text()
    for package in re.findall(r'"(\w+)\*"', pyproject):  # every package `pip install .` needs is copied
        assert f"{package}/" in copied, package
    assert "USER" in instructions and "EXPOSE" in instructions
    health = next(s for s in steps if s.startswith("HEALTHCHECK"))
    assert "/readyz" in health
    assert steps[-1] == 'CMD ["icaserve", "serve", "--host", "0.0.0.0"]'
    assert "model_store/.staging" in (REPO / ".dockerignore").read_text()


def test_compose_file():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"icaserve", "prometheus", "grafana"}
    api = services["icaserve"]
    assert api["build"]["context"] == "." and (REPO / "Dockerfile").is_file()
    assert "8000:8000" in api["ports"]
    assert any(v.split(":")[:2] == ["./model_store", "/app/model_store"] for v in api["volumes"])
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert "9090:9090" in services["prometheus"]["ports"]
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    assert "3000:3000" in services["grafana"]["ports"]
    named = set(compose.get("volumes") or {})
    mounts = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            src, dest = volume.split(":")[:2]
            if src.startswith("."):
                assert (REPO / src).exists(), f"{name}: mounts missing {src}"
                mounts[dest] = REPO / src
            else:
                assert src in named, f"{name}: undeclared volume {src}"
    assert mounts["/etc/prometheus/prometheus.yml"] == REPO / "deploy/prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert mounts["/etc/grafana/provisioning"] == REPO / "deploy/grafana/provisioning"
    providers = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert [mounts[p["options"]["path"]] for p in providers] == [DASHBOARD.parent]
    assert services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == \
        f"{providers[0]['options']['path']}/{DASHBOARD.name}"
    # the GPU reservation: present as a commented block that parses once uncommented
    text = COMPOSE.read_text()
    block = re.search(r"^    # deploy:\n(?:    #  .*\n)+", text, re.M)
    assert block, "no commented GPU reservation in docker-compose.yml"
    gpu = yaml.safe_load(re.sub(r"^    # ", "", block.group(0), flags=re.M))
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1


def test_prometheus_config():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    [job] = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["icaserve:8000"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "5s"
    if PROMTOOL is None:
        pytest.skip("`promtool` (from Debian's prometheus package) is not installed")
    r = subprocess.run([PROMTOOL, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_provisioning_and_dashboard():
    [source] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    for panel in dashboard["panels"]:
        refs = [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]
        for ref in refs:
            assert ref == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
    titles = " / ".join(p["title"].lower() for p in dashboard["panels"])
    for wanted in ("request rate", "error rate", "p99", "explain latency", "batch size", "queue depth",
                   "models loaded", "in-flight", "process memory", "process cpu", "gpu memory"):
        assert wanted in titles, wanted
    # every metric a query names is one the service exposes (the README table is checked against
    # /metrics above)
    documented = set(readme_metric_table())
    for title, expr in dashboard_queries():
        for name in re.findall(r"\bicaserve_[a-z_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in documented or base in documented, (title, name)


# -- several workers --------------------------------------------------------------------------------


class Supervisor:
    """`icaserve serve --workers 2` as a subprocess in its own process group."""

    def __init__(self, store: Path, work: Path) -> None:
        self.mp_dir = work / "metrics"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ICASERVE_")}
        env.update({"ICASERVE_STORE": str(store), "ICASERVE_DEVICE": "cpu", "ICASERVE_TORCH_THREADS": "1",
                    "ICASERVE_POLL_INTERVAL_S": "0", "ICASERVE_LOG_LEVEL": "warning", "ICASERVE_DEFAULT_MODEL": "ica",
                    "PROMETHEUS_MULTIPROC_DIR": str(self.mp_dir),
                    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)})
        self.log_path = work / "serve.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "icaserve.cli", "serve", "--port", str(self.port), "--workers", "2"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def metrics(self) -> str:
        # a new connection each time, so either worker may answer
        return httpx.get(f"{self.url}/metrics", headers={"Connection": "close"}, timeout=30).text

    def pids(self) -> set[int]:
        """Live workers, as /metrics reports them."""
        return {int(s.labels["pid"]) for f in text_string_to_metric_families(self.metrics())
                for s in f.samples if s.name == "icaserve_process_start_time_seconds"}

    def in_flight_of(self, pid: int) -> float:
        """One worker's own in-flight gauge, read from its file."""
        path = self.mp_dir / f"gauge_livesum_{pid}.db"
        if not path.exists():
            return 0.0
        return sum(s.value for m in MultiProcessCollector.merge([str(path)]) for s in m.samples
                   if s.name == "icaserve_requests_in_flight")

    def wait(self, condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if condition():
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, f"the server exited; its log:\n{self.log()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}; log:\n{self.log()}"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def predict(url: str) -> int:
    return httpx.post(f"{url}/predict", json={"inputs": [seq(6)]}, headers={"Connection": "close"},
                      timeout=60).status_code


def test_two_workers_merge_counters_and_survive_a_killed_worker(model_store, tmp_path):
    server = Supervisor(model_store, tmp_path)
    try:
        server.wait(lambda: httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200, READY_TIMEOUT_S,
                    "readiness")
        server.wait(lambda: len(server.pids()) == 2, 60, "both workers")
        workers = server.pids()
        n = 24
        assert [predict(server.url) for _ in range(n)] == [200] * n
        for _ in range(8):  # whichever worker answers, the total is the same
            text = server.metrics()
            assert sample_sum(text, "icaserve_requests_total") == n
            assert sample_sum(text, "icaserve_requests_total", endpoint="/predict", status="200") == n
            assert sample_sum(text, "icaserve_requests_in_flight") == 0
        served_by = {pid for pid in workers if (server.mp_dir / f"counter_{pid}.db").exists()}
        print(f"\nworkers {sorted(workers)}; served requests: {sorted(served_by)}")

        # a request stuck mid-body holds one worker's in-flight gauge at 1 ...
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"inputs\": ")
        server.wait(lambda: sample_sum(server.metrics(), "icaserve_requests_in_flight") == 1, 20, "in flight")
        [victim] = [pid for pid in workers if server.in_flight_of(pid) == 1]
        # ... until that worker is killed
        os.kill(victim, signal.SIGKILL)
        sock.settimeout(10)
        try:
            assert sock.recv(1024) == b""  # the connection dies with the worker
        except ConnectionResetError:
            pass
        sock.close()

        # the other worker keeps answering while the supervisor starts a replacement
        more = [predict(server.url) for _ in range(6)]
        assert more == [200] * 6
        server.wait(lambda: len(server.pids() - {victim}) == 2, 90, "a replacement worker")
        assert victim not in server.pids()
        more += [predict(server.url) for _ in range(6)]
        assert more == [200] * 12
        for _ in range(6):
            text = server.metrics()
            # the dead worker's counts stay (no counter goes backwards); its stuck request is gone
            assert sample_sum(text, "icaserve_requests_total") == n + len(more)
            assert sample_sum(text, "icaserve_requests_in_flight") == 0
            assert sample_sum(text, "icaserve_queue_depth") == 0
            loaded = [s for f in text_string_to_metric_families(text) for s in f.samples
                      if s.name == "icaserve_model_loaded" and s.value == 1]
            assert {(s.labels["model"], s.labels["version"]) for s in loaded} == {("ica", "2"), ("lstm", "1")}
            cpu = [s for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "icaserve_process_cpu_seconds_total"]
            assert len(cpu) == 2 and all(s.value > 0 for s in cpu) and not math.isnan(cpu[0].value)
        assert not list(server.mp_dir.glob(f"gauge_live*_{victim}.db"))
        assert (server.mp_dir / f"counter_{victim}.db").exists()
    finally:
        server.stop()
