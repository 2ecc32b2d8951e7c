"""Benchmarks of the certified Neumann solver (docs/hypergrad.md).

On MLPs of about 1M and 10M parameters:
- one bare Hessian-vector product (the cached double-backward operator) and
  one Neumann iteration (that product + the fused update + the check);
  goal: iteration / HVP <= 1.1;
- the two HVP modes of ``hvp()`` (each call builds its own graph) and the
  cached operator;
- the fused update (every backend) against the eager foreach sequence;
- on CUDA, a small model: the loop captured as a CUDA graph against the eager
  loop (goal >= 2x).

    python bench/bench_neumann.py [--device cuda] [--quick]
"""

import argparse
import datetime
import statistics
import time

import torch

from modalimmune.backend import unavailable_reason
from modalimmune.hypergrad import HessianOperator, capture_stream, hvp, neumann_solve
from modalimmune.ops import neumann_update_


def timed(fns, device, repeats, warmup=1):
    """Best seconds of each of ``fns`` over ``repeats`` interleaved rounds (the
    minimum and the interleaving keep other load on the machine out of the ratios)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def loop_times(op, v, iters, device):
    """(median time of a Neumann iteration, median time of its HVP), both read inside
    the same solve: an iteration is the interval between successive HVP starts.
    Measured side by side, the ratio is robust to other load on the machine."""
    starts, durations = [], []

    def timed_op(x):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = op(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        starts.append(start)
        durations.append(time.perf_counter() - start)
        return out

    # alpha given: no power iteration; tol tiny: exactly `iters` iterations
    neumann_solve(timed_op, v, damping=1e-3, alpha=1e-3, tol=1e-30, max_iter=iters)
    intervals = [b - a for a, b in zip(starts[:-1], starts[1:])]
    return statistics.median(intervals), statistics.median(durations[:-1])


def mlp(widths, device):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers).to(device)


def problem(widths, batch, device):
    """(loss_fn(*params), params) of a cross-entropy MLP on random data."""
    model = mlp(widths, device)
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    x = torch.randn(batch, widths[0], device=device)
    y = torch.randint(0, widths[-1], (batch,), device=device)

    def loss_fn(*ps):
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, dict(zip(names, ps)), (x,)), y)
    return loss_fn, params


def operator(loss_fn, params):
    leaves = [p.clone().requires_grad_() for p in params]
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(*leaves), leaves, create_graph=True)
    return HessianOperator(grads, leaves)


def eager_update(v, p, w, alpha, damping):
    """The unfused foreach sequence computing what neumann_update_ computes."""
    u = torch._foreach_add(w, v, alpha=damping)
    dot = torch.stack([torch.dot(a.flatten(), b.flatten()) for a, b in zip(v, u)]).sum()
    torch._foreach_add_(v, u, alpha=-alpha)
    torch._foreach_add_(p, v)
    return torch.stack(torch._foreach_norm(v)).square().sum(), dot


def bench_model(label, widths, batch, device, repeats, iters, rows):
    loss_fn, params = problem(widths, batch, device)
    numel = sum(p.numel() for p in params)
    op = operator(loss_fn, params)
    v = [torch.randn_like(p) for p in params]
    t_iter, t_hvp = loop_times(op, v, iters, device)
    t_db, t_fr = timed([lambda: hvp(loss_fn, params, v, mode="double_backward"),
                        lambda: hvp(loss_fn, params, v, mode="fwd_rev")], device, repeats)
    rows.append(f"| {label} | {numel / 1e6:.2f}M | {batch} | {t_hvp * 1e3:.2f} | {t_iter * 1e3:.2f} | "
                f"**{t_iter / t_hvp:.3f}** | {t_db * 1e3:.2f} | {t_fr * 1e3:.2f} | {t_fr / t_db:.2f} |")
    return params


def bench_update(label, params, device, repeats, rows):
    vs = [torch.randn_like(p) for p in params]
    ps = [torch.randn_like(p) for p in params]
    ws = [torch.randn_like(p) for p in params]
    numel = sum(p.numel() for p in params)
    alpha = torch.tensor(1e-3, dtype=torch.float64, device=device)
    # Triton is timed where it compiles (CUDA), not through the CPU interpreter
    backends = [b for b in ("torch", "cpp", "cuda", "triton")
                if not unavailable_reason(b, device) and (b != "triton" or device.type == "cuda")]
    fns = [lambda: eager_update(vs, ps, ws, 1e-3, 1e-3)]
    fns += [lambda b=b: neumann_update_(vs, ps, ws, alpha, damping=1e-3, backend=b) for b in backends]
    t_eager, *times = timed(fns, device, max(20, 4 * repeats))
    measured = dict(zip(backends, times))
    cells = []
    for backend in ("torch", "cpp", "cuda", "triton"):
        t = measured.get(backend)
        gbps = 5 * numel * vs[0].element_size() / t / 1e9 if t else 0
        cells.append(f"{t * 1e3:.3f} ({t_eager / t:.2f}x, {gbps:.0f} GB/s)" if t else "n/a")
    rows.append(f"| {label} | {numel / 1e6:.2f}M | {t_eager * 1e3:.3f} | " + " | ".join(cells) + " |")


def bench_capture(device, repeats, rows):
    loss_fn, params = problem([64, 128, 128, 10], 32, device)
    # the captured loop replays the HVP's autograd graph: build it on the capture stream
    stream = capture_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        op = operator(loss_fn, params)
    torch.cuda.current_stream(device).wait_stream(stream)
    v = [torch.randn_like(p) for p in params]
    iters = 200
    configs = {"eager, check every 1": dict(check_every=1), "eager, check every 10": dict(check_every=10),
               "captured, check every 10": dict(capture=True, check_every=10)}
    solves = [lambda kw=kw: neumann_solve(op, v, damping=1e-3, alpha=1e-3, tol=1e-30, max_iter=iters, **kw)
              for kw in configs.values()]
    results = {name: t / iters for name, t in zip(configs, timed(solves, device, repeats))}
    base = results["eager, check every 1"]
    for name, t in results.items():
        rows.append(f"| {name} | {t * 1e6:.1f} | {base / t:.2f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and only the ~1M model")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, iters = (3, 8) if args.quick else (5, 25)
    batch = 128
    models = [("MLP 1M", [512, 1024, 512, 10])]
    if not args.quick:
        models.append(("MLP 10M", [1024, 2048, 2048, 2048, 10]))

    print(f"# bench_neumann on {device} ({datetime.date.today()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)\n")
    rows = ["| model | params | batch | bare HVP ms | Neumann iter ms | iter / HVP (goal <= 1.1) | "
            "hvp() double_backward ms | hvp() fwd_rev ms | fwd_rev / double_backward |", "|" + "---|" * 9]
    update_rows = ["| model | params | eager foreach ms | torch | cpp | cuda | triton |", "|" + "---|" * 7]
    for label, widths in models:
        params = bench_model(label, widths, batch, device, repeats, iters, rows)
        bench_update(label, params, device, repeats, update_rows)
    print("\n".join(rows))
    print("\nFused update (ms; speed-up over eager; effective bandwidth of 5 vector passes):\n")
    print("\n".join(update_rows))
    if device.type == "cuda":
        capture_rows = ["| loop (MLP 64-128-128-10, batch 32) | us / iteration | vs eager check every 1 (goal >= 2x) |",
                        "|---|---|---|"]
        bench_capture(device, repeats, capture_rows)
        print("\nCUDA graph capture:\n")
        print("\n".join(capture_rows))


if __name__ == "__main__":
    main()
