"""A JSON API body's `inputs`, read straight into float32 arrays (`tensor_json.c`).

orjson builds one Python float per number and numpy then walks the nested lists: under load that
is most of a worker's event-loop time (py-spy on one worker at 32 clients: orjson 32%, numpy's
list-to-array 14%, for 100 x 100 sequences). The C scanner reads the `inputs` member's numbers
into one float32 buffer without Python objects, and orjson parses the rest of the body with
`inputs` replaced by `[]`, so every other member keeps its usual parsing and checks.

Only the plain, valid shape is taken: `inputs` a list of sequences, each a list of equally long
lists of JSON numbers, once at the top level, under a key without escapes; every number as orjson
and numpy would read it (a correctly rounded double, then float32; "-0" as the int 0), finite in
float32, and integers of at most 15 digits. Anything else returns None and the caller takes its
general path, whose answers and error messages are the API's; the same holds if the rest of the
body is not valid JSON. `ICASERVE_FAST_JSON=0`, or no C compiler: always None.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from icaserve import native

SOURCE = Path(__file__).with_name("tensor_json.c")
ENV_SWITCH = "ICASERVE_FAST_JSON"


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    return native.load(SOURCE, "JSON tensors (orjson and numpy)", ENV_SWITCH,
                       {"icaserve_scan_inputs": [ctypes.c_char_p, i64, ptr, i64, ptr, i64, ptr, ptr]})


def available() -> bool:
    return _library() is not None


def parse(body: bytes, max_sequences: int) -> dict[str, Any] | None:
    """The body as a dict whose `inputs` is a list of float32 (T, N) arrays, or None: not the plain
    shape (see the module docstring), more than `max_sequences` sequences, or no scanner."""
    lib = _library()
    if lib is None:
        return None
    out = np.empty(len(body) // 2 + 1, dtype=np.float32)  # a number and its comma take >= 2 bytes
    shapes = np.empty(2 * max_sequences, dtype=np.int64)
    nseq = ctypes.c_int64(0)
    span = (ctypes.c_int64 * 2)()
    status = lib.icaserve_scan_inputs(body, len(body), out.ctypes.data, out.size, shapes.ctypes.data,
                                      max_sequences, ctypes.byref(nseq), span)
    if status != 0:
        return None
    try:
        data = orjson.loads(body[: span[0]] + b"[]" + body[span[1]:])
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    seqs, offset = [], 0
    for k in range(nseq.value):
        t, n = int(shapes[2 * k]), int(shapes[2 * k + 1])
        seqs.append(out[offset : offset + t * n].reshape(t, n))
        offset += t * n
    data["inputs"] = seqs
    return data
