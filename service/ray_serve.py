"""Scale-out on Ray Serve: the unchanged app (`service.app:create_app`) behind Ray's HTTP proxy,
one copy per replica, each replica a Ray actor (its own process, on any node of the cluster).

Why this shape: Serve's `serve.ingress` with a late-bound app (`__serve_build_asgi_app__`) builds
the app inside the replica, so each replica has its own registry, batching queues and metrics, and
runs the app's lifespan (model loading, warm-up) as `icaserve serve` does. Settings travel as
ICASERVE_* variables, read in the replica exactly as in a plain server. Nothing in the app knows
it runs under Ray.

Per replica, not shared: the batching queues (a batch merges only requests that reached the same
replica), the loaded models, and the Prometheus metrics. `/metrics` through the proxy answers
whichever replica the proxy picked, so scrape replicas directly: with `metrics_port` set, replica
i of a node also serves its own metrics on `metrics_port + i` (the first free port of
`metrics_port .. metrics_port + max_local_replicas - 1` on its node's `metrics_host`).

The gRPC endpoint of `icaserve serve` is off in replicas (several replicas per node would compete
for one port; Ray Serve has a gRPC proxy of its own with other semantics). The transport guards of
service/server.py (header size and time limits, connection cap) belong to `icaserve serve`'s
uvicorn, not to Ray's proxy; the body-size and body-time limits hold, they are in the app.

Run (one machine; `ray start --head` first for a cluster, then `--address auto`):

    python -m service.ray_serve --store model_store --replicas 2 --port 8000
    serve run service.ray_serve:app_builder store=model_store num_replicas=2 num_gpus=0.5
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

log = logging.getLogger("icaserve.ray_serve")
DEPLOYMENT_NAME = "icaserve"
# Replica settings that make no sense behind Ray's proxy: the proxy owns host and port, one
# process per replica, and no gRPC listener per replica (see the module docstring).
FORCED_ENV = {"ICASERVE_WORKERS": "1", "ICASERVE_GRPC_ENABLED": "false"}


class _MetricsHandler(BaseHTTPRequestHandler):
    """GET anything: this replica's metrics (the app's own exposition, service.metrics.render)."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        from service import metrics

        body, content_type = metrics.render()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:  # scrapes every few seconds: not worth a line each
        pass


def _serve_metrics(host: str, base_port: int, span: int) -> ThreadingHTTPServer | None:
    """Listen on the first free port of base_port .. base_port + span - 1; None if all are taken."""
    for port in range(base_port, base_port + span):
        try:
            server = ThreadingHTTPServer((host, port), _MetricsHandler)
        except OSError:
            continue
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="icaserve-replica-metrics", daemon=True).start()
        return server
    return None


class IcaserveReplica:
    """One replica: sets its ICASERVE_* environment, then (late-bound) builds the app from it."""

    def __init__(self, env: Mapping[str, str], metrics_host: str = "127.0.0.1", metrics_port: int = 0,
                 max_local_replicas: int = 8) -> None:
        # Before any service module reads a setting. A multiprocess metrics folder inherited from
        # the driver would merge replicas' metrics behind each other's backs: each replica keeps its own.
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        os.environ.update(env)
        os.environ.update(FORCED_ENV)
        self.metrics_server: ThreadingHTTPServer | None = None
        if metrics_port:
            self.metrics_server = _serve_metrics(metrics_host, metrics_port, max_local_replicas)
            if self.metrics_server is None:
                log.warning("no free metrics port in %d..%d on %s: this replica's metrics are reachable only "
                            "through the proxy", metrics_port, metrics_port + max_local_replicas - 1, metrics_host)

    def __serve_build_asgi_app__(self) -> Any:
        from service.app import create_app
        from service.settings import Settings

        return create_app(Settings())

    def metrics_address(self) -> str | None:
        """host:port of this replica's own metrics listener (None without one); for a handle."""
        if self.metrics_server is None:
            return None
        host, port = self.metrics_server.server_address[:2]
        return f"{host}:{port}"


def icaserve_env(overrides: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The ICASERVE_* variables of this process plus `overrides` (keys with or without the prefix):
    what each replica will read its settings from."""
    env = {k: v for k, v in os.environ.items() if k.startswith("ICASERVE_")}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        key = key.upper()
        key = key if key.startswith("ICASERVE_") else f"ICASERVE_{key}"
        env[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def build(num_replicas: int = 1, num_gpus: float = 0.0, num_cpus: float = 1.0,
          settings: Mapping[str, Any] | None = None, metrics_host: str = "127.0.0.1", metrics_port: int = 0,
          max_local_replicas: int = 8, max_ongoing_requests: int = 256) -> Application:
    """A Ray Serve application of `num_replicas` replicas of the service.

    `num_gpus` is each replica's GPU share (0.5: two replicas per GPU; Ray sets CUDA_VISIBLE_DEVICES
    and the app's `device=auto` picks it up); `num_cpus` its CPU share for Ray's scheduler.
    `settings` are ICASERVE_* values for the replicas (e.g. {"store": "/data/store"}), on top of
    this process's ICASERVE_* variables. The store path must exist on every node that runs a
    replica. `max_ongoing_requests` is Ray's per-replica cap before the proxy queues; keep it at
    or above the app's predict queue so the app's own 503 `overloaded` decides.
    """
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
    if num_gpus < 0 or num_cpus < 0:
        raise ValueError("num_gpus and num_cpus must not be negative")
    env = icaserve_env(settings)
    if num_gpus > 0:
        env.setdefault("ICASERVE_DEVICE", "cuda")
    # serve.ingress() without an app: the replica's __serve_build_asgi_app__ makes it at start-up.
    ingress = serve.ingress()(IcaserveReplica)
    deployment = serve.deployment(
        ingress, name=DEPLOYMENT_NAME, num_replicas=num_replicas, max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        # model loading and warm-up happen in the replica's start-up; a cold node also imports torch
        health_check_timeout_s=60, graceful_shutdown_timeout_s=35,
    )
    return deployment.bind(env, metrics_host, metrics_port, max_local_replicas)


def app_builder(args: dict[str, str]) -> Application:
    """For `serve run service.ray_serve:app_builder key=value ...`: num_replicas, num_gpus, num_cpus,
    metrics_port, metrics_host, and any ICASERVE_* setting by its short name (store=..., api_key=...)."""
    args = dict(args)
    options = {
        "num_replicas": int(args.pop("num_replicas", 1)),
        "num_gpus": float(args.pop("num_gpus", 0.0)),
        "num_cpus": float(args.pop("num_cpus", 1.0)),
        "metrics_port": int(args.pop("metrics_port", 0)),
        "metrics_host": args.pop("metrics_host", "127.0.0.1"),
    }
    return build(settings=args, **options)


def main(argv: list[str] | None = None) -> None:
    """`python -m service.ray_serve`: start (or join) Ray, run the application, block until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m service.ray_serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=None, help="Ray cluster to join ('auto': the local `ray start` one); "
                        "default: start a local Ray instance")
    parser.add_argument("--host", default="127.0.0.1", help="Ray's HTTP proxy address")
    parser.add_argument("--port", type=int, default=8000, help="Ray's HTTP proxy port")
    parser.add_argument("--store", type=Path, default=None, help="model store root [ICASERVE_STORE]")
    parser.add_argument("--replicas", type=int, default=1, help="number of replicas (Ray actors)")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPU share per replica, e.g. 0.5")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPU share per replica")
    parser.add_argument("--metrics-port", type=int, default=0, help="first per-replica metrics port (0: off)")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="address of the per-replica metrics ports")
    args = parser.parse_args(argv)

    import ray

    ray.init(address=args.address, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    settings = {"store": str(args.store.resolve())} if args.store else {}
    serve.run(build(args.replicas, args.num_gpus, args.num_cpus, settings, args.metrics_host, args.metrics_port),
              name=DEPLOYMENT_NAME, route_prefix="/", blocking=True)


if __name__ == "__main__":
    main()
