"""ICA and serving on a CUDA GPU, beside the CPU in the same run: what scripts/gpu_check.sh measures
on a lent GPU machine.

    python benchmarks/bench_gpu.py --out DIR [--seconds 4]      # on the GPU machine: prints, writes DIR/gpu.json
    python benchmarks/bench_gpu.py --render benchmarks/results/gpu.json   # its table into BENCHMARKS.md

Three parts, each printed as a table:

1. `ica`: ICA-LSTM (matrix variant) at the paper's sizes (T = N = 100, r = 20, d_a = 50), hidden 5
   and 64, forward + input-gradient of the class-0 score (one saliency map per sequence), float32,
   at batch 1, 32 and 256: the model's own parallel form on CUDA (train mode, the form the service
   explains with: cuDNN has no RNN backward in eval mode; dropout 0), the step-by-step definition
   (tests/ica_reference.py) on CUDA, and the parallel form on the CPU with one thread. CUDA times are
   medians of synchronised calls after warm-up; `max abs diff` is CUDA parallel vs CUDA step-by-step,
   TF32 off.
2. `model`: the shipped model as the service loads it (service.runtime.LoadedModel), /predict and
   /explain gradient work per batch, in-process: sequences per second at batch 1 to 256, CUDA and CPU.
3. `serving`: a real `icaserve serve` (one worker) on loopback with ICASERVE_DEVICE=cuda and one
   with the CPU, /predict and /explain gradient of one 100 x 100 sequence at 1 and 32 closed-loop
   clients (benchmarks/bench_serving.drive).

Needs a CUDA GPU for parts 1-3 (`--render` needs none). Bounded: a few minutes in all.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import torch
from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from benchmarks.bench_ica import _run  # noqa: E402
from icaserve.machine import machine_line  # noqa: E402

console = Console() if sys.stdout.isatty() else Console(width=160)
T, N, R, D_A = 100, 100, 20, 50
STORE = ROOT / "model_store"
DEVICE = "cuda"  # --device cpu: a smoke run of this script on a machine without a GPU


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (cuDNN plans, allocator)
    fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _fwd_grad(model, x: torch.Tensor) -> torch.Tensor:
    """The input-gradient of the class-0 score, as benchmarks/bench_ica.py times it on the CPU."""
    return _run(model, x, "forward+grad")


def bench_ica(repeats: int) -> list[dict]:
    from ica_reference import reference_forward

    from training.models import ModelConfig, build_model, inference_copy

    rows = []
    for hidden in (5, 64):
        torch.manual_seed(0)
        cpu_model = inference_copy(build_model(ModelConfig(n_features=N, attention="ica", ica_variant="matrix",
                                                           hidden=hidden, r=R, d_a=D_A, dropout=0.0))).eval()
        gpu_model = inference_copy(cpu_model).to(DEVICE).train()
        gpu_eval = inference_copy(cpu_model).to(DEVICE).eval()  # the step-by-step reference describes eval mode
        for batch in (1, 32, 256):
            x = torch.randn(batch, T, N, generator=torch.Generator().manual_seed(1))
            xc = x.to(DEVICE)
            row = {"hidden": hidden, "batch": batch, "form": "folded" if gpu_model.folded else "direct"}
            saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            try:
                row["cuda_ms"] = _median_ms(lambda: _fwd_grad(gpu_model, xc), repeats)
                if batch <= 32:
                    ref = lambda z: reference_forward(gpu_eval, z)  # noqa: E731
                    row["cuda_step_ms"] = _median_ms(lambda: _fwd_grad(ref, xc), max(3, repeats // 4))
                    row["max_abs_diff"] = float((_fwd_grad(gpu_model, xc) - _fwd_grad(ref, xc)).abs().max())
                    row["max_abs_grad"] = float(_fwd_grad(ref, xc).abs().max())
            finally:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                row["cpu_ms"] = _median_ms(lambda: _fwd_grad(cpu_model, x), max(3, repeats // (1 + batch // 32)))
            finally:
                torch.set_num_threads(threads)
            rows.append(row)
            console.print(f"  ica hidden={hidden} batch={batch}: " + ", ".join(
                f"{k} {v:.3g}" for k, v in row.items() if isinstance(v, float)))
    for r in rows:
        one = next(o for o in rows if o["hidden"] == r["hidden"] and o["batch"] == 1)
        r["cuda_per_seq_vs_b1"] = r["cuda_ms"] / r["batch"] / one["cuda_ms"]
        r["cpu_per_seq_vs_b1"] = r["cpu_ms"] / r["batch"] / one["cpu_ms"]
    return rows


def bench_model(name: str, repeats: int) -> list[dict]:
    from model_store import ModelStore
    from service.runtime import ExplainSpec, LoadedModel

    store = ModelStore(STORE)
    rng = np.random.default_rng(0)
    rows = []
    for device in (DEVICE, "cpu"):
        model = LoadedModel.load(store, name, None, torch.device(device))
        threads = torch.get_num_threads()
        if device == "cpu":
            torch.set_num_threads(1)  # the service's default: one intra-op thread per worker
        try:
            for batch in (1, 8, 32, 128, 256):
                if device == "cpu" and batch > 32:
                    continue
                seqs = list(rng.standard_normal((batch, T, N)).astype(np.float32))
                specs = [ExplainSpec("gradient", {}, None) for _ in seqs]
                reps = repeats if device == "cuda" else max(3, repeats // 4)
                p = _median_ms(lambda: model.predict(seqs), reps)
                e = _median_ms(lambda: model.explain(seqs, specs), reps)
                rows.append({"device": device, "batch": batch, "predict_ms": p, "explain_ms": e,
                             "predict_seq_s": batch / p * 1e3, "explain_seq_s": batch / e * 1e3})
                console.print(f"  model {device} batch={batch}: predict {p:.2f} ms ({batch / p * 1e3:.0f} seq/s), "
                              f"explain {e:.2f} ms ({batch / e * 1e3:.0f} seq/s)")
        finally:
            torch.set_num_threads(threads)
    return rows


def bench_serving(name: str, seconds: float) -> list[dict]:
    from benchmarks.bench_serving import drive
    from benchmarks.loopback import ServerProcess

    x = np.random.default_rng(0).standard_normal((1, T, N)).round(5)
    bodies = {"/predict": orjson.dumps({"inputs": x.tolist()}),
              "/explain": orjson.dumps({"inputs": x.tolist(), "method": "gradient"})}
    rows = []
    for device in (DEVICE, "cpu"):
        server = ServerProcess(STORE, {"ICASERVE_DEVICE": device, "ICASERVE_POLL_INTERVAL_S": "0",
                                       "ICASERVE_LOG_LEVEL": "warning", "ICASERVE_GRPC_ENABLED": "false",
                                       "ICASERVE_REQUEST_TIMEOUT_S": "60"})
        try:
            for path, body in bodies.items():
                drive(server.url, path, body, 4, 1.0)  # warm-up
                for clients in (1, 32):
                    r = drive(server.url, path, body, clients, seconds)
                    rows.append({"device": device, "endpoint": path, "clients": clients, "rps": r["rps"],
                                 "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "statuses": r["statuses"],
                                 "server_ms": r["server_ms"]})
                    console.print(f"  serve {device} {path} clients={clients}: {r['rps']:.0f} req/s, "
                                  f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, {r['statuses']}")
        finally:
            server.stop()
    return rows


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}; GPU: {results['gpu']}; torch {results['torch']} "
             f"(CUDA {results['cuda']}). Generated by `python benchmarks/bench_gpu.py` inside "
             f"`scripts/gpu_check.sh`, {results['generated']}.", ""]
    if results.get("ica"):
        lines += ["ICA-LSTM (matrix), T = N = 100, r = 20, d_a = 50, forward + input-gradient, float32. CUDA: "
                  "the parallel form in train mode (cuDNN), TF32 off, median of synchronised calls; CPU: the "
                  "same parallel form, one thread. `step-by-step` is the definition, on CUDA.", "",
                  "| hidden | batch | CUDA ms | CUDA step-by-step ms | speedup | CUDA per seq vs batch 1 "
                  "| CPU ms | CPU per seq vs batch 1 | CPU / CUDA | max abs diff |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["ica"]:
            step = r.get("cuda_step_ms")
            step_ms, speedup = (f"{step:.1f}", f"{step / r['cuda_ms']:.0f}x") if step else ("-", "-")
            lines.append(
                f"| {r['hidden']} | {r['batch']} | {r['cuda_ms']:.2f} | {step_ms} | "
                f"{speedup} | {r['cuda_per_seq_vs_b1']:.3f}x | "
                f"{r['cpu_ms']:.2f} | {r['cpu_per_seq_vs_b1']:.2f}x | {r['cpu_ms'] / r['cuda_ms']:.1f}x | "
                + (f"{r['max_abs_diff']:.1e} |" if "max_abs_diff" in r else "- |"))
        lines.append("")
    if results.get("model"):
        lines += [f"The shipped model `{results['model_name']}` as the service loads it (LoadedModel), "
                  "in-process, sequences/s (CPU: one intra-op thread, the service's default per worker).", "",
                  "| device | batch | /predict ms | /predict seq/s | /explain gradient ms | /explain seq/s |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in results["model"]:
            lines.append(f"| {r['device']} | {r['batch']} | {r['predict_ms']:.2f} | {r['predict_seq_s']:,.0f} | "
                         f"{r['explain_ms']:.2f} | {r['explain_seq_s']:,.0f} |")
        lines.append("")
    if results.get("serving"):
        lines += ["`icaserve serve`, one worker, on loopback, one 100 x 100 sequence per request, closed-loop "
                  f"clients, {results['seconds']} s per cell.", "",
                  "| device | endpoint | clients | req/s | p50 ms | p99 ms | server model ms | non-200 |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in results["serving"]:
            bad = {k: v for k, v in r["statuses"].items() if str(k) != "200"}
            lines.append(f"| {r['device']} | {r['endpoint']} | {r['clients']} | {r['rps']:,.0f} | "
                         f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['server_ms']['model']:.2f} | {bad or '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu.json (default: print only)")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per serving cell")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per in-process cell")
    parser.add_argument("--parts", default="ica,model,serving", help="which parts, comma-separated")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: run every part with the CPU in CUDA's place (a smoke test of this script)")
    parser.add_argument("--render", type=Path, default=None,
                        help="write this gpu.json's tables into BENCHMARKS.md and stop")
    args = parser.parse_args(argv)
    if args.render:
        from benchmarks.bench_serving import write_section

        write_section("gpu", "On a GPU", markdown(json.loads(args.render.read_text())))
        console.print(f"wrote the gpu section of BENCHMARKS.md from {args.render}")
        return 0
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        console.print("[red]no CUDA GPU: nothing to measure (--device cpu runs a smoke test)[/]")
        return 2
    from icaserve.tuning import tune_malloc
    from model_store import ModelStore

    tune_malloc()
    name = ModelStore(STORE).models()[0]
    parts = set(args.parts.split(","))
    results: dict = {"generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     "machine": machine_line(), "gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "none (--device cpu)", "torch": torch.__version__,
                     "cuda": torch.version.cuda, "seconds": args.seconds, "model_name": name}
    steps = [("ica", lambda: bench_ica(args.repeats)), ("model", lambda: bench_model(name, args.repeats)),
             ("serving", lambda: bench_serving(name, args.seconds))]
    for part, run in steps:
        if part not in parts:
            continue
        console.print(f"[bold]{part}[/]")
        try:  # one part failing still leaves the others' figures
            results[part] = run()
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            console.print(f"[red]{part} failed: {type(exc).__name__}: {exc}[/]")
            results[f"{part}_error"] = f"{type(exc).__name__}: {exc}"
        if args.out:  # after every part: a run cut short keeps what it measured
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu.json").write_text(json.dumps(results, indent=2, default=str))
    console.print(markdown(results))
    return 0 if not any(k.endswith("_error") for k in results) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
