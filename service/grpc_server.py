"""Open Inference Protocol over gRPC: `inference.GRPCInferenceService` (service/proto/), on its own
port in the same process and event loop as the HTTP app, over the same data plane, so
`tritonclient.grpc` and KServe's gRPC client get what V2 over HTTP gives (service/v2.py).

A thin adapter: it decodes a request's tensor once (typed `contents` or `raw_input_contents`,
little-endian, any of FP32 / FP64 / FP16 / INT32 / INT64), hands it to `DataPlane` (checks,
pricing, batching, shaping) and encodes the outputs once (`raw_output_contents` when the request
came raw, typed `fp32_contents` when it came typed; the request parameter `binary_data_output`
chooses explicitly). The outputs, and `saliency` with its request parameters (`method`, `target`,
`absolute`, `normalize`, `steps`, ...), are those of V2 over HTTP.

What HTTP has, gRPC has too:
- keys: the `authorization` metadata, `Bearer <key>`, checked like the HTTP header (the admin key
  also reads); health and server metadata are open, as `/v2` and `/v2/health/*` are;
- errors: the one JSON error body (`{"error","code","field","request_id"}`) as the status details,
  with the status code of `STATUS` (422 -> INVALID_ARGUMENT, 404 -> NOT_FOUND, 401 -> UNAUTHENTICATED,
  ...); never a stack trace;
- limits: messages over `max_body_bytes` are refused by gRPC itself (RESOURCE_EXHAUSTED), answers
  up to `max_response_bytes` (+1 MiB) go out, at most `max_connections` calls at once; every
  input, pricing and deadline limit is the data plane's;
- metrics and logs: each call counts in `icaserve_requests_total` (endpoint: the method path, e.g.
  `/inference.GRPCInferenceService/ModelInfer`; status: the HTTP status it corresponds to) and
  the other request families, and writes one access-log line with its request id (the client's
  `x-request-id` metadata when safe, returned as trailing metadata).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version as package_version
from typing import Any

import grpc
import numpy as np
from fastapi import FastAPI

from model_store import StoreError
from service import metrics
from service.dataplane import BINARY_BYTES_PER_NUMBER, DataPlane, softmax
from service.errors import ApiError, InvalidInput, Unauthorized, error_body, fields_renamed, from_store_error
from service.logs import REQUEST_ID
from service.proto import grpc_predict_v2_pb2 as pb
from service.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from service.registry import Serving
from service.v2 import EXTENSIONS, OUTPUTS, PREDICT_OUTPUTS, _explain_options, _metadata, _v2_field

log = logging.getLogger("icaserve.access")
SERVICE = "inference.GRPCInferenceService"
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
CLIENT_CLOSED = 499  # as for HTTP: the client cancelled or its deadline passed before the answer

# HTTP status of an ApiError -> gRPC status code
STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# datatype -> (little-endian numpy dtype of raw contents, InferTensorContents field or None: raw only)
DATATYPES: dict[str, tuple[str, str | None]] = {
    "FP32": ("<f4", "fp32_contents"),
    "FP64": ("<f8", "fp64_contents"),
    "FP16": ("<f2", None),
    "INT32": ("<i4", "int_contents"),
    "INT64": ("<i8", "int64_contents"),
}


def grpc_status(err: ApiError) -> grpc.StatusCode:
    return STATUS.get(err.status, grpc.StatusCode.INVALID_ARGUMENT if 400 <= err.status < 500
                      else grpc.StatusCode.INTERNAL)


@dataclass
class Call:
    """What one RPC records for its metrics and access-log line."""

    request_id: str
    model: str = ""
    version: str = ""
    method: str | None = None  # attribution method, when the call explained
    timings: dict[str, float] = field(default_factory=dict)

    def serving(self, serving: Serving) -> Serving:
        self.model, self.version = serving.model.name, str(serving.model.version)
        return serving


def _param(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def _params(params: Any) -> dict[str, Any]:
    return {k: _param(v) for k, v in params.items()}


def _version(v: str) -> str | None:
    return v or None  # the protocol's empty version: the server chooses (the latest)


class GrpcInferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The RPCs, over the app's registry, data plane and settings."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.settings = app.state.settings
        self.plane: DataPlane = app.state.dataplane

    # -- the common frame of every call: request id, key, errors, metrics, log ----------------------

    async def _call(self, name: str, context: grpc.aio.ServicerContext, handler: Callable[[Call], Awaitable[Any]],
                    auth: bool = True) -> Any:
        metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        given = metadata.get("x-request-id", "")
        call = Call(given if _REQUEST_ID_OK.match(given) else uuid.uuid4().hex)
        token = REQUEST_ID.set(call.request_id)
        endpoint = f"/{SERVICE}/{name}"
        status, kind = 200, None
        error: tuple[grpc.StatusCode, str] | None = None
        metrics.IN_FLIGHT.inc()
        start = time.perf_counter()
        try:
            try:
                if auth:
                    self._authorize(metadata.get("authorization", ""))
                return_value = await handler(call)
            except StoreError as exc:
                err = from_store_error(exc)
                status, kind, error = err.status, err.code, (grpc_status(err), self._details(err, call))
            except ApiError as exc:
                status, kind, error = exc.status, exc.code, (grpc_status(exc), self._details(exc, call))
            except asyncio.CancelledError:
                status, kind = CLIENT_CLOSED, "client_closed"  # nobody to answer: gRPC has cancelled the call
                raise
            except Exception:  # noqa: BLE001  logged with the request id; the client gets no traceback
                logging.getLogger("icaserve.errors").exception("unhandled error", extra={"path": endpoint})
                status, kind = 500, "internal"
                error = (grpc.StatusCode.INTERNAL, error_body("internal error; see the server log for this request "
                                                              "id", kind, None, call.request_id).decode())
        finally:
            metrics.IN_FLIGHT.dec()
            elapsed = time.perf_counter() - start
            metrics.REQUESTS.labels(endpoint, call.model, call.version, str(status)).inc()
            metrics.REQUEST_SECONDS.labels(endpoint).observe(elapsed)
            if kind is not None:
                metrics.ERRORS.labels(kind).inc()
            elif call.method is not None:
                metrics.EXPLAIN_SECONDS.labels(call.method).observe(elapsed)
            log.info("GRPC %s %s %.1f ms", endpoint, status, elapsed * 1000,
                     extra={"method": "GRPC", "path": endpoint, "status": status,
                            "duration_ms": round(elapsed * 1000, 2), "model": call.model or None,
                            "version": call.version or None})
            REQUEST_ID.reset(token)
        trailing = (("x-request-id", call.request_id),)
        if error is not None:
            await context.abort(error[0], error[1], trailing_metadata=trailing)
        context.set_trailing_metadata(trailing)
        return return_value

    @staticmethod
    def _details(err: ApiError, call: Call) -> str:
        return error_body(err.message, err.code, err.field, call.request_id).decode()

    def _authorize(self, header: str) -> None:
        """The HTTP rule (service/security.py) on the `authorization` metadata."""
        s = self.settings
        if s.api_key is None:
            return
        scheme, _, token = header.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        for key in (s.api_key, s.admin_key):
            if key is not None and token and hmac.compare_digest(token.encode(), key.get_secret_value().encode()):
                return
        raise Unauthorized("missing or wrong API key: send the metadata 'authorization: Bearer <key>'")

    # -- health and metadata -----------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def run(call: Call) -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        return await self._call("ServerLive", context, run, auth=False)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def run(call: Call) -> pb.ServerReadyResponse:
            state = self.app.state
            return pb.ServerReadyResponse(ready=bool(state.registry.ready()) and not state.shutting_down)

        return await self._call("ServerReady", context, run, auth=False)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext) -> Any:
        async def run(call: Call) -> pb.ServerMetadataResponse:
            try:
                v = package_version("icaserve")
            except PackageNotFoundError:
                v = "unknown"
            return pb.ServerMetadataResponse(name="icaserve", version=v, extensions=EXTENSIONS)

        return await self._call("ServerMetadata", context, run, auth=False)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def run(call: Call) -> pb.ModelReadyResponse:
            version = _version(request.version)
            if request.name in self.plane.unloaded():  # unloaded via the repository API: not ready; absent: 404
                await self.app.state.registry.get(request.name, version)
                return pb.ModelReadyResponse(ready=False)
            call.serving(await self.plane.model(request.name, version))
            return pb.ModelReadyResponse(ready=True)

        return await self._call("ModelReady", context, run)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,  # noqa: N802
                            context: grpc.aio.ServicerContext) -> Any:
        async def run(call: Call) -> pb.ModelMetadataResponse:
            version = _version(request.version)
            serving = call.serving(await self.plane.model(request.name, version))
            meta = _metadata(serving)  # the HTTP answer's, so both protocols describe a model alike
            if version is None:
                meta["versions"] = [str(v) for v in self.app.state.registry.store.versions(request.name)]
            tensors = [[pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"],
                                                                shape=t["shape"]) for t in meta[k]]
                       for k in ("inputs", "outputs")]
            return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                            inputs=tensors[0], outputs=tensors[1])

        return await self._call("ModelMetadata", context, run)

    # -- inference ---------------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def run(call: Call) -> pb.ModelInferResponse:
            return await self._infer(request, call)

        return await self._call("ModelInfer", context, run)

    async def _infer(self, request: pb.ModelInferRequest, call: Call) -> pb.ModelInferResponse:
        serving = call.serving(await self.plane.model(request.model_name, _version(request.model_version)))
        params = _params(request.parameters)
        wanted = [o.name for o in request.outputs] or list(PREDICT_OUTPUTS)
        for i, name in enumerate(wanted):  # before any compute
            if name not in OUTPUTS:
                raise InvalidInput(f"outputs[{i}].name: unknown output {name!r} (this model has {sorted(OUTPUTS)})",
                                   field=f"outputs[{i}].name")
        raw_out = params.get("binary_data_output", bool(request.raw_input_contents))
        if not isinstance(raw_out, bool):
            raise InvalidInput(f"parameters.binary_data_output: must be a bool, got {raw_out!r}",
                               field="parameters.binary_data_output")
        arr, where = self._input(request, serving.model.manifest.input.n_features)
        seqs = self.plane.batch(serving.model, arr, field=where)
        values: dict[str, np.ndarray] = {}
        if "saliency" in wanted:
            with fields_renamed(_v2_field):  # explanation options are request parameters, as in V2 over HTTP
                options = _explain_options(params)
                call.method = options.method
                # protobuf carries float32 in 4 bytes, raw or typed
                explained = await self.plane.explain(serving, seqs, options, bytes_per_number=BINARY_BYTES_PER_NUMBER,
                                                     field=where, timings=call.timings)
            logits = np.stack([e.logits for e in explained.explanations]).astype(np.float32)
            values["saliency"] = explained.saliency_tensor()
        else:
            logits = (await self.plane.predict(serving, seqs, field=where, timings=call.timings)).logits
        values["logits"] = logits
        values["probabilities"] = softmax(logits).astype(np.float32)
        response = pb.ModelInferResponse(model_name=serving.model.name, model_version=str(serving.model.version),
                                         id=request.id)
        for name in wanted:
            v = np.ascontiguousarray(values[name], dtype="<f4")
            out = response.outputs.add(name=name, datatype="FP32", shape=list(v.shape))
            if raw_out:
                response.raw_output_contents.append(v.tobytes())
            else:
                out.contents.fp32_contents.extend(v.reshape(-1).tolist())
        return response

    @staticmethod
    def _input(request: pb.ModelInferRequest, n_features: int) -> tuple[np.ndarray, str]:
        """The one input tensor as a [B, T, N] array of its declared datatype, and the field that
        names its values; shape and sizes are checked before any value is read."""
        if len(request.inputs) != 1:
            raise InvalidInput(f"inputs: expected 1 input tensor ([B, T, {n_features}]), got {len(request.inputs)}",
                               field="inputs")
        tensor = request.inputs[0]
        if tensor.datatype not in DATATYPES:
            raise InvalidInput(f"inputs[0].datatype: {tensor.datatype!r} is not one of {sorted(DATATYPES)}",
                               field="inputs[0].datatype")
        shape = list(tensor.shape)
        if len(shape) != 3 or shape[2] != n_features or min(shape) < 1:
            raise InvalidInput(f"inputs[0].shape: expected [B, T, {n_features}], got {shape}", field="inputs[0].shape")
        count = math.prod(shape)
        dtype_name, contents_field = DATATYPES[tensor.datatype]
        dtype = np.dtype(dtype_name)
        raws = request.raw_input_contents
        if raws:
            if len(raws) != 1:
                raise InvalidInput(f"raw_input_contents: {len(raws)} entries for 1 input", field="raw_input_contents")
            if tensor.HasField("contents"):
                raise InvalidInput("inputs[0].contents: the input comes in raw_input_contents; send it one way only",
                                   field="inputs[0].contents")
            raw = raws[0]
            if len(raw) != count * dtype.itemsize:
                raise InvalidInput(f"raw_input_contents[0]: shape {shape} of {tensor.datatype} takes "
                                   f"{count * dtype.itemsize} bytes, got {len(raw)}", field="raw_input_contents[0]")
            return np.frombuffer(raw, dtype=dtype).reshape(shape), "raw_input_contents[0]"
        if contents_field is None:
            raise InvalidInput(f"inputs[0].contents: {tensor.datatype} has no typed contents; send it in "
                               "raw_input_contents", field="inputs[0].contents")
        values = getattr(tensor.contents, contents_field)
        if len(values) != count:
            raise InvalidInput(f"inputs[0].contents.{contents_field}: {len(values)} values for shape {shape} "
                               f"({count} expected)", field=f"inputs[0].contents.{contents_field}")
        return np.asarray(values, dtype=dtype).reshape(shape), "inputs[0].contents"


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start(app: FastAPI) -> grpc.aio.Server:
    """Start the gRPC server of `app` on `settings.grpc_port` (0: any free port; the one bound is
    `app.state.grpc_port`), in the running event loop, the app's. Fails if the port is taken."""
    s = app.state.settings
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", s.max_body_bytes),
            ("grpc.max_send_message_length", s.max_response_bytes + (1 << 20)),
            # several workers (--workers) share the port; alone, a taken port is an error
            ("grpc.so_reuseport", 1 if s.workers > 1 else 0),
        ],
        maximum_concurrent_rpcs=s.max_connections,
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(GrpcInferenceService(app), server)
    address = _address(s.host, s.grpc_port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpcio raises when it cannot bind
        raise RuntimeError(f"gRPC: cannot listen on {address} ({exc}); set ICASERVE_GRPC_PORT or --no-grpc") from None
    if port == 0:
        raise RuntimeError(f"gRPC: cannot listen on {address}; set ICASERVE_GRPC_PORT or --no-grpc")
    await server.start()
    app.state.grpc_port = port
    logging.getLogger("icaserve").info("gRPC listening", extra={"address": _address(s.host, port)})
    return server


async def stop(server: grpc.aio.Server, grace_s: float) -> None:
    """Refuse new calls, let those in flight finish within `grace_s`, then cancel the rest."""
    await server.stop(grace_s)
