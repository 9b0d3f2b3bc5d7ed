"""Write a request body with random sequences shaped for a model in the store:
python examples/make_sequence.py > /tmp/body.json  (N features from the default model's manifest)."""

from __future__ import annotations

import json
import sys

import numpy as np

from model_store import ModelStore
from service.settings import DEFAULT_STORE


def main() -> None:
    store = ModelStore(DEFAULT_STORE)
    name = sys.argv[1] if len(sys.argv) > 1 else store.models()[0]
    spec = store.manifest(name).input
    length = spec.train_length or 50
    x = np.random.default_rng(0).standard_normal((1, length, spec.n_features)).round(4)
    print(json.dumps({"inputs": x.tolist()}))


if __name__ == "__main__":
    main()
