"""A Python client for predict, explain (JSON and compact .npz) and V2 infer.

    python examples/client.py [--url http://127.0.0.1:8000] [--api-key KEY]
"""

from __future__ import annotations

import argparse
import io
import json

import httpx
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=60) as client:
        models = client.get("/models").raise_for_status().json()
        name = models["default"]
        spec = next(m for m in models["models"] if m["name"] == name)["manifest"]["input"]
        length = spec["train_length"] or 50
        x = np.random.default_rng(0).standard_normal((2, length, spec["n_features"])).astype(np.float32)

        pred = client.post("/predict", json={"inputs": x.tolist()}).raise_for_status().json()
        for p in pred["predictions"]:
            print(f"{pred['model']} v{pred['version']}: {p['label']} {p['probabilities']}")

        body = {"inputs": x.tolist(), "method": "gradient", "target": "all", "attention": False}
        exp = client.post("/explain", json=body).raise_for_status().json()
        for i, e in enumerate(exp["explanations"]):
            for a in e["attributions"]:
                profile = np.asarray(a["time_profile"])
                print(f"sequence {i}, class {a['target']}: saliency {len(a['saliency'])}x{len(a['saliency'][0])}, "
                      f"most salient time step {int(profile.argmax())}")

        # The same explanation as a compact NumPy archive.
        npz = client.post("/explain", json=body, headers={"Accept": "application/x-npz"}).raise_for_status()
        arrays = np.load(io.BytesIO(npz.content))
        meta = json.loads(arrays["meta"].tobytes())
        print("npz:", meta["model"], {k: arrays[k].shape for k in arrays.files if k != "meta"})

        v2 = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        out = client.post(f"/v2/models/{name}/infer", json=v2).raise_for_status().json()
        print("V2:", out["outputs"][0]["name"], out["outputs"][0]["shape"], out["outputs"][0]["data"][:2])


if __name__ == "__main__":
    main()
