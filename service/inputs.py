"""Request bodies to checked numpy arrays: everything a client can get wrong is caught here and
named (field and problem) before a request reaches a queue.
"""

from __future__ import annotations

import contextvars
import functools
import io
import itertools
import math
import zipfile
from dataclasses import dataclass
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread
import numpy as np
import orjson
from pydantic import BaseModel, ValidationError

from model_store import Manifest
from service import tensor_json
from service.errors import InvalidInput, MalformedBody, PayloadTooLarge, UnsupportedMediaType, _loc
from service.media import is_json, parse_media_type

if TYPE_CHECKING:
    from starlette.requests import Request

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class JsonLimits:
    """Most JSON containers (lists + objects) and values a request to one model can need; a body
    beyond them is refused by a byte count before any Python object is built (`parse_json`)."""

    max_containers: int
    max_values: int
    why: str  # the model limits behind them, for the message

    @classmethod
    def for_model(cls, manifest: Manifest, max_sequences: int) -> JsonLimits:
        """`max_sequences` T x N matrices (T <= max_length) plus one more (an explain baseline) and
        room for the other fields (target list, parameters, V2 tensor metadata)."""
        t, n = manifest.input.max_length, manifest.input.n_features
        containers = (max_sequences + 1) * (t + 1) + 1 + 1024
        values = (max_sequences + 1) * t * n + containers + 65536
        return cls(containers, values, f"{max_sequences} sequences x {t} time steps x {n} features")


# Bodies parsed at once per concurrency setting (the limiter is created once per process).
_PARSE_LIMITERS: dict[int, anyio.CapacityLimiter] = {}


def check_json_media_type(content_type: str | None, required: bool = True) -> None:
    """415 unless the Content-Type is JSON: application/json or a `+json` type, UTF-8. A missing one
    passes only where not `required` (Open Inference Protocol clients often send none)."""
    if content_type is None or not content_type.strip():
        if required:
            raise UnsupportedMediaType("missing Content-Type; send JSON with Content-Type: application/json",
                                       field="body")
        return
    media = parse_media_type(content_type)
    if media is None or not is_json(media):
        raise UnsupportedMediaType(f"send JSON (Content-Type: application/json), not {content_type!r}", field="body")
    charset = media.params.get("charset", "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(f"send JSON in UTF-8, not charset {charset!r}", field="body")


# What may make up a JSON number, with the separators between values: `parse_json` deletes them
# before it counts containers and looks for literals.
_NUMBER_BYTES = b"0123456789+-.eE, \t\r\n"

# False while the JSON body being read has no `true`/`false` literal, so no parsed value can be
# a boolean and `matrix` can skip its per-value type scan; True (scan) for every other source.
_BOOLEANS_POSSIBLE: contextvars.ContextVar[bool] = contextvars.ContextVar("booleans_possible", default=True)
# How many strings the JSON body being read holds (each is two quote characters where the text has
# no backslash), or None when unknown or when the text has a true, false or null literal.
_BODY_STRINGS: contextvars.ContextVar[int | None] = contextvars.ContextVar("body_strings", default=None)
# True once `validate` has found every string of the body outside its tensors: the tensors then
# hold JSON numbers only, and `matrix` lets numpy build float32 directly.
_TENSORS_PLAIN: contextvars.ContextVar[bool] = contextvars.ContextVar("tensors_plain", default=False)


def parse_json(body: bytes, content_type: str | None, limits: JsonLimits | None = None, *,
               media_type_required: bool = True, inputs_as_arrays: int = 0) -> Any:
    """The body as JSON, after the media type check and, with `limits`, a count of its containers
    and values: refusing `[[],[],...]` by counting bytes costs ~1 ms per MiB, where building the
    Python objects first cost ~30 bytes of memory per byte of body and seconds of CPU."""
    check_json_media_type(content_type, media_type_required)
    if not body:
        raise MalformedBody("request body is empty; send a JSON object", field="body")
    # One pass drops the bytes of numbers, commas and whitespace; what is left (brackets, braces,
    # keys, strings, literals) is tiny for a tensor body, so the counts below and the boolean
    # check read it instead of the whole body (~35 us instead of ~150 us for 100 x 100 values).
    rest = body.translate(None, _NUMBER_BYTES)
    # A body has fewer containers and values than bytes: shorter bodies need no count.
    if limits is not None and len(body) > limits.max_containers:
        # Brackets and commas inside strings count too: an over-estimate, within the margin.
        containers = rest.count(b"[") + rest.count(b"{")
        if containers > limits.max_containers:
            raise InvalidInput(f"inputs: the body holds {containers:,} lists or objects, more than any request to "
                               f"this model needs ({limits.max_containers:,} for {limits.why})", field="inputs")
        if len(body) > limits.max_values:
            values = body.count(b",") + containers
            if values > limits.max_values:
                raise InvalidInput(f"inputs: the body holds about {values:,} values, more than any request to "
                                   f"this model needs ({limits.max_values:,} for {limits.why})", field="inputs")
    # Whether `matrix` must look for booleans: only where the text has a true/false literal
    # (their letters survive the translation; "e" does not, hence "tru" and "fals").
    literals = b"tru" in rest or b"fals" in rest
    _BOOLEANS_POSSIBLE.set(literals)
    quotes = rest.count(b'"')
    _BODY_STRINGS.set(None if literals or b"nul" in rest or b"\\" in rest or quotes % 2 else quotes // 2)
    _TENSORS_PLAIN.set(False)
    if inputs_as_arrays:  # the JSON API's `inputs` straight into float32, when plain (service/tensor_json.py)
        data = tensor_json.parse(body, inputs_as_arrays)
        if data is not None:
            return data
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(f"body is not valid JSON: {exc}", field="body") from None


# Bodies up to this size are parsed on the event loop: orjson holds the GIL for its whole call, so
# a worker thread would not let the loop run meanwhile, and its two thread hops cost about as much
# as parsing a 100 x 100 sequence (~0.2 ms each way, measured on the serving path).
INLINE_PARSE_BYTES = 1 << 20


async def read_json(request: Request, manifest: Manifest, *, media_type_required: bool = True,
                    inputs_as_arrays: bool = False) -> Any:
    """The request's JSON body for `manifest`'s model: media type checked before the body is read,
    then `parse_json` with the model's limits: on the event loop up to `INLINE_PARSE_BYTES`, else
    in a worker thread, at most `json_parse_concurrency` at once per process (the limit bounds the
    parsed objects held in memory at once; the JSON limits bound each parse's duration and memory
    to what a valid request can need)."""
    settings = request.app.state.settings
    content_type = request.headers.get("content-type")
    check_json_media_type(content_type, media_type_required)
    body = await request.body()
    limits = JsonLimits.for_model(manifest, settings.max_sequences)
    if len(body) <= INLINE_PARSE_BYTES:
        return parse_json(body, content_type, limits, media_type_required=media_type_required,
                          inputs_as_arrays=settings.max_sequences if inputs_as_arrays else 0)
    limiter = _PARSE_LIMITERS.get(settings.json_parse_concurrency)
    if limiter is None:
        limiter = _PARSE_LIMITERS[settings.json_parse_concurrency] = anyio.CapacityLimiter(
            settings.json_parse_concurrency)
    parse = functools.partial(parse_json, body, content_type, limits, media_type_required=media_type_required)
    return await anyio.to_thread.run_sync(parse, limiter=limiter)


def validate(model: type[M], data: Any, tensors: tuple[str, ...] = ("inputs",)) -> tuple[M, dict[str, Any]]:
    """Validate everything but the tensor fields with pydantic; return the model and the raw
    tensor fields (parsed separately, much faster, by `sequences`)."""
    if not isinstance(data, dict):
        raise InvalidInput(f"body must be a JSON object, got {type(data).__name__}", field="body")
    raw = {k: data[k] for k in tensors if k in data}
    try:
        if len(raw) == len(data):  # tensors only, the usual body: every other field at its default
            obj = _defaults(model, tuple(raw)).model_copy()
        else:
            obj = model.model_validate({**data, **{k: [] for k in raw}})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = _loc(tuple(err.get("loc", ())))
        raise InvalidInput(f"{field}: {err.get('msg')}", field=field) from None
    strings = _BODY_STRINGS.get()
    _TENSORS_PLAIN.set(strings is not None and strings == len(data) + _strings_in(
        v for k, v in data.items() if k not in raw))
    return obj, raw


@functools.lru_cache(maxsize=64)
def _defaults(model: type[M], tensors: tuple[str, ...]) -> M:
    """`model` validated from its tensor fields alone (each empty), once: what `validate` returns,
    copied, for a body that holds nothing else. A model that refuses it raises here, every time."""
    return model.model_validate({k: [] for k in tensors})


def _strings_in(values: Iterable[Any]) -> int:
    """Strings among `values` and inside them, object keys included (iterative: any depth)."""
    n, stack = 0, list(values)
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            n += 1
        elif isinstance(v, dict):
            n += len(v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return n


def matrix(value: Any, field: str, n_features: int, min_len: int, max_len: int) -> np.ndarray:
    """One T x N matrix of finite numbers."""
    # An array was read by service/tensor_json.py: float32, T x N, finite, T and N >= 1.
    if not isinstance(value, np.ndarray) and (not isinstance(value, list) or not value):
        raise InvalidInput(f"{field}: must be a non-empty list of time steps (T x N numbers)", field=field)
    if len(value) > max_len:
        raise InvalidInput(f"{field}: {len(value)} time steps, the model accepts at most {max_len}", field=field)
    if len(value) < min_len:
        raise InvalidInput(f"{field}: {len(value)} time steps, the model needs at least {min_len}", field=field)
    if isinstance(value, np.ndarray):
        return _features(value, field, n_features)
    # Only JSON numbers. Where the body text shows the tensors hold nothing else (`validate`),
    # numpy builds float32 directly. Else numpy's own inference refuses strings, None and objects
    # (a non-numeric dtype) but turns true/false into 1/0, so where booleans may occur each value's
    # type is looked at (0.2 ms per 10,000) before numpy builds float32.
    arr = None
    direct = _TENSORS_PLAIN.get()
    scan = not direct and _BOOLEANS_POSSIBLE.get()
    try:
        plain = not scan or set(map(type, itertools.chain.from_iterable(value))) <= {float, int}
    except TypeError:  # a time step that is not a list
        plain = False
    if plain:
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # overflow: caught as non-finite below
                arr = np.asarray(value, dtype=np.float32) if scan or direct else np.asarray(value)
        except (ValueError, TypeError, OverflowError):  # ragged rows, {} as a step; a huge int
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
    _features(arr, field, n_features)
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(np.float32, copy=False)
    if not np.isfinite(out).all():
        t, f = np.argwhere(~np.isfinite(out))[0]
        raise InvalidInput(f"{field}[{t}][{f}]: value {value[t][f]!r} is not a finite float32", field=f"{field}[{t}][{f}]")
    return out


def _features(arr: np.ndarray, field: str, n_features: int) -> np.ndarray:
    if arr.shape[1] != n_features:
        raise InvalidInput(f"{field}: expected {n_features} features per time step, got {arr.shape[1]}",
                           field=field)
    return arr


class OutOfRange(InvalidInput):
    """A finite value the model cannot handle (its float32 arithmetic would overflow into NaN
    answers), or an answer that came out non-finite: refused with 422, never returned as a 200."""

    code = "out_of_range"


# (normalization object, mean, std, low, high) per (id of a manifest's normalization, max_sigma):
# computed once per loaded version, not per request. low/high are float32, rounded inwards to the
# nearest float32 at or inside the float64 bound, so for a float32 x, `low <= x <= high` holds
# exactly when x is within the float64 bounds.
_RANGES: dict[tuple[int, float], tuple[Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}


def _range(manifest: Manifest, max_sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per feature: the training mean, std (0 read as 1), and the lowest and highest float32 value
    within `max_sigma` training deviations."""
    norm = manifest.normalization
    hit = _RANGES.get((id(norm), max_sigma))
    if hit is None or hit[0] is not norm:
        if len(_RANGES) >= 256:
            _RANGES.clear()
        mean = np.asarray(norm.mean, dtype=np.float64)
        std = np.asarray(norm.std, dtype=np.float64)
        std = np.where(std > 0, std, 1.0)
        lo, hi = mean - max_sigma * std, mean + max_sigma * std
        with np.errstate(over="ignore"):  # a bound past float32's range becomes -inf / inf: no bound
            lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
        lo32 = np.where(lo32 < lo, np.nextafter(lo32, np.float32(np.inf)), lo32)
        hi32 = np.where(hi32 > hi, np.nextafter(hi32, np.float32(-np.inf)), hi32)
        hit = _RANGES[(id(norm), max_sigma)] = (norm, mean, std, lo32, hi32)
    return hit[1:]


def within_range(x: np.ndarray, manifest: Manifest, max_sigma: float | None, field: str) -> np.ndarray:
    """x (T x N, raw units) unchanged, or OutOfRange naming the first cell further than
    `max_sigma` training standard deviations from its feature's training mean (manifest
    normalization); `max_sigma` None: no bound."""
    if max_sigma is None:
        return x
    mean, std, lo, hi = _range(manifest, max_sigma)
    # Per feature, the smallest and largest value over time against the bounds: two reductions
    # instead of two full comparisons and their union.
    if x.dtype == np.float32 and (x.min(axis=0) >= lo).all() and (x.max(axis=0) <= hi).all():
        return x
    z = np.abs(x.astype(np.float64) - mean) / std
    bad = z > max_sigma
    if bad.any():
        t, f = np.argwhere(bad)[0]
        raise OutOfRange(
            f"{field}[{t}][{f}]: value {float(x[t, f]):.6g} is {z[t, f]:.3g} standard deviations from the "
            f"training mean of feature {f} ({mean[f]:.6g} +- {std[f]:.6g}); the model handles inputs within "
            f"{max_sigma:g} (out of range)", field=f"{field}[{t}][{f}]")
    return x


def sequences(raw: Any, manifest: Manifest, max_sequences: int, field: str = "inputs",
              max_sigma: float | None = None) -> list[np.ndarray]:
    """The request's sequences as float32 T x N arrays, checked against the manifest (features,
    lengths) and, with `max_sigma`, against the training range (see `within_range`)."""
    spec = manifest.input
    if not isinstance(raw, list) or not raw:
        raise InvalidInput(f"{field}: must be a non-empty list of sequences (each T x N)", field=field)
    if len(raw) > max_sequences:
        raise InvalidInput(f"{field}: {len(raw)} sequences, at most {max_sequences} per request", field=field)
    return [within_range(matrix(seq, f"{field}[{i}]", spec.n_features, spec.min_length, spec.max_length),
                         manifest, max_sigma, f"{field}[{i}]")
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


# -- arrays: binary bodies and V2 tensors ----------------------------------------------------------

NPY = "application/x-npy"
NPZ = "application/x-npz"
OCTET_STREAM = "application/octet-stream"
BINARY_TYPES = (NPY, NPZ, OCTET_STREAM)
# numpy kinds a tensor of numbers may arrive in: float, signed and unsigned integers
_NUMBER_KINDS = "fiu"


def body_kind(content_type: str | None) -> str | None:
    """The binary media type of a body (`NPY`, `NPZ`, `OCTET_STREAM`), or None for anything else
    (then the JSON rules apply, 415 included)."""
    if content_type is None:
        return None
    media = parse_media_type(content_type)
    if media is None:
        return None
    name = f"{media.type}/{media.subtype}"
    return name if name in BINARY_TYPES else None


def parse_shape(header: str | None, field: str = "X-Shape") -> tuple[int, ...]:
    """`B,T,N` (decimal integers, each >= 1) from a header; a clear 422 otherwise."""
    if header is None or not header.strip():
        raise InvalidInput(f"{field}: a raw float32 body needs its shape in the header {field}: B,T,N",
                           field=field)
    parts = [p.strip() for p in header.split(",")]
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() and len(p) <= 9 for p in parts):
        raise InvalidInput(f"{field}: expected three positive integers B,T,N, got {header[:64]!r}", field=field)
    shape = tuple(int(p) for p in parts)
    if min(shape) < 1:
        raise InvalidInput(f"{field}: every dimension must be at least 1, got {shape}", field=field)
    return shape


def _npy_array(buf: bytes, field: str) -> np.ndarray:
    """The array of one .npy file, read from its header without allocating what the header
    claims: the byte count must match the header's shape and dtype exactly (no pickles, numbers only)."""
    f = io.BytesIO(buf)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, TypeError, SyntaxError, OverflowError, EOFError) as exc:
        raise InvalidInput(f"{field}: not a valid .npy array ({exc})", field=field) from None
    if dtype.kind not in _NUMBER_KINDS or dtype.hasobject:
        raise InvalidInput(f"{field}: dtype {dtype} is not a number type (send float32)", field=field)
    count = math.prod(shape)
    if count * dtype.itemsize != len(buf) - f.tell():
        raise InvalidInput(f"{field}: the .npy header declares shape {shape} of {dtype} "
                           f"({count * dtype.itemsize} bytes) but {len(buf) - f.tell()} bytes follow", field=field)
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=f.tell())
    return arr.reshape(shape, order="F" if fortran else "C")


def _npz_member(buf: bytes, key: str, field: str, max_bytes: int) -> np.ndarray:
    """Member `key` of an .npz archive, read with at most `max_bytes` uncompressed (a small
    compressed archive cannot expand past the body limit)."""
    try:
        with zipfile.ZipFile(io.BytesIO(buf)) as zf:
            name = f"{key}.npy"
            if name not in zf.namelist():
                raise InvalidInput(f"{field}: the .npz archive has no array {key!r} (it has "
                                   f"{sorted(n.removesuffix('.npy') for n in zf.namelist())[:8]})", field=field)
            with zf.open(name) as member:
                data = member.read(max_bytes + 1)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError, ValueError) as exc:
        raise InvalidInput(f"{field}: not a valid .npz archive ({exc})", field=field) from None
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"{field}: the array {key!r} expands past {max_bytes} bytes", field=field)
    return _npy_array(data, f"{field}.{key}")


def decode_binary(body: bytes, kind: str, shape_header: str | None, max_bytes: int,
                  field: str = "inputs") -> np.ndarray:
    """A binary body as an array (not yet checked against a model): `.npy`, `.npz` (array under
    key `inputs`) or raw little-endian float32 with its shape in `X-Shape`."""
    if not body:
        raise MalformedBody("request body is empty", field="body")
    if kind == NPY:
        return _npy_array(body, field)
    if kind == NPZ:
        return _npz_member(body, "inputs", field, max_bytes)
    shape = parse_shape(shape_header)
    if math.prod(shape) * 4 != len(body):
        raise InvalidInput(f"{field}: X-Shape {','.join(map(str, shape))} needs {math.prod(shape) * 4} bytes of "
                           f"float32, the body has {len(body)}", field=field)
    return np.frombuffer(body, dtype="<f4").reshape(shape)


def batch(arr: np.ndarray, manifest: Manifest, max_sequences: int, field: str = "inputs",
          max_sigma: float | None = None) -> list[np.ndarray]:
    """A (B, T, N) array of numbers as B float32 T x N sequences, with the checks `sequences`
    makes on nested lists (count, lengths, features, finite float32, range), naming the same fields."""
    spec = manifest.input
    if arr.ndim != 3:
        raise InvalidInput(f"{field}: expected shape [B, T, {spec.n_features}], got {list(arr.shape)}", field=field)
    b, t, n = arr.shape
    if b < 1:
        raise InvalidInput(f"{field}: must hold at least one sequence", field=field)
    if b > max_sequences:
        raise InvalidInput(f"{field}: {b} sequences, at most {max_sequences} per request", field=field)
    if n != spec.n_features:
        raise InvalidInput(f"{field}: expected {spec.n_features} features per time step, got {n}", field=field)
    first = f"{field}[0]"
    if t > spec.max_length:
        raise InvalidInput(f"{first}: {t} time steps, the model accepts at most {spec.max_length}", field=first)
    if t < spec.min_length:
        raise InvalidInput(f"{first}: {t} time steps, the model needs at least {spec.min_length}", field=first)
    if arr.dtype.kind not in _NUMBER_KINDS:
        raise InvalidInput(f"{field}: must hold numbers, got dtype {arr.dtype}", field=field)
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        i, s, f = np.argwhere(bad)[0]
        where = f"{field}[{i}][{s}][{f}]"
        raise InvalidInput(f"{where}: value {arr[i, s, f].item()!r} is not a finite float32", field=where)
    return [within_range(out[i], manifest, max_sigma, f"{field}[{i}]") for i in range(b)]
