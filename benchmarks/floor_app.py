"""The floor of an HTTP prediction server: the least any server must do per /predict request.

A bare ASGI app under the same uvicorn (httptools, one worker) as icaserve. It reads the same JSON
body, parses it into a float32 array with the same parser (orjson + numpy), and answers two numbers
(or, on /explain, a T x N float32 matrix: the size of one saliency answer). No routing, validation,
model, batching, metrics or logging. icaserve's overhead at one client is
reported against its latency: (icaserve latency - model time) / floor latency.

    uvicorn benchmarks.floor_app:app --port 8009 --http httptools --no-access-log

With FLOOR_PARSER=scanner it reads the body as icaserve's JSON API does when it can
(service/tensor_json.py: the numbers straight into float32), so icaserve's overhead can also be
set beside a floor that parses no slower than icaserve itself.
"""

from __future__ import annotations

import os

import numpy as np
import orjson

SCANNER = os.environ.get("FLOOR_PARSER") == "scanner"
if SCANNER:
    from service import tensor_json


async def app(scope, receive, send) -> None:  # noqa: ANN001 - the raw ASGI signature
    if scope["type"] != "http":
        return
    chunks = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    data = tensor_json.parse(body, 64) if SCANNER else None
    x = np.stack(data["inputs"]) if data else np.asarray(orjson.loads(body)["inputs"], dtype=np.float32)
    if scope["path"] == "/explain":
        body = orjson.dumps({"saliency": x[0]}, option=orjson.OPT_SERIALIZE_NUMPY)
    else:
        body = orjson.dumps({"logits": [float(x.mean()), float(x.std())]})
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
