"""What ships, exercised for real: the demo model in the repo's own store, the ONNX /predict
backend, and every client in examples/, each against a real uvicorn server on loopback.

- The shipped model (model_store/middle-box-ica-lstm, latest version 4: version 3's files, trained
  with the localise recipe as it is now, hidden 64 with the attention free of weight decay, and a
  manifest that also scores occlusion; versions 1 to 3 stay, and tests/test_runtime.py and
  tests/test_hop_sum.py load the first two), served straight from the repo's store as
  `icaserve serve` does by default: it loads, classifies fresh middle_box data as well as its
  manifest says, and its answers (logits, gradient saliency, attention) equal the same TorchScript
  run in-process.
- ICASERVE_PREDICT_BACKEND=onnx: /predict (and V2 infer) answers equal the torch backend's, for
  mixed lengths in one request and for concurrent requests that the batcher merges; /explain,
  which always runs on torch, is unchanged.
- examples/: each script runs against the torch server (URL passed as the script expects) and
  prints what it says it does. A new file in examples/ fails here until a test knows how to run it.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from conftest import REPO, Server, metric

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

STORE = REPO / "model_store"
NAME = "middle-box-ica-lstm"
VERSION = 4  # the latest, which the service serves by default
T = N = 100
CLASSES = ["negative", "positive"]
CONCURRENT = 16




def raw(n: int, length: int = T, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, length, N)).astype(np.float32).round(4)


class Reference:
    """The shipped TorchScript run in-process, with the manifest's normalisation in front."""

    def __init__(self) -> None:
        from model_store import ModelStore

        manifest, data = ModelStore(STORE).read_file(NAME, VERSION, "torchscript")
        self.module = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
        self.mean = torch.tensor(manifest.normalization.mean, dtype=torch.float32)
        self.std = torch.tensor(manifest.normalization.std, dtype=torch.float32)

    def logits(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.module((torch.from_numpy(x) - self.mean) / self.std).numpy()

    def gradients(self, x: np.ndarray) -> np.ndarray:
        """d logit_k / d raw input, (B, C, T, N), by plain autograd."""
        xt = torch.from_numpy(x).requires_grad_(True)
        logits = self.module((xt - self.mean) / self.std)
        rows = []
        for k in range(logits.shape[1]):
            (g,) = torch.autograd.grad(logits[:, k].sum(), xt, retain_graph=True)
            rows.append(g)
        return torch.stack(rows, dim=1).numpy()

    def attention(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.module.attention_weights((torch.from_numpy(x) - self.mean) / self.std).numpy()


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


@pytest.fixture(scope="module")
def torch_server(server_factory) -> Server:
    """The repo's store, served with the defaults (torch backend)."""
    server = server_factory(STORE)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def onnx_server(server_factory) -> Server:
    """The repo's store with the ONNX predict backend and a batching window wide enough that
    requests released together are merged."""
    server = server_factory(STORE, {"PREDICT_BACKEND": "onnx", "MAX_WAIT_MS": 200,
                                    "MAX_BATCH_SIZE": CONCURRENT})
    yield server
    server.stop()


def predict_logits(c: httpx.Client, seqs: list[np.ndarray], path: str = "/predict") -> np.ndarray:
    r = c.post(path, json={"inputs": [s.tolist() for s in seqs]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["version"]) == (NAME, VERSION)
    return [np.asarray(p["logits"]) for p in body["predictions"]]


# -- the shipped model ----------------------------------------------------------------------------


def test_shipped_model_is_listed_and_ready(torch_server):
    with torch_server.client() as c:
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True, ready.text
        body = c.get("/models").json()
        assert body["default"] == NAME
        assert [m["name"] for m in body["models"]] == [NAME]  # store.py and friends are not models
        one = body["models"][0]
        assert one["versions"] == [1, 2, 3, VERSION] and one["serving_version"] == VERSION
        man = one["manifest"]
        assert man["input"]["n_features"] == N and man["input"]["class_names"] == CLASSES
        assert man["architecture"]["attention"] == "ica" and set(man["files"]) == {"torchscript", "onnx"}
        loaded = c.get("/metrics").text
        assert metric(loaded, "icaserve_model_loaded", model=NAME, version=str(VERSION), backend="torch") == 1


def test_shipped_model_classifies_middle_box_data(torch_server, reference):
    """Fresh middle_box sequences (a seed the model never saw): the served model gets them right,
    as its manifest's test accuracy (1.0) says, with exactly the in-process logits."""
    from training.datasets import synthetic_splits

    _, test = synthetic_splits("middle_box", n_train=2, n_test=40, T=T, N=N, seed=12345)
    assert test.class_names == CLASSES
    with torch_server.client() as c:
        r = c.post("/predict", json={"inputs": test.X.tolist()})
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
    labels = [CLASSES.index(p["label"]) for p in preds]
    accuracy = float(np.mean(np.asarray(labels) == test.y))
    assert accuracy >= 0.95, accuracy
    want = reference.logits(test.X.astype(np.float32))
    np.testing.assert_allclose([p["logits"] for p in preds], want, rtol=1e-4, atol=1e-5)


def test_shipped_model_explanations_point_at_the_box(torch_server):
    """The served version (trained with the localise recipe) localises: on fresh middle_box
    sequences of both classes, the default /explain (gradient), integrated gradients and occlusion
    rank the box's cells above the rest (ROC-AUC of the saliency as a box detector; 0.5 = chance)
    as its manifest's explanation_quality says, and /models shows that quality per method so a
    client can pick the method."""
    from training.datasets import synthetic_splits
    from training.evaluation import roc_auc

    _, test = synthetic_splits("middle_box", n_train=2, n_test=24, T=T, N=N, seed=4321)
    x, masks = test.X[:8], test.masks[:8]
    assert 0 < test.y[:8].sum() < 8  # both classes
    with torch_server.client() as c:
        grad = c.post("/explain", json={"inputs": x.tolist()})
        ig = c.post("/explain", json={"inputs": x.tolist(), "method": "integrated_gradients",
                                      "parameters": {"steps": 16}})
        occlusion = c.post("/explain", json={"inputs": x.tolist(), "method": "occlusion"})
        assert grad.status_code == 200 and ig.status_code == 200, (grad.text, ig.text)
        assert occlusion.status_code == 200, occlusion.text
        listed = c.get(f"/models/{NAME}").json()
    aucs = {}
    for r in (grad, ig, occlusion):
        sal = np.stack([np.asarray(e["attributions"][0]["saliency"]) for e in r.json()["explanations"]])
        aucs[r.json()["method"]] = float(np.mean(roc_auc(masks, sal)))
    assert min(aucs.values()) >= 0.85 and aucs["occlusion"] >= 0.95, aucs
    quality = listed["manifest"]["explanation_quality"]
    assert quality["methods"]["gradient"]["auc"] >= 0.9, quality
    assert quality["methods"]["occlusion"]["auc"] >= 0.95 and quality["methods"]["occlusion"]["n"] == 100, quality


def test_shipped_model_explains(torch_server, reference):
    x = raw(2, seed=1)
    with torch_server.client() as c:
        r = c.post("/explain", json={"inputs": x.tolist(), "target": "all", "absolute": False,
                                     "attention": True})
        assert r.status_code == 200, r.text
        body = r.json()
        ig = c.post("/explain", json={"inputs": x[:1].tolist(), "method": "integrated_gradients",
                                      "parameters": {"steps": 8}})
        assert ig.status_code == 200, ig.text
    assert (body["model"], body["version"], body["method"]) == (NAME, VERSION, "gradient")
    grads = reference.gradients(x)
    attention = reference.attention(x)
    for i, e in enumerate(body["explanations"]):
        np.testing.assert_allclose(e["prediction"]["logits"], reference.logits(x[i:i + 1])[0], rtol=1e-4, atol=1e-5)
        assert [a["target"] for a in e["attributions"]] == CLASSES
        for k, a in enumerate(e["attributions"]):
            sal = np.asarray(a["saliency"])
            assert sal.shape == (T, N) and np.isfinite(sal).all()
            scale = np.abs(grads[i, k]).max()
            assert scale > 0
            np.testing.assert_allclose(sal, grads[i, k], rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose(e["attention"], attention[i], rtol=1e-5, atol=1e-6)
    sal = np.asarray(ig.json()["explanations"][0]["attributions"][0]["saliency"])
    assert sal.shape == (T, N) and np.isfinite(sal).all() and (sal >= 0).all()


# -- the ONNX predict backend -------------------------------------------------------------------------


def test_onnx_backend_equals_torch(torch_server, onnx_server):
    lengths = [1, 2, 37, T, 150]  # one request, different lengths: each its own ONNX run
    seqs = [raw(1, length, seed=10 + length)[0] for length in lengths]
    with torch_server.client() as tc, onnx_server.client() as oc:
        text = oc.get("/metrics").text
        assert metric(text, "icaserve_model_loaded", model=NAME, version=str(VERSION), backend="onnx") == 1
        assert metric(text, "icaserve_model_loaded", model=NAME, version=str(VERSION), backend="torch") == 0
        want = predict_logits(tc, seqs)
        got = predict_logits(oc, seqs)
        for length, g, w in zip(lengths, got, want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"length {length}")
        # V2 infer goes through the same backend
        x = raw(3, 20, seed=5)
        v2 = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
              "outputs": [{"name": "logits"}]}
        answers = []
        for c in (tc, oc):
            r = c.post(f"/v2/models/{NAME}/infer", json=v2)
            assert r.status_code == 200, r.text
            answers.append(np.asarray(r.json()["outputs"][0]["data"]).reshape(3, -1))
        np.testing.assert_allclose(answers[1], answers[0], rtol=1e-4, atol=1e-4)
        # explanations always use torch: the same answer from both servers
        body = {"inputs": [seqs[2].tolist()], "target": "all", "absolute": False}
        e_torch, e_onnx = (c.post("/explain", json=body) for c in (tc, oc))
        assert e_torch.status_code == e_onnx.status_code == 200, e_onnx.text
        for a, b in zip(e_torch.json()["explanations"][0]["attributions"],
                        e_onnx.json()["explanations"][0]["attributions"]):
            np.testing.assert_allclose(b["saliency"], a["saliency"], rtol=1e-5, atol=1e-7)


def test_onnx_backend_under_batching_equals_torch(torch_server, onnx_server):
    """Requests released together are merged into ONNX runs of several rows (two lengths in the
    same batch, each its own run); every answer still equals torch's for that sequence alone."""
    seqs = [raw(1, T if i % 2 else 60, seed=100 + i)[0] for i in range(CONCURRENT)]
    with torch_server.client() as tc:
        want = [predict_logits(tc, [s])[0] for s in seqs]
    with onnx_server.client() as oc:
        before = oc.get("/metrics").text
    clients = [httpx.Client(base_url=onnx_server.url, timeout=120) for _ in seqs]
    barrier = threading.Barrier(len(seqs), timeout=60)

    def send(i: int) -> httpx.Response:
        barrier.wait()
        return clients[i].post("/predict", json={"inputs": [seqs[i].tolist()]})

    try:
        with ThreadPoolExecutor(len(seqs)) as pool:
            responses = list(pool.map(send, range(len(seqs))))
    finally:
        for c in clients:
            c.close()
    with onnx_server.client() as oc:
        after = oc.get("/metrics").text
    for i, (r, w) in enumerate(zip(responses, want)):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["predictions"][0]["logits"], w, rtol=1e-4, atol=1e-4,
                                   err_msg=f"request {i}")

    def delta(sample: str, **labels: str) -> float:
        return metric(after, sample, queue="predict", **labels) - metric(before, sample, queue="predict", **labels)

    assert delta("icaserve_batch_size_sum") == len(seqs)
    batches = delta("icaserve_batch_size_count")
    assert batches < len(seqs), "no two requests were merged"
    assert batches - delta("icaserve_batch_size_bucket", le="1.0") >= 1, "no batch of more than one sequence"


# -- examples/ -------------------------------------------------------------------------------------


def _run(cmd: list[str], server: Server, extra_env: dict[str, str] | None = None) -> str:
    bindir = str(Path(sys.executable).parent)  # `python3` in the scripts is this interpreter
    env = {**os.environ, "PATH": os.pathsep.join([bindir, os.environ.get("PATH", "")]),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
           **(extra_env or {})}
    env.pop("ICASERVE_API_KEY", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}" \
                                 f"\nserver log:\n{server.log()}"
    return proc.stdout


def check_client_py(server: Server) -> None:
    out = _run([sys.executable, "examples/client.py", "--url", server.url], server)
    lines = out.splitlines()
    assert sum(line.startswith(f"{NAME} v{VERSION}: ") for line in lines) == 2, out
    assert sum("most salient time step" in line for line in lines) == 2 * len(CLASSES), out
    assert any(line.startswith(f"npz: {NAME}") for line in lines), out
    assert any(line.startswith("V2: probabilities [2, 2]") for line in lines), out


def check_curl_sh(server: Server) -> None:
    out = _run(["bash", "examples/curl.sh"], server, {"URL": server.url})
    parts = out.split("== ")
    assert [p.split("\n", 1)[0].split(" ")[0] for p in parts[1:]] == ["/predict", "/explain", "/v2/models/{name}/infer"]
    predict = json.loads(parts[1].split("\n", 1)[1])
    assert predict["model"] == NAME and len(predict["predictions"]) == 1
    explain_head = parts[2].split("\n", 1)[1]  # the first 300 bytes of the answer
    assert explain_head.startswith(f'{{"model":"{NAME}","version":{VERSION},"method":"integrated_gradients"'), explain_head
    v2 = json.loads(parts[3].split("\n", 1)[1])
    assert v2["model_name"] == NAME and v2["outputs"][0]["name"] == "probabilities"


def check_make_sequence_py(server: Server) -> None:
    out = _run([sys.executable, "examples/make_sequence.py"], server)
    body = json.loads(out)
    assert np.asarray(body["inputs"]).shape == (1, T, N)
    with server.client() as c:
        r = c.post("/predict", json=body)
        assert r.status_code == 200 and r.json()["model"] == NAME, r.text


EXAMPLES = {"client.py": check_client_py, "curl.sh": check_curl_sh, "make_sequence.py": check_make_sequence_py}


def test_every_example_has_a_test():
    shipped = sorted(p.name for p in (REPO / "examples").iterdir() if p.is_file() and not p.name.startswith("."))
    assert shipped == sorted(EXAMPLES), "teach tests/test_shipped.py how to run the new example"


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs_against_a_real_server(torch_server, script):
    EXAMPLES[script](torch_server)
