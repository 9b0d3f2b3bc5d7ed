#!/usr/bin/env bash
# predict, explain and V2 infer with curl against a running `icaserve serve` (default 127.0.0.1:8000).
set -euo pipefail
URL="${URL:-http://127.0.0.1:8000}"
AUTH=()
[[ -n "${ICASERVE_API_KEY:-}" ]] && AUTH=(-H "Authorization: Bearer ${ICASERVE_API_KEY}")
cd "$(dirname "$0")/.."
python3 examples/make_sequence.py > /tmp/icaserve-body.json

echo "== /predict"
curl -sf "${AUTH[@]}" -H 'content-type: application/json' --data @/tmp/icaserve-body.json "$URL/predict"
echo

echo "== /explain (integrated gradients, all classes; first 300 bytes)"
python3 -c 'import json; d=json.load(open("/tmp/icaserve-body.json")); d.update(method="integrated_gradients", target="all", parameters={"steps": 16}); print(json.dumps(d))' \
  | curl -sf "${AUTH[@]}" -H 'content-type: application/json' --data @- "$URL/explain" -o /tmp/icaserve-explain.json
head -c 300 /tmp/icaserve-explain.json
echo

echo "== /v2/models/{name}/infer (Open Inference Protocol)"
NAME=$(curl -sf "${AUTH[@]}" "$URL/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["default"])')
python3 -c '
import json, numpy as np
x = np.asarray(json.load(open("/tmp/icaserve-body.json"))["inputs"], dtype=np.float32)
print(json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}))' \
  | curl -sf "${AUTH[@]}" -H 'content-type: application/json' --data @- "$URL/v2/models/$NAME/infer"
echo
