"""The explanation viewer (/viewer) in a real browser: Debian's Chromium, headless, driven by
playwright against a real server (conftest's `server_factory`) over the tiny test store plus the
shipped model, which is the default so `?sample=middle_box` shows the real thing.

What the page draws is checked against what the API answers for the same input: the hottest cell
the page drew (the canvas' `data-hottest`, computed from the values it coloured) is the argmax of
/explain's saliency. Screenshots go to tests/artifacts/ (not committed; docs/viewer.png is one).

Skipped, with the reason, when Chromium is not installed (`bash scripts/install.sh --test` installs
it as root) or playwright is missing; nothing is downloaded at run time.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

from conftest import REPO, publish

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
SHIPPED = "middle-box-ica-lstm"
ARTIFACTS = REPO / "tests" / "artifacts"
QUALITY = {"dataset": "middle_box", "n_samples": 20, "seed": 0, "accuracy": 0.5,
           "methods": {"gradient": {"weighted_jaccard": 0.42, "auc": None}}}
TIMEOUT_MS = 30_000  # per wait in the page; generous for a busy 2-core machine

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def server(copy_store, server_factory):
    store = copy_store()
    shutil.copytree(REPO / "model_store" / SHIPPED, store / SHIPPED)
    try:  # a model whose manifest records explanation quality (a manifest key newer than this test)
        publish(store, "scored", seed=5, explanation_quality=QUALITY)
    except TypeError:
        pass
    srv = server_factory(store, {"DEFAULT_MODEL": SHIPPED, "MAX_BODY_BYTES": 200_000})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (scripts/install.sh --test installs it with apt-get as "
                    "root); the viewer's browser tests need it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1700, "height": 1300}, accept_downloads=True,
                                  bypass_csp=True)  # the page forbids eval; the test waits with it
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def explained(page, before: int) -> None:
    """Wait until the page finished explanation number `before + 1` (body[data-explained])."""
    page.wait_for_function(f"(+document.body.dataset.explained || 0) > {before}")


def count(page) -> int:
    return int(page.evaluate("+document.body.dataset.explained || 0"))


def hottest(page, key: str = "a") -> tuple[int, int]:
    t, f = page.get_attribute(f"#heatmap-{key}", "data-hottest").split(",")
    return int(t), int(f)


def api_argmax(client, inputs, **request) -> tuple[int, int]:
    r = client.post(f"/models/{SHIPPED}/explain", json={"inputs": [inputs], **request})
    assert r.status_code == 200, r.text
    sal = np.asarray(r.json()["explanations"][0]["attributions"][0]["saliency"])
    t, f = np.unravel_index(int(np.argmax(np.abs(sal))), sal.shape)
    return int(t), int(f)


def test_viewer_draws_what_the_api_says(server, page) -> None:
    client = server.client()
    sample = client.get("/viewer/sample", params={"dataset": "middle_box", "n_features": 100, "length": 100}).json()
    inputs = sample["inputs"][0]

    page.goto(f"{server.url}/viewer?sample=middle_box")
    explained(page, 0)  # a sample in the URL is loaded, predicted and explained on load
    assert page.is_visible("#prediction table")
    prediction = client.post("/predict", json={"inputs": [inputs]}).json()["predictions"][0]
    assert prediction["label"] in page.inner_text("#prediction")
    # the hottest cell drawn is the hottest cell of the API's saliency for the same input
    assert hottest(page) == api_argmax(client, inputs, method="gradient", target="predicted", absolute=True)
    assert page.get_attribute("#heatmap-a", "data-cells") == "100x100"
    assert page.is_visible("#attention-canvas")  # an ICA model: the attention matrix is shown
    assert "Explanation quality" in page.inner_text("#panel-a .quality")
    query = parse_qs(urlparse(page.url).query)
    assert query["sample"] == ["middle_box"] and query["model"] == [SHIPPED] and query["method"] == ["gradient"]
    shot(page, "viewer-sample.png")

    # switch method (with a parameter) and target: the URL follows, the drawing matches the API again
    page.select_option("#method-a", "integrated_gradients")
    page.fill("#p-a-steps", "8")
    page.select_option("#target", "negative")
    n = count(page)
    page.click("#explain-go")
    explained(page, n)
    assert hottest(page) == api_argmax(client, inputs, method="integrated_gradients", parameters={"steps": 8},
                                       target="negative", absolute=True)
    query = parse_qs(urlparse(page.url).query)
    assert query["method"] == ["integrated_gradients"] and query["target"] == ["negative"]
    assert query["a.steps"] == ["8"]

    # two methods side by side, signed values
    page.check("#compare")
    page.select_option("#method-b", "smoothgrad")
    page.fill("#p-b-samples", "4")
    page.uncheck("#absolute")
    n = count(page)
    page.click("#explain-go")
    explained(page, n)
    assert page.is_visible("#heatmap-b")
    assert hottest(page, "b") == api_argmax(client, inputs, method="smoothgrad", parameters={"samples": 4, "noise": 0.15,
                                            "seed": 0}, target="negative", absolute=False)
    assert "smoothgrad" in parse_qs(urlparse(page.url).query)["method2"]

    # keyboard: the heatmap takes focus, arrow keys move a cursor whose cell is read out
    page.focus("#heatmap-a")
    page.keyboard.press("ArrowRight")
    assert "time " in page.inner_text("#panel-a .readout") and "saliency" in page.inner_text("#panel-a .readout")

    # the numbers download as an .npz numpy reads, holding what was drawn
    with page.expect_download() as info:
        page.click("#npz-a")
    with np.load(io.BytesIO(Path(info.value.path()).read_bytes())) as z:
        assert z["saliency"].shape == (1, 100, 100) and z["inputs"].shape == (100, 100)
        assert z["attention"].shape == (100, 100) and z["mask"].sum() > 0
        meta = json.loads(bytes(z["meta"]).decode())
        assert meta["method"] == "integrated_gradients" and meta["model"] == SHIPPED
        t, f = np.unravel_index(int(np.argmax(np.abs(z["saliency"][0]))), (100, 100))
        assert (int(t), int(f)) == hottest(page)
    with page.expect_download() as info:
        page.click("#png-b")
    assert Path(info.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shot(page, "viewer-compare.png")

    # a link reproduces the view
    page.goto(page.url)
    explained(page, 0)
    assert page.input_value("#method-a") == "integrated_gradients" and page.input_value("#target") == "negative"
    assert page.input_value("#method-b") == "smoothgrad" and not page.is_checked("#absolute")


def test_viewer_uploads_and_shows_the_services_errors(server, page, tmp_path) -> None:
    client = server.client()
    page.goto(f"{server.url}/viewer?model=ica")
    page.wait_for_function("document.body.dataset.ready === '1'")
    rng = np.random.default_rng(0)

    # a good CSV (header of feature names, 10 steps x 6 features) for the tiny ICA model
    x = np.round(rng.normal(size=(10, 6)), 4)
    good = tmp_path / "seq.csv"
    good.write_text(",".join(f"sensor_{i}" for i in range(6)) + "\n" + "\n".join(",".join(map(str, r)) for r in x))
    page.set_input_files("#file", str(good))
    page.wait_for_selector("#prediction table")
    expected = client.post("/models/ica/predict", json={"inputs": [x.tolist()]}).json()["predictions"][0]
    assert f"predicted {expected['label']}" in page.inner_text("#prediction")
    n = count(page)
    page.click("#explain-go")
    explained(page, n)
    assert hottest(page) == tuple(np.unravel_index(int(np.argmax(np.abs(np.asarray(
        client.post("/models/ica/explain", json={"inputs": [x.tolist()]}).json()
        ["explanations"][0]["attributions"][0]["saliency"])))), (10, 6)))

    # every method, with the page's default parameters, draws what the API answers
    defaults = {"integrated_gradients": {"steps": 50, "baseline": "mean"},
                "smoothgrad": {"samples": 20, "noise": 0.15, "seed": 0},
                "occlusion": {"window": [5, 5], "baseline": "mean"},
                "tsr": {"base_method": "gradient", "threshold_quantile": 0.55, "feature_default": 0.1}}
    for method in ("input_x_gradient", "integrated_gradients", "smoothgrad", "occlusion", "tsr"):
        page.select_option("#method-a", method)
        n = count(page)
        page.click("#explain-go")
        explained(page, n)
        assert page.is_hidden("#error"), page.inner_text("#error")
        r = client.post("/models/ica/explain", json={"inputs": [x.tolist()], "method": method,
                                                     "parameters": defaults.get(method, {})})
        sal = np.abs(np.asarray(r.json()["explanations"][0]["attributions"][0]["saliency"]))
        assert sal[hottest(page)] == pytest.approx(sal.max(), rel=1e-6), method  # ties: any maximal cell

    # wrong shape: 5 features for a 6-feature model -> /predict's own 422, shown in the page
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("\n".join(",".join(map(str, r[:5])) for r in x))
    page.set_input_files("#file", str(wrong))
    page.wait_for_selector("#error:not([hidden])")
    api_error = client.post("/models/ica/predict", json={"inputs": [x[:, :5].tolist()]}).json()
    assert api_error["error"] in page.inner_text("#error") and "invalid_input" in page.inner_text("#error")
    shot(page, "viewer-error.png")

    # not numbers: the service's parse error, naming the line and column
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3,4,5,6\n1,2,abc,4,5,6\n")
    page.set_input_files("#file", str(bad))
    page.wait_for_function("document.getElementById('error').textContent.includes('abc')")
    assert "line 2, column 3" in page.inner_text("#error")

    # too large: over the server's body limit (200 kB here) -> 413 from the service
    big = tmp_path / "big.json"
    big.write_text(json.dumps(np.zeros((64, 2000)).tolist()))
    page.set_input_files("#file", str(big))
    page.wait_for_function("document.getElementById('error').textContent.includes('413')")
    assert "payload_too_large" in page.inner_text("#error")

    # pasted JSON that is not numbers: /predict names the cell
    page.fill("#paste", json.dumps([[1, 2, 3, 4, 5, "x"]]))
    page.click("#paste-go")
    page.wait_for_function("document.getElementById('error').textContent.includes('inputs[0][0][5]')")

    # explanation quality from the manifest, per method; "not measured" where none is recorded
    if "scored" in [m["name"] for m in client.get("/models").json()["models"]]:
        page.select_option("#model", "scored")
        page.select_option("#method-a", "gradient")
        page.wait_for_function("document.querySelector('#panel-a .quality').textContent.includes('0.42')")
        assert "weighted jaccard 0.42 · auc n/a (on 20 samples of middle_box)" in page.inner_text("#panel-a .quality")
        page.select_option("#method-a", "occlusion")
        assert page.inner_text("#panel-a .quality").endswith("not measured")

    # the model without attention: the attention switch is off
    page.select_option("#model", "lstm")
    page.wait_for_function("document.getElementById('attention').disabled")


# -- the page's helpers, over HTTP (no browser needed) ------------------------------------------------

def assert_error(r, status: int, code: str, field: str | None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == code and body["field"] == field and body["request_id"], body
    assert "Traceback" not in r.text


def test_page_and_static_files(server) -> None:
    client = server.client()
    page = client.get("/viewer")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]  # nothing from elsewhere
    for name, kind in (("viewer.js", "text/javascript"), ("viewer.css", "text/css")):
        r = client.get(f"/viewer/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert "http://" not in r.text and "https://" not in r.text  # no CDN, no fonts, no network
    assert_error(client.get("/viewer/static/index.htm"), 404, "not_found", "name")
    assert client.get("/viewer/static/..%2Fviewer.py").status_code == 404


def test_sample_helper(server) -> None:
    client = server.client()
    r = client.get("/viewer/sample", params={"dataset": "middle_box", "n_features": 10, "length": 20, "label": 1})
    assert r.status_code == 200, r.text
    s = r.json()
    x = np.asarray(s["inputs"][0])
    assert x.shape == (20, 10) and s["label"] == 1 and s["class_name"] == "positive"
    assert s["boxes"] == [{"t_start": 4, "t_end": 16, "f_start": 2, "f_end": 8}]
    assert x[4:16, 2:8].mean() > x[:4].mean()  # the positive class shifts the box up
    assert_error(client.get("/viewer/sample", params={"dataset": "nope"}), 422, "invalid_input", "dataset")
    assert_error(client.get("/viewer/sample", params={"n_features": 0}), 422, "invalid_input", "n_features")
    assert_error(client.get("/viewer/sample", params={"n_features": 1000, "length": 1000}), 422, "invalid_input",
                 "length")


def test_parse_helper(server) -> None:
    client = server.client()

    def parse(data: bytes, fmt: str):
        return client.post("/viewer/parse", params={"format": fmt}, content=data)

    buf = io.BytesIO()
    x = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    np.savez(buf, X=x, feature_names=np.array(["a", "b"]))
    r = parse(buf.getvalue(), "npz")
    assert r.status_code == 200 and r.json()["inputs"] == x.tolist() and r.json()["feature_names"] == ["a", "b"]
    assert parse(b"a;b\n1;2\n3;4\n", "csv").json()["inputs"] == [[[1.0, 2.0], [3.0, 4.0]]]
    assert parse(b"[[1, 2], [3, 4]]", "json").json()["inputs"] == [[[1, 2], [3, 4]]]
    assert_error(parse(b"not a zip", "npz"), 422, "invalid_input", "file")
    assert_error(parse(b"1,2\n3\n", "csv"), 422, "invalid_input", "file")
    assert_error(parse(b"", "csv"), 422, "invalid_input", "file")
    assert_error(parse(b"{\"x\": 1}", "json"), 422, "invalid_input", "file")
    assert_error(parse(b"1", "xml"), 422, "invalid_input", "format")
    bomb = io.BytesIO()  # 12 MB of zeros in a few kB: refused from the zip directory, never inflated
    np.savez_compressed(bomb, X=np.zeros((1, 3000, 1000), dtype=np.float32))
    assert len(bomb.getvalue()) < 200_000
    assert_error(parse(bomb.getvalue(), "npz"), 413, "payload_too_large", "file")
