"""Service configuration: every knob from a flag of `icaserve serve` or an ICASERVE_* variable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from icaserve.machine import usable_cpus

DEFAULT_STORE = Path(__file__).resolve().parent.parent / "model_store"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ICASERVE_", extra="ignore", protected_namespaces=())

    # Where and what
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Worker processes; 0: one per CPU this process may use (affinity, capped by a cgroup CPU quota).
    # Each worker has its own GIL: on the 2-core bench machine 2 workers answered /predict and
    # /explain at 32 clients ~1.3-1.4x as fast as 1 (BENCHMARKS.md); a third did not help.
    workers: int = Field(0, ge=0, le=64)
    store: Path = DEFAULT_STORE

    @field_validator("workers")
    @classmethod
    def _one_per_core(cls, value: int) -> int:
        return value or usable_cpus()

    default_model: str | None = None  # None: the first model in the store
    device: Literal["auto", "cpu", "cuda"] = "auto"
    predict_backend: Literal["torch", "onnx"] = "torch"
    # Intra-op threads per process. Predict and explain run in two threads of their own, so one
    # each fills two cores; more makes OpenMP threads spin against each other on small RNN ops.
    # 0: torch's default (one per core).
    torch_threads: int = Field(1, ge=0)
    # Keep large tensors in the heap (icaserve/tuning.py). Off for the server: under the soak's
    # mixed load it held ~500 MiB more and did not return it, with no throughput gain.
    tune_malloc: bool = False
    poll_interval_s: float = Field(5.0, ge=0)  # how often to look for new versions; 0 turns polling off
    max_versions_loaded: int = Field(4, ge=1)  # per model, latest always kept
    # POST /predict and /explain past FastAPI's router, same endpoint code (service/fast_path.py)
    fast_path: bool = True
    # FastAPI's native OpenTelemetry (spans, metrics and logs through the global OTel providers).
    # Off by default: /metrics and the access log serve operators, and its per-request check of
    # the global providers costs ~15 us of the event loop even when none is configured.
    otel: bool = False

    # Dynamic batching
    batching: bool = True
    max_batch_size: int = Field(32, ge=1, le=4096)  # sequences per merged batch
    # 0: a batch is whatever queued up while the model was busy, with no added latency when idle
    # (the bench measured batching-on at 1 client 30% slower with a 2 ms wait); > 0 also waits
    # this long for a batch to fill, which pays off only when arrivals are dense.
    max_wait_ms: float = Field(0.0, ge=0, le=1000)
    predict_queue_size: int = Field(256, ge=1)  # requests waiting, per model (shared by its loaded versions)
    explain_queue_size: int = Field(64, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)
    retry_after_s: int = Field(1, ge=1)

    # Input limits
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_sequences: int = Field(64, ge=1)
    max_ig_steps: int = Field(256, ge=1)
    max_smoothgrad_samples: int = Field(128, ge=1)
    # Cost cap for one explanation request, in sample-step evaluations (sequences x time steps x
    # forward-equivalents, e.g. 4 sequences x 100 steps x 50 IG steps = 20,000). Bounds memory too.
    max_explain_cost: int = Field(2_000_000, ge=1)

    # Pricing and numerical range of /predict, /explain and V2 (service/api.py, service/v2.py)
    # Largest /explain answer, estimated before any compute from sequences x targets x T x N (plus
    # T x T with `attention`) x bytes per number (16 for JSON, a bound on a float32's text; 4 for
    # npz); above it 422 too_expensive naming `inputs` (or `attention` when the weights tip it over).
    max_response_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    # Input range, from the training statistics in the manifest: a value x of feature i with
    # |x - mean_i| / std_i above this is refused (422 out_of_range naming the cell), before compute.
    # Past ~1e30 the model's float32 arithmetic overflows (NaN answers); the default leaves a wide
    # margin and refuses nothing a sensor could mean. Applies to inputs and to a given baseline.
    max_input_sigma: float = Field(1e6, gt=0)
    # SmoothGrad `noise` cap (standard deviation in standardised units; the default is 0.15).
    max_smoothgrad_noise: float = Field(10.0, ge=0)

    # HTTP transport (service/server.py, the RequestContext middleware in service/app.py):
    # limits on slow or oversized clients, per worker process; env vars reach every worker.
    max_header_bytes: int = Field(32 * 1024, ge=1024)  # request line + headers; beyond: 431, not buffered
    # A request line + headers must arrive within this many seconds of their first byte (or of
    # the connection); beyond: 408 and the connection is closed.
    header_timeout_s: float = Field(10.0, gt=0)
    # Total time a request may keep the server waiting for its body; beyond: 408 and the connection
    # is closed. 30 s lets the largest body (16 MiB) arrive at ~4.5 Mbit/s.
    body_timeout_s: float = Field(30.0, gt=0)
    max_connections: int = Field(512, ge=1)  # open connections per worker; beyond: 503 + Retry-After
    # JSON bodies parsed at once per worker, in threads. orjson holds the GIL while it parses, so
    # more would not parse faster, only hold more parsed bodies in memory at once.
    json_parse_concurrency: int = Field(1, ge=1)

    # Open Inference Protocol over gRPC (service/grpc_server.py): inference.GRPCInferenceService on
    # its own port, in the same process as HTTP (started with the app). Its messages are capped by
    # max_body_bytes, as HTTP bodies are. With --workers > 1 every worker listens on the port
    # (SO_REUSEPORT; the kernel spreads connections).
    grpc_enabled: bool = True
    grpc_port: int = Field(8081, ge=0, le=65535)

    # Security
    api_key: SecretStr | None = None  # bearer key for inference and model listing; None: open
    admin_key: SecretStr | None = None  # bearer key for /admin/*; None: admin API disabled
    cors_origins: list[str] = Field(default_factory=list)  # empty: CORS off

    # Logs
    log_json: bool = False
    log_level: str = "info"
