"""Parallel input-cell attention vs the step-by-step definition, on CPU.

    python benchmarks/bench_ica.py [--threads 1] [--repeats-small 21] [--repeats-large 7]

Model: ICA-LSTM, matrix variant (the paper's), float32, eval mode, at the paper's sizes:
T = 100, N = 100, r = 20, d_a = 50, hidden 5 and 64, batch 1 and 50. Two paths compute the same
logits from the same weights:

- parallel: `RecurrentClassifier` (prefix-sum ICA for all steps, then a fused nn.LSTM);
- reference: `tests/ica_reference.py`, attention recomputed over the prefix at every step and the
  LSTM gate equations applied one step at a time in Python (the authors' formulation).

Modes: `forward` (under torch.no_grad) and `forward+grad` (logits, then the gradient of the
class-0 score w.r.t. the input: one saliency map). Weights are frozen (requires_grad off), as in the
service's explanation modules: an explanation takes input-gradients only. Repetitions of the two paths are interleaved
(alternating which goes first) and the median is reported. The max abs difference between the
two paths' outputs (logits, or input-gradients) is reported beside the timings.

Writes benchmarks/results/ica.json and the table between `<!-- ica:start -->` and
`<!-- ica:end -->` in BENCHMARKS.md.

Threads default to 1: the per-step GEMMs of an RNN are tiny, and on a shared machine a second
intra-op thread turns every step into an OpenMP barrier wait on a busy core (the fused LSTM was
measured 30-100x slower that way). Pass --threads to change it; the value is recorded.

malloc: like `icaserve train` and `icaserve serve`, the benchmark raises glibc's mmap and trim
thresholds (icaserve/tuning.py), so the multi-MB buffers of the parallel path are reused instead of
being mmapped, page-faulted and zeroed afresh on every call; --plain-malloc measures without it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from icaserve.machine import machine_info as _machine_info

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from ica_reference import reference_forward  # noqa: E402

from training import hop_sum  # noqa: E402
from training.models import ModelConfig, build_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "ica.json"
MARKDOWN = ROOT / "BENCHMARKS.md"
START, END = "<!-- ica:start -->", "<!-- ica:end -->"

T, N, R, D_A = 100, 100, 20, 50
HIDDENS = (5, 64)
BATCHES = (1, 32)
MODES = ("forward", "forward+grad")
TARGET_SPEEDUP = 20.0  # batch 1, forward+grad
TARGET_PER_SEQUENCE = 0.3  # batch 32 per sequence vs batch 1, forward+grad, hidden 5 (the shipped shape when it was set: v1)


def machine_info() -> dict:
    info = _machine_info()
    info["load_avg_at_start"] = info.pop("load_avg")
    return info


def _run(fn, x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "forward":
        with torch.no_grad():
            return fn(x)
    xg = x.detach().requires_grad_(True)  # a leaf on the same storage: no copy of the input timed
    (grad,) = torch.autograd.grad(fn(xg)[:, 0].sum(), xg)
    return grad


def _time(fn, x: torch.Tensor, mode: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    cpu, start = time.process_time(), time.perf_counter()
    _run(fn, x, mode)
    return time.perf_counter() - start, time.process_time() - cpu


def floor_paths(model, batch: int) -> dict:
    """The two parts every exact parallel form of this model must run, alone, each a callable that
    runs its forward and input-gradient:
    - `gemm`: the one unavoidable projection, in the cheaper order for the shapes: the inputs through
      the per-hop input weights, (B*T, N) x (N, r*G) when G < N, else the cell inputs through W_ih,
      (B*T, r*N) x (r*N, G); r*T*N*min(N, G) multiply-adds either way. Timed on torch's GEMM and on
      the fused kernel's own register-tiled one (training/hop_sum.py `tiled_mm`, AVX-512 builds);
      the floor takes the faster;
    - `recurrence`: the fused LSTM alone on ready-made gate inputs.
    Their sum bounds any form built on these kernels: reference / floor is the largest speedup
    reachable without a faster GEMM or recurrence."""
    rnn = model.rnn
    w = rnn.weight_ih_l0.detach()
    g = w.shape[0]
    h = rnn.weight_hh_l0.shape[1]
    gen = torch.Generator().manual_seed(2)
    if g < N:
        weight = torch.randn(R * g, N, generator=gen)
        inp = torch.randn(batch, T, N, generator=gen)
    else:
        weight = w.clone()
        inp = torch.randn(batch, T, R * N, generator=gen)
    gates = torch.randn(batch, T, g, generator=gen)
    eye = torch.eye(g)
    params = [eye, rnn.weight_hh_l0.detach(), rnn.bias_ih_l0.detach(), rnn.bias_hh_l0.detach()]
    h0 = torch.zeros(1, batch, h)

    def autograd_floor(fn, x: torch.Tensor):  # noqa: ANN202
        def run() -> None:
            xg = x.detach().requires_grad_(True)
            torch.autograd.grad(fn(xg).sum(), xg)
        return run

    floors = {
        "gemm": autograd_floor(lambda z: torch.matmul(z, weight.t()), inp),
        "recurrence": autograd_floor(
            lambda z: torch.lstm(z, [h0, h0], params, True, 1, 0.0, False, False, True)[0][:, -1], gates),
    }
    if hop_sum.vectorised():
        rows = inp.view(-1, inp.shape[-1])
        forward_w, backward_w = hop_sum.pack(weight.t()), hop_sum.pack(weight)
        grad_p = torch.randn(rows.shape[0], weight.shape[0], generator=gen)

        def tiled() -> None:
            hop_sum.tiled_mm(rows, forward_w, weight.shape[0])
            hop_sum.tiled_mm(grad_p, backward_w, weight.shape[1])

        floors["gemm_tiled"] = tiled
    return floors


def _floor_ms(floor_times: dict[str, list[float]]) -> dict[str, float]:
    """Median ms per floor part, the GEMM the faster of torch's and the tiled one."""
    parts = {k: statistics.median(v) * 1e3 for k, v in floor_times.items()}
    if "gemm_tiled" in parts:
        parts["gemm_torch"] = parts["gemm"]
        parts["gemm"] = min(parts["gemm"], parts["gemm_tiled"])
    return parts


def bench_case(hidden: int, batch: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            n_features=N, attention="ica", ica_variant="matrix", hidden=hidden, r=R, d_a=D_A
        )
    ).eval().requires_grad_(False)
    direct = build_model(model.config).eval().set_folded(False)  # the unfolded (B, T, r, N) form
    direct.load_state_dict(model.state_dict())
    direct.requires_grad_(False)
    x = torch.randn(batch, T, N, generator=torch.Generator().manual_seed(1))
    def stock(z: torch.Tensor) -> torch.Tensor:  # the same form on stock ops (what exports run)
        with hop_sum.use_stock_ops():
            return model(z)

    paths = {"parallel": model, "stock": stock, "direct": direct, "reference": lambda z: reference_forward(model, z)}
    floors = floor_paths(model, batch)
    rows = []
    for mode in MODES:
        outs = {name: _run(fn, x, mode) for name, fn in paths.items()}  # warm-up, and the check
        diff = max((outs[p] - outs["reference"]).abs().max().item() for p in ("parallel", "stock", "direct"))
        scale = outs["reference"].abs().max().item()
        times: dict[str, list[float]] = {name: [] for name in paths}
        cpu: dict[str, list[float]] = {name: [] for name in paths}
        floor_times: dict[str, list[float]] = {name: [] for name in floors}
        for rep in range(repeats):
            order = list(paths) if rep % 2 == 0 else list(reversed(paths))
            for name in order:
                wall, used = _time(paths[name], x, mode)
                times[name].append(wall)
                cpu[name].append(used)
            if mode == "forward+grad":
                for name, fn in floors.items():
                    start = time.perf_counter()
                    fn()
                    floor_times[name].append(time.perf_counter() - start)
        floor_parts = _floor_ms(floor_times) if mode == "forward+grad" else None
        floor = (floor_parts["gemm"] + floor_parts["recurrence"]) / 1e3 if floor_parts else None
        par = statistics.median(times["parallel"])
        dire = statistics.median(times["direct"])
        stock_ms = statistics.median(times["stock"])
        ref = statistics.median(times["reference"])
        par_cpu = statistics.median(cpu["parallel"])
        ref_cpu = statistics.median(cpu["reference"])
        rows.append(
            {
                "model": "ICA-LSTM (matrix)",
                "T": T, "N": N, "r": R, "d_a": D_A,
                "hidden": hidden,
                "batch": batch,
                "mode": mode,
                "repeats": repeats,
                "folded": bool(model.folded),
                "parallel_ms": par * 1e3,
                "direct_ms": dire * 1e3,
                "stock_ms": stock_ms * 1e3,
                "fused": bool(model.folded and 4 * hidden < N and hop_sum.available()),
                "fold_speedup": dire / par,
                "reference_ms": ref * 1e3,
                "parallel_ms_min": min(times["parallel"]) * 1e3,
                "reference_ms_min": min(times["reference"]) * 1e3,
                "speedup": ref / par,
                "parallel_cpu_ms": par_cpu * 1e3,
                "reference_cpu_ms": ref_cpu * 1e3,
                "speedup_cpu_time": ref_cpu / par_cpu,
                "max_abs_diff": diff,
                "max_abs_reference": scale,
                "form": ("folded over G" if model.folded and 4 * hidden < N
                         else "folded, projected" if model.folded else "direct"),
                "floor_ms": floor * 1e3 if floor else None,
                "floor_parts_ms": floor_parts,
                "speedup_bound": ref / floor if floor else None,
                "compared": "logits" if mode == "forward" else "input-gradient of class-0 score",
            }
        )
    return rows


def kernel_parts(model, batch: int) -> dict:
    """The kernels the shipped shape's forward + input-gradient runs at this batch, each alone on
    ready inputs (callables; AVX-512 builds, else empty): `gemms`, all of the ICA node's GEMMs on
    its tiled GEMM (the scores' x W1^T and h W2^T, the projection x rows^T, and backward the three
    input-gradient products); `hop sum`, the fused kernel's forward (online mode) and backward;
    `recurrence`, the fused LSTM's forward and input-gradient. Their sum is the batch's cost with
    no framework at all around them."""
    if not hop_sum.vectorised():
        return {}
    enc, rnn = model.encoder, model.rnn
    g, r, d_a = rnn.weight_ih_l0.shape[0], enc.w2.weight.shape[0], enc.w2.weight.shape[1]
    rows = rnn.weight_ih_l0.detach().reshape(g * r, N)
    w1, w2 = enc.w1.weight.detach(), enc.w2.weight.detach()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch * T, N, generator=gen)
    h = torch.randn(batch * T, d_a, generator=gen)
    ge = torch.randn(batch * T, r, generator=gen)
    gp = torch.randn(batch * T, g * r, generator=gen)
    weights = {"w1": w1, "w2": w2, "rows": rows}
    packed = {name: (hop_sum.pack(m.t()), hop_sum.pack(m)) for name, m in weights.items()}
    products = []  # (a, packed weight, output), outputs allocated once as the node's are reused
    for a, name, transposed in ((x, "w1", True), (h, "w2", True), (x, "rows", True),
                                (ge, "w2", False), (gp, "rows", False), (h, "w1", False)):
        weight = weights[name]
        nc = weight.shape[0] if transposed else weight.shape[1]
        products.append((a, packed[name][0 if transposed else 1], nc, a.new_empty(a.shape[0], nc)))

    def gemms() -> None:
        for a, b, nc, out in products:
            hop_sum.tiled_mm(a, b, nc, out)

    p = torch.randn(batch, T, g, r, generator=gen)
    scores = torch.randn(batch, T, r, generator=gen)
    w, m, inv_den, u = torch.empty_like(scores), torch.empty_like(scores), torch.empty_like(scores), torch.empty(batch, T, g)
    grad_u, grad_p, grad_e = torch.randn(batch, T, g, generator=gen), torch.empty_like(p), torch.empty_like(scores)

    def hop() -> None:
        w.copy_(scores)  # the forward turns scores into weights in place
        hop_sum._forward(p, w, u, inv_den, m, 0, batch)
        hop_sum._backward(p, w, inv_den, grad_u, grad_p, grad_e, m, 0, batch, times_w=True)

    return {"gemms": gemms, "hop sum": hop, "recurrence": floor_paths(model, batch)["recurrence"]}


def isolated_per_sequence(rounds: int = 3, repeats_small: int = 201, repeats_large: int = 41) -> dict:
    """The shipped shape's forward + input-gradient (hidden 5, the model's own path) at batch 1 and
    at the largest batch, each in a loop of its own (rounds alternate the two): no other path runs
    between repeats, so batch 1 is timed warm. The interleaved table above times it after the
    other paths, colder; the per-sequence ratio is reported both ways. Each round also times the
    largest batch's kernels alone (`kernel_parts`): what that batch would cost with no framework."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_features=N, attention="ica", ica_variant="matrix", hidden=5,
                                    r=R, d_a=D_A)).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    big_batch = max(BATCHES)
    inputs = {b: torch.randn(b, T, N, generator=gen) for b in (1, big_batch)}
    medians: dict[int, list[float]] = {b: [] for b in inputs}
    parts = kernel_parts(model, big_batch)
    part_medians: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(rounds):
        for b, x in inputs.items():
            for _ in range(5):
                _run(model, x, "forward+grad")
            times = [_time(model, x, "forward+grad")[0] for _ in range(repeats_small if b == 1 else repeats_large)]
            medians[b].append(statistics.median(times))
        for name, fn in parts.items():
            fn()
            times = []
            for _ in range(repeats_large):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            part_medians[name].append(statistics.median(times))
    one, big = (statistics.median(medians[b]) for b in inputs)
    kernels = {name: statistics.median(v) * 1e3 for name, v in part_medians.items()}
    return {"batch": big_batch, "batch1_ms": one * 1e3, "batch_ms": big * 1e3,
            "per_sequence_vs_batch1": big / big_batch / one, "rounds": rounds,
            "repeats": [repeats_small, repeats_large], "kernels_ms": kernels,
            "kernels_per_sequence_vs_batch1": (sum(kernels.values()) / big_batch / (one * 1e3)
                                               if kernels else None)}


def wide_scores(scale: float = 40.0, repeats_small: int = 101, repeats_large: int = 21) -> dict:
    """The shipped shape with W2 scaled past the float32-safe score spread (training/ica.py), where
    stock ops sum in float64: forward + input-gradient at batch 1 and 32, the model's own path (the
    fused kernel's online mode stays in float32) against stock ops, interleaved, and the largest
    difference of the input-gradients."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_features=N, attention="ica", ica_variant="matrix", hidden=5,
                                    r=R, d_a=D_A)).eval().requires_grad_(False)
    with torch.no_grad():
        model.encoder.w2.weight.mul_(scale)

    def stock(z: torch.Tensor) -> torch.Tensor:
        with hop_sum.use_stock_ops():
            return model(z)

    gen = torch.Generator().manual_seed(1)
    out = {"w2_scale": scale, "score_spread_bound": model.encoder.score_spread_bound(),
           "float32_safe_spread": model.encoder.float32_safe_spread, "batches": {}}
    for b in BATCHES:
        x = torch.randn(b, T, N, generator=gen)
        want = _run(stock, x, "forward+grad")
        diff = (_run(model, x, "forward+grad") - want).abs().max().item()
        times: dict[str, list[float]] = {"parallel": [], "stock": []}
        for rep in range(repeats_small if b == 1 else repeats_large):
            for name, fn in (("parallel", model), ("stock", stock))[:: 1 if rep % 2 == 0 else -1]:
                times[name].append(_time(fn, x, "forward+grad")[0])
        out["batches"][b] = {"parallel_ms": statistics.median(times["parallel"]) * 1e3,
                             "stock_ms": statistics.median(times["stock"]) * 1e3, "max_abs_diff": diff,
                             "max_abs_gradient": want.abs().max().item()}
    return out


def markdown_table(rows: list[dict], machine: dict, isolated: dict | None = None, wide: dict | None = None) -> str:
    lines = [
        "### Input-cell attention: parallel vs step-by-step (CPU)",
        "",
        f"ICA-LSTM (matrix variant), float32, T={T}, N={N}, r={R}, d_a={D_A}; "
        "median of interleaved repeats; `max abs diff` compares the logits (forward) or the "
        "input-gradient of the class-0 score (forward+grad) of each parallel path against the "
        "step-by-step one. `parallel` is the model's own form: the gate inputs computed outside the "
        "fused LSTM, with prefix sums over the gate width G = 4 x hidden where G < N (`folded over G`), "
        "else over N followed by one GEMM (`folded, projected`); folded over G, the attention, "
        "projection and hop sum run as one C call a sequence at a time with their own GEMMs "
        "(training/hop_sum.py, AVX-512 builds; else the hop sum alone in C); projected, with frozen "
        "weights on AVX-512, the attention, the per-hop prefix means and the GEMM with W_ih run as one "
        "C call a sequence at a time too (`ProjectedICA`). Weights are frozen (requires_grad off) "
        "throughout, as the service explains. `stock ops` is the "
        "same form on stock torch ops (what TorchScript and ONNX exports run); `direct` feeds the "
        "(B, T, r*N) cell inputs to a stock nn.LSTM. `floor` is the time of the two kernels every "
        "exact parallel form must run, alone: the one unavoidable projection GEMM (r*T*N*min(N, G) "
        "multiply-adds, forward and input-gradient, on the faster of torch's GEMM and the C path's "
        "tiled one) plus the fused LSTM on ready-made gate inputs; `bound` = step-by-step / "
        "floor, the largest speedup reachable on these kernels. "
        "Generated by `python benchmarks/bench_ica.py`.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores "
        f"({machine['usable_cores']} usable), torch {machine['torch']}, "
        f"{machine['torch_threads']} intra-op thread(s), load average at start "
        f"{machine['load_avg_at_start']}"
        + (", malloc tuned (icaserve/tuning.py)" if machine["tuned_malloc"] else ", glibc default malloc")
        + ".",
        "",
        "| hidden | batch | mode | form | parallel (ms) | stock ops (ms) | direct (ms) | step-by-step (ms) "
        "| speedup | speedup, CPU time | floor (ms) | bound | per sequence vs batch 1 | the same, stock ops "
        "| max abs diff |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['hidden']} | {r['batch']} | {r['mode']} | {r['form']} | "
            f"{r['parallel_ms']:.2f} | {r['stock_ms']:.2f} | {r['direct_ms']:.2f} | "
            f"{r['reference_ms']:.2f} | {r['speedup']:.1f}x | {r['speedup_cpu_time']:.1f}x | "
            + (f"{r['floor_ms']:.2f} | {r['speedup_bound']:.1f}x | " if r["floor_ms"] else "- | - | ")
            + f"{r.get('per_sequence_vs_batch1', 1.0):.2f}x | {r.get('per_sequence_vs_batch1_stock', 1.0):.2f}x | "
            f"{r['max_abs_diff']:.1e} |"
        )
    for r in rows:
        if r.get("floor_per_sequence_vs_batch1") and r["batch"] > 1:
            shape = ("the paper's size, version 1's shape" if r["hidden"] == 5
                     else "the shipped model's shape since version 3")
            lines += ["", f"Per sequence at batch {r['batch']} (hidden {r['hidden']}, {shape}, forward+grad): "
                      f"{r['per_sequence_vs_batch1']:.2f}x of batch 1 (stock ops {r['per_sequence_vs_batch1_stock']:.2f}x); "
                      f"the floor's two kernels alone at batch {r['batch']} cost "
                      f"{r['floor_per_sequence_vs_batch1']:.2f}x of the model's batch-1 time per sequence "
                      f"(GEMM {r['floor_parts_ms']['gemm']:.2f} ms + recurrence {r['floor_parts_ms']['recurrence']:.2f} ms)."]
    if isolated:
        lines += ["", f"The same ratio with each batch size timed in a loop of its own (hidden 5, "
                  f"{isolated['rounds']} alternating rounds, median): batch 1 {isolated['batch1_ms']:.2f} ms, "
                  f"batch {isolated['batch']} {isolated['batch_ms']:.2f} ms, per sequence "
                  f"{isolated['per_sequence_vs_batch1']:.2f}x. The interleaved table times batch 1 after "
                  f"the other paths, colder, which favours the ratio; the target counts as met only when "
                  f"both are within it."]
        if isolated.get("kernels_ms"):
            k = isolated["kernels_ms"]
            lines += ["", f"The batch-{isolated['batch']} kernels alone, on ready inputs, same rounds: "
                      + ", ".join(f"{name} {ms:.2f} ms" for name, ms in k.items())
                      + f"; {sum(k.values()):.2f} ms in all, {isolated['kernels_per_sequence_vs_batch1']:.2f}x "
                      f"of batch 1 per sequence: the ratio a batch of {isolated['batch']} would reach with "
                      f"no framework around its kernels (the model at batch {isolated['batch']} spends "
                      f"{isolated['batch_ms'] - sum(k.values()):.2f} ms beyond them)."]
    if wide:
        cells = "; ".join(f"batch {b} {v['parallel_ms']:.2f} ms against {v['stock_ms']:.2f} ms on stock ops "
                          f"(input-gradients equal to {v['max_abs_diff']:.1e}, largest {v['max_abs_gradient']:.1f})"
                          for b, v in wide["batches"].items())
        lines += ["", f"Wide attention scores (hidden 5, W2 x {wide['w2_scale']:.0f}: score spread bound "
                  f"{wide['score_spread_bound']:.0f}, past the float32-safe {wide['float32_safe_spread']:.0f}, so "
                  f"stock ops sum in float64; the fused kernel's online softmax stays in float32), forward + "
                  f"input-gradient: {cells}."]
    lines += [
        "",
        "Times are wall-clock medians; `speedup, CPU time` is the ratio of median process CPU "
        "time (single thread), less sensitive to other load on a shared machine.",
    ]
    return "\n".join(lines)


def write_markdown(table: str) -> None:
    block = f"{START}\n{table}\n{END}"
    if MARKDOWN.exists():
        text = MARKDOWN.read_text()
        if START in text and END in text and text.index(START) < text.index(END):
            head, rest = text.split(START, 1)
            _, tail = rest.split(END, 1)
            text = head + block + tail
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        text = (
            "# Benchmarks\n\n"
            "Measured results. Each section is generated by the script it names and is rewritten "
            "only between its own markers.\n\n" + block + "\n"
        )
    MARKDOWN.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--repeats-small", type=int, default=21, help="repeats at batch 1")
    parser.add_argument("--repeats-large", type=int, default=7, help="repeats at batch 50")
    parser.add_argument("--plain-malloc", action="store_true",
                        help="keep glibc's default malloc thresholds (see module docstring)")
    parser.add_argument("--no-write", action="store_true", help="print only; write no files")
    args = parser.parse_args(argv)
    tuned = False
    if not args.plain_malloc:
        from icaserve.tuning import tune_malloc

        tuned = tune_malloc()

    from rich.console import Console
    from rich.table import Table

    torch.set_num_threads(args.threads)
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console = Console(width=120)
    machine = machine_info()
    machine["tuned_malloc"] = tuned
    console.print(
        f"[bold]Machine:[/] {machine['cpu']} | {machine['cores']} cores "
        f"({machine['usable_cores']} usable) | torch {machine['torch']} | "
        f"{machine['torch_threads']} thread(s) | load avg {machine['load_avg_at_start']}"
    )
    began = time.perf_counter()
    rows: list[dict] = []
    for hidden in HIDDENS:
        for batch in BATCHES:
            repeats = args.repeats_small if batch == 1 else args.repeats_large
            console.print(f"  hidden={hidden} batch={batch} ({repeats} repeats) ...")
            rows.extend(bench_case(hidden, batch, repeats))
    elapsed = time.perf_counter() - began
    for r in rows:  # per-sequence cost at batch B relative to batch 1, same hidden and mode
        one = next(o for o in rows if o["hidden"] == r["hidden"] and o["mode"] == r["mode"] and o["batch"] == 1)
        r["per_sequence_vs_batch1"] = r["parallel_ms"] / r["batch"] / one["parallel_ms"]
        r["per_sequence_vs_batch1_stock"] = r["stock_ms"] / r["batch"] / one["stock_ms"]
        if r["floor_ms"]:  # the floor's per-sequence cost against the model's own batch-1 time
            r["floor_per_sequence_vs_batch1"] = r["floor_ms"] / r["batch"] / one["parallel_ms"]

    table = Table(title=f"ICA-LSTM (matrix), T={T} N={N} r={R} d_a={D_A}, float32, CPU")
    for col, justify in [
        ("hidden", "right"), ("batch", "right"), ("mode", "left"), ("form", "left"), ("parallel ms", "right"),
        ("stock ops ms", "right"), ("direct ms", "right"), ("step-by-step ms", "right"), ("speedup", "right"), ("speedup (CPU time)", "right"),
        ("max abs diff", "right"),
    ]:
        table.add_column(col, justify=justify)
    for r in rows:
        table.add_row(
            str(r["hidden"]), str(r["batch"]), r["mode"], r["form"],
            f"{r['parallel_ms']:.2f}", f"{r['stock_ms']:.2f}", f"{r['direct_ms']:.2f}", f"{r['reference_ms']:.2f}", f"{r['speedup']:.1f}x", f"{r['speedup_cpu_time']:.1f}x",
            f"{r['max_abs_diff']:.1e}",
        )
    console.print(table)

    target_rows = [r for r in rows if r["batch"] == 1 and r["mode"] == "forward+grad"]
    met = all(r["speedup"] >= TARGET_SPEEDUP for r in target_rows)
    worst_diff = max(r["max_abs_diff"] for r in rows)
    console.print(
        f"target: >= {TARGET_SPEEDUP:.0f}x at batch 1, forward+grad: "
        + ("[green]met[/]" if met else "[red]NOT met[/]")
        + " (wall / CPU time: "
        + ", ".join(f"hidden {r['hidden']}: {r['speedup']:.1f}x / {r['speedup_cpu_time']:.1f}x"
                    for r in target_rows)
        + ")"
    )
    for r in target_rows:
        if r["speedup_bound"]:
            console.print(f"  hidden {r['hidden']}: floor {r['floor_ms']:.2f} ms "
                          f"({', '.join(f'{k} {v:.2f}' for k, v in r['floor_parts_ms'].items())}), "
                          f"bound {r['speedup_bound']:.1f}x")
    per_seq = next((r for r in rows if r["hidden"] == 5 and r["batch"] == max(BATCHES)
                    and r["mode"] == "forward+grad"), None)
    console.print("  per sequence, each batch size in a loop of its own ...")
    isolated = isolated_per_sequence()
    per_seq_met = bool(per_seq and per_seq["per_sequence_vs_batch1"] <= TARGET_PER_SEQUENCE
                       and isolated["per_sequence_vs_batch1"] <= TARGET_PER_SEQUENCE)
    if per_seq:
        console.print(
            f"target: per sequence at batch {per_seq['batch']} <= {TARGET_PER_SEQUENCE}x batch 1 (hidden 5, "
            f"forward+grad): " + ("[green]met[/]" if per_seq_met else "[red]NOT met[/]")
            + f" ({per_seq['per_sequence_vs_batch1']:.2f}x; stock ops {per_seq['per_sequence_vs_batch1_stock']:.2f}x; "
            f"floor per sequence {per_seq['floor_ms'] / per_seq['batch']:.3f} ms = "
            f"{per_seq['floor_per_sequence_vs_batch1']:.2f}x; each batch size in a loop of its own: "
            f"{isolated['per_sequence_vs_batch1']:.2f}x, batch 1 {isolated['batch1_ms']:.2f} ms, "
            f"batch {isolated['batch']} {isolated['batch_ms']:.2f} ms)"
        )
        if isolated["kernels_ms"]:
            console.print("  batch-%d kernels alone: %s; %.2fx of batch 1 per sequence" % (
                isolated["batch"], ", ".join(f"{k} {v:.2f} ms" for k, v in isolated["kernels_ms"].items()),
                isolated["kernels_per_sequence_vs_batch1"]))
    console.print("  wide attention scores ...")
    wide = wide_scores()
    console.print(f"wide attention scores (spread bound {wide['score_spread_bound']:.0f}), forward+grad: "
                  + "; ".join(f"batch {b} {v['parallel_ms']:.2f} ms vs stock ops {v['stock_ms']:.2f} ms "
                              f"(diff {v['max_abs_diff']:.1e})" for b, v in wide["batches"].items()))
    console.print(f"largest max abs diff parallel vs step-by-step: {worst_diff:.1e}; "
                  f"benchmark time {elapsed:.0f} s")

    if not args.no_write:
        payload = {
            "benchmark": "ica_parallel_vs_step_by_step",
            "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine,
            "settings": {
                "device": "cpu", "dtype": "float32", "model": "ICA-LSTM (matrix)", "T": T, "N": N,
                "r": R, "d_a": D_A, "hiddens": list(HIDDENS), "batches": list(BATCHES),
                "statistic": "median of interleaved repeats (wall clock; CPU time also recorded)",
                "repeats_small": args.repeats_small, "repeats_large": args.repeats_large,
                "tuned_malloc": machine["tuned_malloc"],
            },
            "target": {"speedup": TARGET_SPEEDUP, "at": "batch 1, forward+grad", "met": met,
                       "per_sequence_vs_batch1": TARGET_PER_SEQUENCE, "per_sequence_met": per_seq_met},
            "elapsed_s": elapsed,
            "results": rows,
            "isolated_per_sequence": isolated,
            "wide_scores": wide,
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
        write_markdown(markdown_table(rows, machine, isolated, wide))
        console.print(f"wrote {RESULTS.relative_to(ROOT)} and {MARKDOWN.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
