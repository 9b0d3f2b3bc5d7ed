"""The data plane: the one owner of predict and explain under every wire format.

A wire format (the JSON API and its binary bodies in `service/api.py`, the Open Inference
Protocol in `service/v2.py`, KServe V1 in `service/v1.py`, gRPC) decodes its request to arrays
once, calls this module, and encodes what comes back once. Everything between is here, once:
model lookup (the registry, and models unloaded through the V2 repository API), input checks
against the manifest, the explanation's options and method parameters, pricing (work and answer
size, before anything is queued), submission to the model's batchers, and the shaping of results
(softmax, saliency scaling, profiles, and the refusal of anything non-finite as 422).

Errors are the `service.errors.ApiError` subclasses; their `field` names the request's field in
the JSON API's terms (`inputs[1]`, `parameters.steps`, `target`); an adapter whose format names
things differently passes `field=` for the inputs and renames the rest (`errors.fields_renamed`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

import attribution
from service import metrics
from service.batching import Expired, QueueFull
from service.errors import DeadlineExceeded, InvalidInput, NotFound, Overloaded, TooExpensive, _loc
from service.inputs import OutOfRange, batch, matrix, resolve_targets, sequences, within_range
from service.registry import ModelRegistry, Serving
from service.runtime import Explanation, ExplainSpec, LoadedModel
from service.schemas import ExplainOptions, ExplainParameters
from service.settings import Settings

# Bytes per number of an explanation's answer, for the size estimate made before compute: JSON
# writes float32 values as their shortest text ("-1.2345678e-38," is 15 bytes; typical values take
# ~10); binary answers (npz, V2 binary tensors) take 4 bytes each.
JSON_BYTES_PER_NUMBER = 16
BINARY_BYTES_PER_NUMBER = 4
# The explain parameters a client can send (attribution methods take more, e.g. internal_batch_size).
API_PARAMETERS = frozenset(ExplainParameters.model_fields)


# -- shaping ---------------------------------------------------------------------------------------

def refuse_non_finite(values: np.ndarray, field: str, what: str) -> None:
    """A non-finite model output or saliency is never a success: 422 out_of_range naming the
    field whose values took the model's float32 arithmetic out of range."""
    if not np.isfinite(values).all():
        raise OutOfRange(f"{field}: {what} is not finite: the values are out of the range the model can handle "
                         "(send values nearer the training data's range)", field=field)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities along the last axis, in float64 (they sum to 1 to 1e-15)."""
    z = np.asarray(logits, dtype=np.float64)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def prediction(logits: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """One sequence's prediction as the JSON API (and KServe V1) writes it. The softmax of a few
    classes in Python floats (float64, like `softmax`) costs a fraction of numpy's per-call setup."""
    z = logits.tolist()
    top = max(z)
    e = [math.exp(v - top) for v in z]
    total = math.fsum(e)
    k = z.index(top)  # the first maximum, as np.argmax
    return {"label": class_names[k], "class_index": k,
            "probabilities": {c: v / total for c, v in zip(class_names, e)}, "logits": z}


@dataclass(frozen=True)
class Predictions:
    """The answer to a predict: logits (B, C) float32, all finite."""

    model: LoadedModel
    logits: np.ndarray

    def probabilities(self) -> np.ndarray:
        return softmax(self.logits)

    def as_dicts(self) -> list[dict[str, Any]]:
        return [prediction(z, self.model.class_names) for z in self.logits]


@dataclass(frozen=True)
class Explained:
    """The answer to an explain: per sequence its explanation (logits, targets, attention) and
    its saliency K x T x N as returned (absolute / normalize applied) with its time (K x T) and
    feature (K x N) profiles; every number finite."""

    model: LoadedModel
    method: str
    explanations: list[Explanation]
    saliency: list[np.ndarray]
    time_profiles: list[np.ndarray]
    feature_profiles: list[np.ndarray]

    def as_dicts(self) -> list[dict[str, Any]]:
        """The JSON API's `explanations` entries (also KServe V1's)."""
        names = self.model.class_names
        return [{
            "prediction": prediction(e.logits, names),
            "attributions": [
                {"target": names[t], "target_index": t, "saliency": sal[k],
                 "time_profile": tp[k], "feature_profile": fp[k]}
                for k, t in enumerate(e.targets)
            ],
            "attention": e.attention,
        } for e, sal, tp, fp in zip(self.explanations, self.saliency, self.time_profiles, self.feature_profiles)]

    def saliency_tensor(self) -> np.ndarray:
        """(B, K, T, N) float32; all sequences of one length (a V2 tensor's are)."""
        return np.stack(self.saliency)


# -- explanation options, parameters, pricing ------------------------------------------------------

def explain_options(data: dict[str, Any]) -> ExplainOptions:
    """`method`, `target`, `parameters`, `absolute`, `normalize`, `attention` checked by one model,
    whatever format they came in; 422 naming the field (e.g. `parameters.steps`)."""
    try:
        return ExplainOptions.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = _loc(tuple(err.get("loc", ())))
        raise InvalidInput(f"{field}: {err.get('msg')}", field=field) from None


def method_params(options: ExplainOptions, seqs: list[np.ndarray], model: LoadedModel,
                  settings: Settings) -> dict[str, Any]:
    """The attribution keyword arguments for this request, checked against the method and limits.
    What a method accepts comes from its registration in `attribution.METHODS` (TSR: its own
    parameters and its base method's), limited to the parameters the API exposes."""
    given = options.parameters.model_dump(exclude_none=True)
    try:
        allowed = set(attribution.resolve_method(options.method).accepted(given)) & API_PARAMETERS
    except ValueError as exc:  # a bad base_method (the schema already limits it)
        raise InvalidInput(f"parameters.base_method: {exc}", field="parameters.base_method") from None
    for key in given:
        if key not in allowed:
            raise InvalidInput(f"parameters.{key}: not a parameter of method {options.method!r} "
                               f"(it takes: {sorted(allowed) or 'none'})", field=f"parameters.{key}")
    if given.get("steps", 0) > settings.max_ig_steps:
        raise TooExpensive(f"parameters.steps: at most {settings.max_ig_steps}", field="parameters.steps")
    if given.get("samples", 0) > settings.max_smoothgrad_samples:
        raise TooExpensive(f"parameters.samples: at most {settings.max_smoothgrad_samples}",
                           field="parameters.samples")
    if given.get("noise", 0.0) > settings.max_smoothgrad_noise:
        raise OutOfRange(f"parameters.noise: {given['noise']:g} standard deviations is out of range; at most "
                         f"{settings.max_smoothgrad_noise:g} (setting max_smoothgrad_noise)", field="parameters.noise")
    manifest = model.manifest
    if "baseline" in allowed:
        b = given.get("baseline", "mean")
        if b == "mean":
            given["baseline"] = np.asarray(manifest.normalization.mean, dtype=np.float32)
        elif b == "zeros":
            given["baseline"] = 0.0
        else:
            lengths = {len(s) for s in seqs}
            if len(lengths) != 1:
                raise InvalidInput("parameters.baseline: a given baseline needs all sequences of one length",
                                   field="parameters.baseline")
            length = lengths.pop()
            given["baseline"] = within_range(
                matrix(b, "parameters.baseline", manifest.input.n_features, length, manifest.input.max_length),
                manifest, settings.max_input_sigma, "parameters.baseline")
    for key in ("window", "stride"):
        if key in given:
            given[key] = tuple(given[key])
    return given


def cost(method: str, params: dict[str, Any], seqs: list[np.ndarray], n_features: int, n_targets: int) -> int:
    """Work of the request in sample-step evaluations (time steps x forward-equivalents, summed
    over sequences). Every parameter reaches `attribution.estimate_cost`, which prices each method
    (TSR included) from all the parameters that change its work; priced once per length."""
    p = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in params.items()}
    return sum(count * length * attribution.estimate_cost(method, 1, length, n_features, n_targets, **p)
               for length, count in Counter(len(s) for s in seqs).items())


def price(options: ExplainOptions, params: dict[str, Any], seqs: list[np.ndarray], model: LoadedModel,
          n_targets: int, settings: Settings, bytes_per_number: int = JSON_BYTES_PER_NUMBER,
          field: str = "inputs") -> None:
    """Refuse, before any compute, an explanation whose work or answer is too large: the work
    (`max_explain_cost`) and the answer's estimated size (`max_response_bytes`), each first
    without the T x T attention weights (too large: `field`, the inputs), then with them (`attention`)."""
    n_features = model.manifest.input.n_features
    try:
        work = cost(options.method, params, seqs, n_features, n_targets)
    except ValueError as exc:  # parameters the method refuses for these inputs, e.g. an occlusion window
        raise InvalidInput(f"parameters: {exc}", field="parameters") from None
    limit = settings.max_explain_cost
    if work > limit:
        raise TooExpensive(
            f"this explanation would cost {work:,} sample-step evaluations, above the limit of "
            f"{limit:,}; send fewer or shorter sequences, fewer targets or fewer steps", field=field)
    if options.attention:
        with_attention = work + sum(len(s) * model.attention_cost(len(s)) for s in seqs)
        if with_attention > limit:
            raise TooExpensive(
                f"with its T x T attention weights this explanation would cost {with_attention:,} sample-step "
                f"evaluations, above the limit of {limit:,}; leave out attention or send fewer or shorter "
                "sequences", field="attention")
    n_classes = len(model.class_names)
    # per sequence: K saliency matrices T x N with their time (T) and feature (N) profiles, logits
    # and probabilities; attention: T x T
    numbers = sum(n_targets * (len(s) * n_features + len(s) + n_features) + 2 * n_classes for s in seqs)
    size = numbers * bytes_per_number
    cap = settings.max_response_bytes
    if size > cap:
        raise TooExpensive(
            f"the answer would be about {size:,} bytes, above the limit of {cap:,}; send fewer or shorter "
            "sequences or fewer targets (or ask for a binary answer, 4 bytes a number)", field=field)
    if options.attention:
        size += sum(len(s) ** 2 for s in seqs) * bytes_per_number
        if size > cap:
            raise TooExpensive(
                f"with its T x T attention weights the answer would be about {size:,} bytes, above the limit of "
                f"{cap:,}; leave out attention or send fewer or shorter sequences", field="attention")


def postprocess(sal: np.ndarray, absolute: bool, normalize: str) -> np.ndarray:
    """The saliency as returned (float32); scaled in float64, so a large but finite saliency
    cannot overflow in the scaling."""
    sal = sal.astype(np.float64)
    if absolute:
        sal = np.abs(sal)
    if normalize == "minmax":
        lo = sal.min(axis=(1, 2), keepdims=True)
        span = sal.max(axis=(1, 2), keepdims=True) - lo
        sal = (sal - lo) / np.where(span > 0, span, 1.0)
    elif normalize == "sum":
        total = np.abs(sal).sum(axis=(1, 2), keepdims=True)
        sal = sal / np.where(total > 0, total, 1.0)
    return np.ascontiguousarray(sal, dtype=np.float32)


def shape_explanations(results: list[Explanation], model: LoadedModel, options: ExplainOptions,
                       field: str = "inputs") -> Explained:
    """Saliency as returned, with its profiles, after making sure that every number of the answer
    is finite: a non-finite logit, saliency, profile or attention weight is a 422 out_of_range
    naming the sequence (or, for saliency of finite logits, the perturbation parameter the client
    gave, when it gave one), never a 200 with nulls."""
    given = options.parameters.model_dump(exclude_none=True)
    suspects = [f"parameters.{k}" for k in ("noise", "baseline")
                if k in given and (k != "baseline" or not isinstance(given[k], str))]
    sals, tps, fps = [], [], []
    for i, e in enumerate(results):
        refuse_non_finite(e.logits, f"{field}[{i}]", "the model's output")
        if e.attention is not None:
            refuse_non_finite(e.attention, f"{field}[{i}]", "the attention weights")
        sal = postprocess(e.saliency, options.absolute, options.normalize)
        # summed in float64, returned as float32 (as the saliency): an overflow shows as inf
        time_profiles = sal.sum(axis=2, dtype=np.float64).astype(np.float32)
        feature_profiles = sal.sum(axis=1, dtype=np.float64).astype(np.float32)
        for values in (sal, time_profiles, feature_profiles):
            where = suspects[0] if suspects else f"{field}[{i}]"
            refuse_non_finite(values, where, f"the saliency of {field}[{i}]")
        sals.append(sal)
        tps.append(time_profiles)
        fps.append(feature_profiles)
    return Explained(model, options.method, results, sals, tps, fps)


# -- the data plane --------------------------------------------------------------------------------

class DataPlane:
    """Predict and explain for one server process (one per app: `app.state.dataplane`)."""

    def __init__(self, registry: ModelRegistry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings
        self._unloaded: set[str] = set()  # names unloaded through the V2 repository API

    # -- models ----------------------------------------------------------------------------------
    async def model(self, name: str | None, version: str | int | None = None) -> Serving:
        """The serving version for a request (None: the default model; version None or 'latest':
        its latest); 404 when there is none or it was unloaded."""
        key = name or self.registry.default_name
        if key is not None and key in self._unloaded:
            raise NotFound(f"model {key!r} is unloaded; load it with POST /v2/repository/models/{key}/load",
                           field="model")
        return await self.registry.get(name, version)

    def unloaded(self) -> frozenset[str]:
        return frozenset(self._unloaded)

    async def unload(self, name: str) -> None:
        """Stop serving `name` on every route of this process (404 until loaded again)."""
        await self.registry.get(name)  # 404 for a model that is not there
        self._unloaded.add(name)

    async def load(self, name: str) -> Serving:
        """Serve `name` again, after loading whatever is newly published (refused versions retried)."""
        self._unloaded.discard(name)
        await self.registry.reload()
        return await self.model(name)

    # -- inputs ----------------------------------------------------------------------------------
    def sequences(self, model: LoadedModel, raw: Any, field: str = "inputs") -> list[np.ndarray]:
        """Nested lists (JSON) as checked float32 T x N sequences (lengths may differ)."""
        s = self.settings
        return sequences(raw, model.manifest, s.max_sequences, field=field, max_sigma=s.max_input_sigma)

    def batch(self, model: LoadedModel, arr: np.ndarray, field: str = "inputs") -> list[np.ndarray]:
        """A (B, T, N) array (binary body, V2 tensor) as checked float32 T x N sequences."""
        s = self.settings
        return batch(arr, model.manifest, s.max_sequences, field=field, max_sigma=s.max_input_sigma)

    # -- compute ---------------------------------------------------------------------------------
    async def _submit(self, lane: Any, seqs: list[np.ndarray], specs: list[ExplainSpec] | None,
                      timings: dict[str, float] | None) -> list[Any]:
        s = self.settings
        try:
            return await lane.submit(seqs, specs, s.request_timeout_s, timings)
        except QueueFull:
            raise Overloaded(f"the {lane.name} queue is full; retry shortly",
                             headers={"Retry-After": str(s.retry_after_s)}) from None
        except Expired:
            raise DeadlineExceeded(f"not answered within {s.request_timeout_s} s") from None

    async def predict(self, serving: Serving, seqs: list[np.ndarray], *, field: str = "inputs",
                      timings: dict[str, float] | None = None) -> Predictions:
        """Logits of checked sequences through the model's predict batcher; non-finite: 422."""
        logits = await self._submit(serving.predict, seqs, None, timings)
        for i, z in enumerate(logits):
            refuse_non_finite(z, f"{field}[{i}]", "the model's output")
        return Predictions(serving.model, np.stack(logits).astype(np.float32, copy=False))

    def plan(self, serving: Serving, seqs: list[np.ndarray], options: ExplainOptions, *,
             bytes_per_number: int = JSON_BYTES_PER_NUMBER, field: str = "inputs") -> ExplainSpec:
        """Every check of an explanation before it is queued (targets, attention, method
        parameters, price); the spec the batcher runs, without its deadline."""
        model = serving.model
        targets, all_targets = resolve_targets(options.target, model.class_names)
        if options.attention and not model.has_attention:
            raise InvalidInput("attention: this model has no input-cell attention", field="attention")
        params = method_params(options, seqs, model, self.settings)
        spec = ExplainSpec(options.method, params, targets, all_targets, options.attention)
        price(options, params, seqs, model, spec.n_targets(len(model.class_names)), self.settings,
              bytes_per_number, field)
        return spec

    async def explain(self, serving: Serving, seqs: list[np.ndarray], options: ExplainOptions, *,
                      bytes_per_number: int = JSON_BYTES_PER_NUMBER, field: str = "inputs",
                      timings: dict[str, float] | None = None) -> Explained:
        """Checked, priced, batched and shaped explanations of checked sequences. The time spent
        checking is added to `timings['parse_s']`."""
        t0 = time.perf_counter()
        spec = self.plan(serving, seqs, options, bytes_per_number=bytes_per_number, field=field)
        if timings is not None:
            timings["parse_s"] = timings.get("parse_s", 0.0) + time.perf_counter() - t0
        # the same deadline as the batcher's (now + request_timeout_s): the compute stops there too
        spec = dataclasses.replace(spec, deadline=time.perf_counter() + self.settings.request_timeout_s)
        results: list[Explanation] = await self._submit(serving.explain, seqs, [spec] * len(seqs), timings)
        shaped = shape_explanations(results, serving.model, options, field)
        metrics.EXPLANATIONS.labels(options.method).inc(len(seqs))
        return shaped


__all__ = ["DataPlane", "Predictions", "Explained", "explain_options", "prediction", "softmax",
           "refuse_non_finite", "cost", "price", "method_params", "postprocess", "shape_explanations",
           "JSON_BYTES_PER_NUMBER", "BINARY_BYTES_PER_NUMBER"]
