"""The explanation viewer: a page at `/viewer` (static files inside the package, no network at run
time) that draws what `/predict` and `/explain` answer, plus the two small helpers it needs:

- `GET /viewer/sample`: one sample of a synthetic box dataset (training/datasets.py) with its
  true box, so a link such as `/viewer?sample=middle_box` shows a known answer;
- `POST /viewer/parse?format=csv|json|npz`: an uploaded or pasted file read into sequences, so the
  browser and `icaserve predict/explain` read files the same way and a bad file gets the
  service's error format (the model's own checks, e.g. features per step, stay with /predict).

The page calls only the service's JSON API and these two helpers; the helpers take the same API
key as the inference API. None of these routes is in the OpenAPI document: they serve the page,
they are not part of the API contract.
"""

from __future__ import annotations

import csv
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.to_thread
import numpy as np
import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from service.errors import InvalidInput, NotFound, PayloadTooLarge
from service.security import require_api_key

STATIC = Path(__file__).resolve().parent / "static" / "viewer"
# The only files the page loads, with their media types: nothing else under STATIC is reachable.
ASSETS = {"viewer.js": "text/javascript; charset=utf-8", "viewer.css": "text/css; charset=utf-8"}
# Only this origin: no CDN, no fonts, nothing from the network; images are drawn (data:/blob: URLs).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

# Bounds of one upload, in numbers: the page explains one sequence at a time, and the largest
# the shipped model takes is 1000 x 100; a file may hold a few such sequences.
MAX_UPLOAD_VALUES = 2_000_000
# A sample is at most this big (the largest T x N the box datasets are defined for in the paper is
# 100 x 100; larger models are served too, up to these bounds).
MAX_SAMPLE_STEPS = 1000
MAX_SAMPLE_FEATURES = 1000
MAX_SAMPLE_VALUES = 200_000
FORMATS = ("csv", "json", "npz")

router = APIRouter(include_in_schema=False)


class UploadError(InvalidInput):
    """A file the viewer or the CLI cannot read as sequences (422, field `file`)."""


@dataclass
class Upload:
    """Sequences read from a file. `inputs` holds lists of rows (JSON files are passed on as given,
    so /predict names a bad cell exactly as it would in a request); `feature_names` from a CSV
    header or an npz `feature_names` array, `masks` from an npz `masks` array (ground truth)."""

    inputs: list[Any]
    feature_names: list[str] | None = None
    masks: list[Any] | None = None
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "feature_names": self.feature_names, "masks": self.masks,
                "sequences": len(self.inputs), "notes": self.notes}


def _fail(message: str) -> UploadError:
    return UploadError(f"file: {message}", field="file")


def _too_many(values: int, what: str) -> None:
    if values > MAX_UPLOAD_VALUES:
        raise PayloadTooLarge(f"file: the {what} holds about {values:,} values; the viewer reads at most "
                              f"{MAX_UPLOAD_VALUES:,}", field="file")


def _sequences_of(value: Any) -> list[Any]:
    """A JSON document as a list of sequences: `{"inputs": [...]}` (a request body), a list of
    T x N matrices, or one T x N matrix."""
    if isinstance(value, dict):
        if "inputs" not in value:
            raise _fail(f"a JSON object needs an 'inputs' list (found keys: {sorted(value)[:8] or 'none'})")
        value = value["inputs"]
    if not isinstance(value, list) or not value:
        raise _fail("expected a non-empty list: one T x N matrix, a list of them, or {\"inputs\": [...]}")
    first = value[0]
    if isinstance(first, list) and first and isinstance(first[0], list):
        return value  # a list of sequences
    return [value]  # one sequence


def read_json_file(data: bytes) -> Upload:
    _too_many(data.count(b",") + data.count(b"["), "JSON file")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise _fail(f"not valid JSON: {exc}") from None
    return Upload(_sequences_of(doc))


def read_csv_file(data: bytes) -> Upload:
    """One sequence: a row per time step, a column per feature; an optional first row of
    feature names (any cell of it not a number makes it the header); blank lines skipped."""
    _too_many(data.count(b",") + data.count(b"\n") + data.count(b";") + data.count(b"\t"), "CSV file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _fail(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    rows = [(n, r) for n, r in enumerate(csv.reader(io.StringIO(text), dialect), start=1)
            if r and any(c.strip() for c in r)]
    if not rows:
        raise _fail("the CSV file holds no rows")
    names: list[str] | None = None
    first_line, first = rows[0]
    if any(not _is_number(c) for c in first):
        names = [c.strip() for c in first]
        rows = rows[1:]
        if not rows:
            raise _fail(f"the CSV file holds a header (line {first_line}) and no data rows")
    width = len(names) if names else len(rows[0][1])
    out: list[list[float]] = []
    for line, row in rows:
        if len(row) != width:
            raise _fail(f"line {line} has {len(row)} columns, expected {width} (one per feature)")
        values = []
        for col, cell in enumerate(row, start=1):
            try:
                v = float(cell)
            except ValueError:
                raise _fail(f"line {line}, column {col}: {cell.strip()[:40]!r} is not a number") from None
            if not np.isfinite(v):
                raise _fail(f"line {line}, column {col}: {cell.strip()[:40]!r} is not a finite number")
            values.append(v)
        out.append(values)
    return Upload([out], feature_names=names)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def read_npz_file(data: bytes) -> Upload:
    """`X` (samples x T x N, as training/datasets.py reads), `inputs`, or the archive's only array
    (T x N or S x T x N); optional `feature_names` and `masks`. Sizes are read from the zip
    directory and checked before anything is decompressed (no zip bombs), never with pickle."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            _too_many(sum(i.file_size for i in zf.infolist()) // 4, ".npz archive (uncompressed)")
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise _fail(f"not a readable .npz archive ({exc})") from None
    key = next((k for k in ("X", "inputs") if k in arrays), None)
    numeric = [k for k, a in arrays.items() if a.dtype.kind in "iuf" and a.ndim in (2, 3)]
    if key is None:
        if len(numeric) != 1:
            raise _fail(f"name the sequences 'X' or 'inputs' (found arrays: {sorted(arrays) or 'none'})")
        key = numeric[0]
    x = arrays[key]
    if x.dtype.kind not in "iuf":
        raise _fail(f"array {key!r} must hold numbers, got dtype {x.dtype}")
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or 0 in x.shape:
        raise _fail(f"array {key!r} must be T x N or samples x T x N, got shape {tuple(arrays[key].shape)}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        s, t, n = np.argwhere(~np.isfinite(x))[0]
        raise _fail(f"array {key!r}[{s}][{t}][{n}] is not a finite number")
    names = [str(v) for v in arrays["feature_names"]] if "feature_names" in arrays else None
    masks = None
    if "masks" in arrays and arrays["masks"].shape in (x.shape, x.shape[1:]):
        masks = arrays["masks"].reshape(x.shape).astype(np.uint8).tolist()
    return Upload(x.tolist(), feature_names=names, masks=masks)


def read_upload(data: bytes, fmt: str) -> Upload:
    """A file's bytes as sequences, by format (`csv`, `json` or `npz`)."""
    if not data:
        raise _fail("the file is empty")
    if fmt == "csv":
        return read_csv_file(data)
    if fmt == "json":
        return read_json_file(data)
    if fmt == "npz":
        return read_npz_file(data)
    raise InvalidInput(f"format: {fmt!r} is not one of {', '.join(FORMATS)}", field="format")


def format_of(path: str | Path) -> str:
    """The format a file name stands for (its suffix), or UploadError."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise _fail(f"{Path(path).name}: give a .csv, .json or .npz file")
    return suffix


def read_path(path: str | Path) -> Upload:
    """A file on disk, read as the viewer reads an upload (for `icaserve predict/explain`)."""
    fmt = format_of(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise _fail(f"{path}: {exc.strerror or exc}") from None
    return read_upload(data, fmt)


def sample(dataset: str, n_features: int, length: int, seed: int, label: int | None) -> dict[str, Any]:
    """One sample of a synthetic box dataset, its class, and its true box as half-open cell ranges
    (`t_start`..`t_end` over time, `f_start`..`f_end` over features), one entry per box."""
    from training.datasets import BOX_CLASS_NAMES, BOXES, make_box_dataset

    if dataset not in BOXES:
        raise InvalidInput(f"dataset: {dataset!r} is not a synthetic dataset (one of {', '.join(BOXES)})",
                           field="dataset")
    if n_features * length > MAX_SAMPLE_VALUES:
        raise InvalidInput(f"length: {length} x {n_features} features is over the {MAX_SAMPLE_VALUES:,} values a "
                           "sample may hold", field="length")
    if label is not None and not 0 <= label < len(BOX_CLASS_NAMES):
        raise InvalidInput(f"label: {label} is not a class index (0..{len(BOX_CLASS_NAMES) - 1})", field="label")
    ds = make_box_dataset(dataset, 2, length, n_features, seed)  # one sample of each class
    i = int(np.flatnonzero(ds.y == label)[0]) if label is not None else 0
    mask = ds.masks[i]
    boxes = []
    for t0, t1, bands in BOXES[dataset]:
        for f0, f1 in bands:
            box = {"t_start": round(t0 * length), "t_end": round(t1 * length),
                   "f_start": round(f0 * n_features), "f_end": round(f1 * n_features)}
            if box["t_end"] > box["t_start"] and box["f_end"] > box["f_start"] and mask[
                    box["t_start"]:box["t_end"], box["f_start"]:box["f_end"]].all():
                boxes.append(box)
    return {"dataset": dataset, "seed": seed, "label": int(ds.y[i]), "class_name": ds.class_names[int(ds.y[i])],
            "class_names": list(BOX_CLASS_NAMES), "feature_names": ds.feature_names,
            "inputs": [np.round(ds.X[i].astype(np.float64), 5).tolist()], "boxes": boxes}


# -- routes ----------------------------------------------------------------------------------------

def _json(data: Any) -> Response:
    return Response(orjson.dumps(data), media_type="application/json", headers={"Cache-Control": "no-store"})


@router.get("/viewer")
async def viewer_page() -> Response:
    """The page; its state lives in the query string, read by viewer.js."""
    return Response((STATIC / "index.html").read_bytes(), media_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                             "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


@router.get("/viewer/static/{name}")
async def viewer_asset(name: str) -> Response:
    if name not in ASSETS:
        raise NotFound(f"no viewer file {name!r}", field="name")
    return Response((STATIC / name).read_bytes(), media_type=ASSETS[name],
                    headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


@router.get("/viewer/sample", dependencies=[Depends(require_api_key)])
async def viewer_sample(
    dataset: str = Query("middle_box", max_length=64),
    n_features: int = Query(100, ge=1, le=MAX_SAMPLE_FEATURES),
    length: int = Query(100, ge=1, le=MAX_SAMPLE_STEPS),
    seed: int = Query(0, ge=0, le=2**31 - 1),
    label: int | None = Query(None, ge=0),
) -> Response:
    return _json(await anyio.to_thread.run_sync(sample, dataset, n_features, length, seed, label))


@router.post("/viewer/parse", dependencies=[Depends(require_api_key)])
async def viewer_parse(request: Request, format: str = Query(..., max_length=8)) -> Response:  # noqa: A002
    """The request body is the file's bytes, whatever its Content-Type (the body size limit of
    the service applies: 413 beyond ICASERVE_MAX_BODY_BYTES)."""
    if format not in FORMATS:
        raise InvalidInput(f"format: {format!r} is not one of {', '.join(FORMATS)}", field="format")
    data = await request.body()
    upload = await anyio.to_thread.run_sync(read_upload, data, format)
    return _json(upload.as_json())
