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

With FLOOR_WORK_MS=x it also computes for x ms in a thread of the default executor (torch.mm on a
small matrix, the GIL released, one torch thread) before it answers, as a server hands its model
to a thread, and reports the time in a `Server-Timing: model` entry: the floor for a model of that
length. The hand-off and a core busy for x ms cost time beyond x that grows with x (here 0.3 ms at
0.9 ms of work, 0.7 ms at 2.8 ms), so a model's time and the bare floor's latency do not add up.
"""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import orjson

SCANNER = os.environ.get("FLOOR_PARSER") == "scanner"
if SCANNER:
    from service import tensor_json
WORK_MS = float(os.environ.get("FLOOR_WORK_MS") or 0)
if WORK_MS:
    import torch

    torch.set_num_threads(1)
    _A = torch.randn(96, 96)


def _work() -> float:
    """WORK_MS of compute with the GIL released (as a TorchScript model's); returns the seconds spent."""
    start = time.perf_counter()
    end = start + WORK_MS / 1000
    while time.perf_counter() < end:
        torch.mm(_A, _A)
    return time.perf_counter() - start


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
    headers = [(b"content-type", b"application/json")]
    if WORK_MS:
        spent = await asyncio.get_running_loop().run_in_executor(None, _work)
        headers.append((b"server-timing", f"model;dur={spent * 1000:.3f}".encode()))
    if scope["path"] == "/explain":
        body = orjson.dumps({"saliency": x[0]}, option=orjson.OPT_SERIALIZE_NUMPY)
    else:
        body = orjson.dumps({"logits": [float(x.mean()), float(x.std())]})
    await send({"type": "http.response.start", "status": 200,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
