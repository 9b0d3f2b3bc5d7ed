"""The KServe example (deploy/kserve/inferenceservice.yaml), checked statically: what KServe
requires of a custom container (its name, the storage URI variable, /mnt/models), what the
service needs to find its store and answer probes, and that the container's command is one the
`icaserve` CLI accepts with settings that service/settings.py defines. No cluster is involved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from conftest import REPO

KSERVE = REPO / "deploy" / "kserve" / "inferenceservice.yaml"


@pytest.fixture(scope="module")
def isvc() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(KSERVE.read_text()) if d]
    assert len(docs) == 1, "one InferenceService"
    return docs[0]


@pytest.fixture(scope="module")
def container(isvc: dict[str, Any]) -> dict[str, Any]:
    containers = isvc["spec"]["predictor"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_is_a_kserve_custom_container(isvc: dict[str, Any], container: dict[str, Any]) -> None:
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert container["name"] == "kserve-container"  # KServe injects storage only into this container
    env = _env(container)
    assert "://" in env["STORAGE_URI"]
    assert env["ICASERVE_STORE"] == "/mnt/models"  # where the storage initializer puts STORAGE_URI


def test_ports_and_probes(isvc: dict[str, Any], container: dict[str, Any]) -> None:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert set(ports) == {"http1", "h2c"} and container["ports"][0]["name"] == "http1"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"  # two ports
    args = container["args"]
    assert args[args.index("--port") + 1] == str(ports["http1"])
    assert args[args.index("--grpc-port") + 1] == str(ports["h2c"])
    assert args[args.index("--host") + 1] == "0.0.0.0"
    ready = container["readinessProbe"]["httpGet"]
    assert ready == {"path": "/v2/health/ready", "port": ports["http1"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    annotations = isvc["metadata"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == str(ports["http1"])
    assert annotations["prometheus.kserve.io/path"] == "/metrics"
    assert {"requests", "limits"} <= set(container["resources"])


def test_probe_paths_are_routes_of_the_app(container: dict[str, Any]) -> None:
    """Each probe path is served by the app (asked in-process, without loading models: a route that
    exists answers, ready or not; one that does not is a 404)."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    client = TestClient(create_app(Settings()))  # no lifespan: nothing is loaded
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        r = client.get(container[probe]["httpGet"]["path"])
        assert r.status_code in (200, 503), (probe, r.status_code, r.text)
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_settings_exist(container: dict[str, Any]) -> None:
    from service.settings import Settings

    names = [n for n in _env(container) if n.startswith("ICASERVE_")]
    assert names
    for name in names:
        assert name.removeprefix("ICASERVE_").lower() in Settings.model_fields, f"{name} is no setting"
    # and every literal value is one the settings accept
    values = {n.removeprefix("ICASERVE_").lower(): v for n, v in _env(container).items()
              if n.startswith("ICASERVE_") and isinstance(v, str)}
    Settings(**values)


def test_command_is_the_cli(container: dict[str, Any]) -> None:
    from icaserve.cli import app

    assert container["command"] == ["icaserve", "serve"]
    group = typer.main.get_command(app)
    serve = group.commands["serve"]  # type: ignore[attr-defined]
    known = {o for p in serve.params for o in (*p.opts, *p.secondary_opts)}
    flags = [a for a in container["args"] if a.startswith("--")]
    assert flags and set(flags) <= known, f"unknown flags: {set(flags) - known}"
    # the CLI parses them as given (no server started: parse only)
    ctx = serve.make_context("serve", list(container["args"]), resilient_parsing=False)
    assert ctx.params["port"] == 8080 and ctx.params["grpc_port"] == 8081 and ctx.params["host"] == "0.0.0.0"


def test_readme_documents_it() -> None:
    text = (REPO / "deploy" / "kserve" / "README.md").read_text()
    for needle in ("STORAGE_URI", "/mnt/models", "kserve-container", "/v2/health/ready", "h2c"):
        assert needle in text, needle
    assert Path(KSERVE).name in text
