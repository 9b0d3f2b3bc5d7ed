"""The data plane under the JSON API: binary request bodies on /predict and /explain (.npy, .npz,
raw float32 with X-Shape) against a real server, equal to the JSON answers and refused with the
same limits and error format; the binary decoders on hostile bytes; and the adapters carrying no
compute of their own.
"""

from __future__ import annotations

import ast
import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import CLASS_NAMES, MAX_LENGTH, N_FEATURES, REPO, assert_error, metric, raw_sequence
from service import inputs
from service.errors import InvalidInput, MalformedBody, PayloadTooLarge

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

NPY, NPZ, RAW = "application/x-npy", "application/x-npz", "application/octet-stream"
MAX_SEQUENCES = 4
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def server(server_factory, model_store):
    s = server_factory(model_store, {"MAX_SEQUENCES": MAX_SEQUENCES, "MAX_BODY_BYTES": MAX_BODY,
                                     "MAX_IG_STEPS": 16})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


@pytest.fixture(autouse=True)
def _no_internal_errors(http):
    yield
    assert metric(http.get("/metrics").text, "icaserve_requests_total", status="500") == 0


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def npz(compressed: bool = False, **arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def encodings(x: np.ndarray) -> dict[str, tuple[bytes, dict[str, str]]]:
    return {
        "npy": (npy(x), {"content-type": NPY}),
        "npy_float64": (npy(x.astype(np.float64)), {"content-type": NPY}),
        "npz": (npz(inputs=x), {"content-type": NPZ}),
        "npz_compressed": (npz(True, inputs=x), {"content-type": NPZ}),
        "raw": (x.astype("<f4").tobytes(), {"content-type": RAW, "x-shape": ",".join(map(str, x.shape))}),
    }


X = np.stack([raw_sequence(12, seed=s) for s in (1, 2, 3)])


@pytest.mark.parametrize("encoding", list(encodings(X)))
def test_binary_predict_equals_json(http, encoding):
    body, headers = encodings(X)[encoding]
    r = http.post("/models/ica/predict", content=body, headers=headers)
    assert r.status_code == 200, r.text
    want = http.post("/models/ica/predict", json={"inputs": X.tolist()}).json()
    assert r.json() == want


@pytest.mark.parametrize("encoding", ["npy", "raw"])
def test_binary_explain_equals_json(http, encoding):
    body, headers = encodings(X[:2])[encoding]
    query = {"method": "integrated_gradients", "steps": "8", "baseline": "zeros", "target": "up,0",
             "absolute": "false"}
    r = http.post("/explain", content=body, headers=headers, params=query)
    assert r.status_code == 200, r.text
    want = http.post("/explain", json={"inputs": X[:2].tolist(), "method": "integrated_gradients",
                                       "parameters": {"steps": 8, "baseline": "zeros"}, "target": ["up", 0],
                                       "absolute": False})
    assert r.json() == want.json()
    # npz in, npz out; parameters as one JSON object
    r = http.post("/explain", content=npz(inputs=X[:2]), headers={"content-type": NPZ, "accept": NPZ},
                  params={"method": "occlusion", "parameters": '{"window": [2, 3]}', "target": "all"})
    assert r.status_code == 200, r.text
    arrays = np.load(io.BytesIO(r.content))
    assert arrays["saliency_0"].shape == (len(CLASS_NAMES), 12, N_FEATURES)


BAD_BINARY = {
    # name: (body, headers, query, status, code, field)
    "raw_without_shape": (b"\0" * 24, {"content-type": RAW}, {}, 422, "invalid_input", "X-Shape"),
    "raw_bad_shape": (b"\0" * 24, {"content-type": RAW, "x-shape": "1,x,6"}, {}, 422, "invalid_input", "X-Shape"),
    "raw_short": (b"\0" * 20, {"content-type": RAW, "x-shape": f"1,1,{N_FEATURES}"}, {}, 422, "invalid_input",
                  "inputs"),
    "raw_nan": (struct.pack("<6f", 0, 0, float("nan"), 0, 0, 0), {"content-type": RAW, "x-shape": "1,1,6"}, {},
                422, "invalid_input", "inputs[0][0][2]"),
    "raw_out_of_range": (struct.pack("<6f", 0, 0, 1e30, 0, 0, 0), {"content-type": RAW, "x-shape": "1,1,6"}, {},
                         422, "out_of_range", "inputs[0][0][2]"),
    "too_many_sequences": (npy(np.zeros((MAX_SEQUENCES + 1, 2, N_FEATURES), np.float32)), {"content-type": NPY},
                           {}, 422, "invalid_input", "inputs"),
    "too_long": (npy(np.zeros((1, MAX_LENGTH + 1, N_FEATURES), np.float32)), {"content-type": NPY}, {}, 422,
                 "invalid_input", "inputs[0]"),
    "wrong_features": (npy(np.zeros((1, 3, N_FEATURES + 1), np.float32)), {"content-type": NPY}, {}, 422,
                       "invalid_input", "inputs"),
    "two_dims": (npy(np.zeros((3, N_FEATURES), np.float32)), {"content-type": NPY}, {}, 422, "invalid_input",
                 "inputs"),
    "strings": (npy(np.array([[["a"] * N_FEATURES]])), {"content-type": NPY}, {}, 422, "invalid_input", "inputs"),
    "pickled_objects": (npy(np.array([[[None] * N_FEATURES]], dtype=object)), {"content-type": NPY}, {}, 422,
                        "invalid_input", "inputs"),
    "not_npy": (b"hello", {"content-type": NPY}, {}, 422, "invalid_input", "inputs"),
    "npz_without_inputs": (npz(x=np.zeros((1, 2, N_FEATURES))), {"content-type": NPZ}, {}, 422, "invalid_input",
                           "inputs"),
    "not_a_zip": (b"PK\x03\x04garbage", {"content-type": NPZ}, {}, 422, "invalid_input", "inputs"),
    "empty": (b"", {"content-type": NPY}, {}, 400, "malformed_body", "body"),
    "oversize": (b"\0" * (MAX_BODY + 8), {"content-type": RAW, "x-shape": f"1,{MAX_BODY // 24 + 1},6"}, {}, 413,
                 "payload_too_large", "body"),
    "explain_unknown_query": (npy(X[:1]), {"content-type": NPY}, {"stesp": "4"}, 422, "invalid_input", "stesp"),
    "explain_steps_past_limit": (npy(X[:1]), {"content-type": NPY}, {"method": "integrated_gradients",
                                                                     "steps": "17"}, 422, "too_expensive",
                                 "parameters.steps"),
    "explain_foreign_parameter": (npy(X[:1]), {"content-type": NPY}, {"steps": "4"}, 422, "invalid_input",
                                  "parameters.steps"),
    "explain_bad_target": (npy(X[:1]), {"content-type": NPY}, {"target": "sideways"}, 422, "invalid_input",
                           "target"),
}


@pytest.mark.parametrize("case", list(BAD_BINARY))
def test_binary_bad_bodies(http, case):
    body, headers, query, status, code, field = BAD_BINARY[case]
    path = "/explain" if case.startswith("explain") else "/predict"
    assert_error(http.post(path, content=body, headers=headers, params=query), status, code, field)


# -- the decoders on hostile bytes (no allocation of what a header claims) ---------------------------

def test_npy_header_cannot_make_the_server_allocate():
    """A header claiming 2**60 floats over 16 bytes of data: refused by counting, nothing allocated."""
    big = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.float32))
    big["shape"] = (2 ** 40, 2 ** 20)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, big)
    with pytest.raises(InvalidInput, match="bytes follow"):
        inputs.decode_binary(buf.getvalue() + b"\0" * 16, NPY, None, MAX_BODY)


def test_npz_bomb_is_refused_by_its_expanded_size():
    bomb = npz(True, inputs=np.zeros((64, 1024, N_FEATURES), np.float32))  # 1.5 MB of zeros, a few KB zipped
    assert len(bomb) < MAX_BODY
    with pytest.raises(PayloadTooLarge):
        inputs.decode_binary(bomb, NPZ, None, MAX_BODY)


@pytest.mark.parametrize("shape", ["", "1,2", "1,2,3,4", "0,1,6", "1,-1,6", "1,1e3,6", "1,٣,6", "9" * 12 + ",1,6"])
def test_bad_shape_headers(shape):
    with pytest.raises(InvalidInput) as info:
        inputs.decode_binary(b"\0" * 24, RAW, shape, MAX_BODY)
    assert info.value.field == "X-Shape"


def test_empty_binary_body():
    with pytest.raises(MalformedBody):
        inputs.decode_binary(b"", RAW, "1,1,6", MAX_BODY)


def test_zip_member_names_are_not_paths():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../inputs.npy", npy(np.zeros((1, 1, N_FEATURES), np.float32)))
    with pytest.raises(InvalidInput, match="no array 'inputs'"):
        inputs.decode_binary(buf.getvalue(), NPZ, None, MAX_BODY)


# -- one data plane: the adapters hold no compute ------------------------------------------------------

ADAPTERS = ["service/api.py", "service/v2.py", "service/v1.py"]
COMPUTE = {"torch", "attribution", "service.runtime", "service.batching"}


@pytest.mark.parametrize("path", ADAPTERS)
def test_adapters_import_no_compute(path):
    """Wire formats decode, call service.dataplane, encode: they import neither the model's
    compute (torch, attribution, runtime) nor the batchers, and no adapter borrows from another
    adapter's internals (only `service.api`'s request helpers `dataplane` and `serving_for`)."""
    tree = ast.parse(Path(REPO, path).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            if node.module == "service.api":
                assert {a.name for a in node.names} <= {"dataplane", "serving_for"}, ast.dump(node)
    assert not imported & COMPUTE, imported & COMPUTE
