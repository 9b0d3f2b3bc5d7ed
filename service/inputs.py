"""Request bodies to checked numpy arrays: everything a client can get wrong is caught here and
named (field and problem) before a request reaches a queue.
"""

from __future__ import annotations

import itertools
from typing import Any, TypeVar

import numpy as np
import orjson
from pydantic import BaseModel, ValidationError

from model_store import Manifest
from service.errors import InvalidInput, MalformedBody, UnsupportedMediaType, _loc

M = TypeVar("M", bound=BaseModel)


def parse_json(body: bytes, content_type: str | None) -> Any:
    if content_type and "json" not in content_type.split(";")[0].lower():
        raise UnsupportedMediaType(f"send JSON (Content-Type: application/json), not {content_type!r}", field="body")
    if not body:
        raise MalformedBody("request body is empty; send a JSON object", field="body")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(f"body is not valid JSON: {exc}", field="body") from None


def validate(model: type[M], data: Any, tensors: tuple[str, ...] = ("inputs",)) -> tuple[M, dict[str, Any]]:
    """Validate everything but the tensor fields with pydantic; return the model and the raw
    tensor fields (parsed separately, much faster, by `sequences`)."""
    if not isinstance(data, dict):
        raise InvalidInput(f"body must be a JSON object, got {type(data).__name__}", field="body")
    raw = {k: data[k] for k in tensors if k in data}
    try:
        obj = model.model_validate({**data, **{k: [] for k in raw}})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = _loc(tuple(err.get("loc", ())))
        raise InvalidInput(f"{field}: {err.get('msg')}", field=field) from None
    return obj, raw


def matrix(value: Any, field: str, n_features: int, min_len: int, max_len: int) -> np.ndarray:
    """One T x N matrix of finite numbers."""
    if not isinstance(value, list) or not value:
        raise InvalidInput(f"{field}: must be a non-empty list of time steps (T x N numbers)", field=field)
    if len(value) > max_len:
        raise InvalidInput(f"{field}: {len(value)} time steps, the model accepts at most {max_len}", field=field)
    if len(value) < min_len:
        raise InvalidInput(f"{field}: {len(value)} time steps, the model needs at least {min_len}", field=field)
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        arr = None
    # numpy turns true/false mixed with numbers into 1/0: look for booleans explicitly (cheap).
    if arr is not None and arr.ndim == 2 and bool in set(map(type, itertools.chain.from_iterable(value))):
        arr = None
    if arr is None or arr.ndim != 2 or arr.dtype.kind not in "iuf":
        # Find the first bad row to name it.
        for t, row in enumerate(value):
            if not isinstance(row, list):
                raise InvalidInput(f"{field}[{t}]: must be a list of {n_features} numbers", field=f"{field}[{t}]")
            if len(row) != n_features:
                raise InvalidInput(f"{field}[{t}]: expected {n_features} features, got {len(row)}",
                                   field=f"{field}[{t}]")
            for f, v in enumerate(row):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise InvalidInput(f"{field}[{t}][{f}]: must be a number, got {type(v).__name__}",
                                       field=f"{field}[{t}][{f}]")
        raise InvalidInput(f"{field}: must be a T x N matrix of numbers", field=field)
    if arr.shape[1] != n_features:
        raise InvalidInput(f"{field}: expected {n_features} features per time step, got {arr.shape[1]}",
                           field=field)
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        t, f = np.argwhere(bad)[0]
        raise InvalidInput(f"{field}[{t}][{f}]: value {value[t][f]!r} is not a finite float32", field=f"{field}[{t}][{f}]")
    return out


def sequences(raw: Any, manifest: Manifest, max_sequences: int, field: str = "inputs") -> list[np.ndarray]:
    spec = manifest.input
    if not isinstance(raw, list) or not raw:
        raise InvalidInput(f"{field}: must be a non-empty list of sequences (each T x N)", field=field)
    if len(raw) > max_sequences:
        raise InvalidInput(f"{field}: {len(raw)} sequences, at most {max_sequences} per request", field=field)
    return [matrix(seq, f"{field}[{i}]", spec.n_features, spec.min_length, spec.max_length)
            for i, seq in enumerate(raw)]


def resolve_targets(target: Any, class_names: list[str]) -> tuple[list[int] | None, bool]:
    """(explicit class indices or None for 'predicted', all-classes flag)."""
    if target == "predicted":
        return None, False
    if target == "all":
        return None, True
    items = target if isinstance(target, list) else [target]
    if not items:
        raise InvalidInput("target: empty list; name at least one class", field="target")
    out = []
    for i, item in enumerate(items):
        where = "target" if not isinstance(target, list) else f"target[{i}]"
        if isinstance(item, str) and item in class_names:
            out.append(class_names.index(item))
        elif isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(class_names):
            out.append(item)
        else:
            raise InvalidInput(f"{where}: {item!r} is not a class of this model (classes: {class_names}, "
                               f"or indices 0..{len(class_names) - 1})", field=where)
    return list(dict.fromkeys(out)), False
