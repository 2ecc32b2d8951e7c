"""Benchmark of lowrank_svd against torch.linalg.svd and torch.svd_lowrank (same q, niter).

For each shape: time (best of repeats, for every timed function alike: the least
disturbed run on a shared machine) and accuracy against torch.linalg.svd in float64:
per matrix, the largest relative error of its top-k singular values and the sine of
the largest principal angle between its computed and exact right subspaces, reported
as the mean over the batch (the max over the batch, an extreme value that moves by
several times between draws, as a secondary column for the singular values), plus
the floor time:

    floor = max(flops / mm_rate, bytes / copy_bandwidth)
    flops = 2 n d q * (2 + 2 niter) * batch   (A^T Omega, niter x A^T (A Z), A Z)
    bytes = |A| * (2 + niter)                 (one pass per product round; A^T (A Z) reads A once)

with the matrix-product rate (a large torch.mm in the same dtype) and the copy
bandwidth (a large clone) measured for each shape in the same interleaved rounds as
the decompositions (round r times every function once), so that a change of the
machine's load between shapes moves the floor and the measured time alike.
Reports floor / measured.

    python bench/bench_lowrank_svd.py [--device cuda] [--quick] [--backend auto]
"""

import argparse
import time

import torch

from modalimmune import ops

SHAPES = [(256, 128, 64, 8), (8, 2048, 512, 32), (64, 1024, 768, 16)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fns, device, repeats):
    """Best time of each function of the dict ``fns``, timed in interleaved rounds."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()
    sync(device)
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def limits(device, dtype):
    """The two physical limits as timed functions: ``{name: (fn, work)}`` with work in flops
    (a large square product) and bytes (read and write of a 512 MiB clone)."""
    size = 4096 if device.type == "cuda" else 2048
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    x = torch.empty(1 << 27, device=device, dtype=torch.float32)
    return {"mm": (lambda: a @ b, 2 * size ** 3), "copy": (x.clone, 2 * x.numel() * 4)}


def test_matrices(batch, n, d, device, dtype):
    """Harmonic spectrum 1/i with random singular vectors."""
    r = min(n, d)
    U = torch.linalg.qr(torch.randn(batch, n, r, device=device))[0]
    V = torch.linalg.qr(torch.randn(batch, d, r, device=device))[0]
    return ((U / torch.arange(1, r + 1, device=device)) @ V.mT).to(dtype)


def accuracy(S, V, exact_S, exact_V, k):
    """Per matrix: the worst relative error of the top-k singular values and the sine of
    the largest principal angle of the right subspace; returned as (mean err, max err,
    mean sine) over the batch."""
    err = ((S[..., :k].double() - exact_S[..., :k]).abs() / exact_S[..., :k]).amax(-1)
    basis = V[..., :k].double()
    ref = exact_V[..., :k]
    angle = torch.linalg.matrix_norm(basis - ref @ (ref.mT @ basis), ord=2)
    return err.mean().item(), err.max().item(), angle.mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no torch.linalg.svd on the large shapes")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--oversample", type=int, default=8)
    parser.add_argument("--niter", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float32
    repeats = 3 if args.quick else 7
    limit = limits(device, dtype)
    print(f"device {device}, backend {args.backend}, float32, oversample {args.oversample}, niter {args.niter}\n")
    print("| shape | k | lowrank_svd ms | svd_lowrank ms | linalg.svd ms | speed-up vs svd_lowrank | vs svd "
          "| GFLOP/s (mm) | GB/s (copy) | floor ms | floor/measured | rel err S, mean (ours / svd_lowrank) "
          "| rel err S, max (ours / svd_lowrank) | sin angle V, mean (ours / svd_lowrank) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for batch, n, d, k in SHAPES:
        q = min(k + args.oversample, n, d)
        A = test_matrices(batch, n, d, device, dtype)
        ours = lambda: ops.lowrank_svd(A, k, oversample=args.oversample, niter=args.niter, backend=args.backend)  # noqa: E731
        theirs = lambda: torch.svd_lowrank(A, q=q, niter=args.niter)  # noqa: E731
        best = timed({"ours": ours, "theirs": theirs, **{name: fn for name, (fn, _) in limit.items()}}, device,
                     repeats)
        t_ours, t_theirs = best["ours"], best["theirs"]
        rate, bandwidth = (limit[name][1] / best[name] for name in ("mm", "copy"))
        full_svd = not args.quick or batch * n * d <= 1 << 22
        svd = lambda: torch.linalg.svd(A, full_matrices=False)  # noqa: E731
        t_svd = timed({"svd": svd}, device, max(1, repeats // 3))["svd"] if full_svd else float("nan")
        flops = 2 * n * d * q * (2 + 2 * args.niter) * batch
        bytes_moved = A.numel() * A.element_size() * (2 + args.niter)
        floor = max(flops / rate, bytes_moved / bandwidth)
        Uf, Sf, Vh = torch.linalg.svd(A.double(), full_matrices=False)
        _, S, V = ours()
        _, St, Vt = theirs()
        err, err_max, angle = accuracy(S, V, Sf, Vh.mT, k)
        err_t, err_max_t, angle_t = accuracy(St, Vt, Sf, Vh.mT, k)
        print(f"| {batch}x({n}x{d}) | {k} | {t_ours * 1e3:.2f} | {t_theirs * 1e3:.2f} | {t_svd * 1e3:.1f} "
              f"| {t_theirs / t_ours:.2f}x | {t_svd / t_ours:.1f}x "
              f"| {rate / 1e9:.0f} | {bandwidth / 1e9:.1f} | {floor * 1e3:.2f} | {floor / t_ours:.2f} "
              f"| {err:.1e} / {err_t:.1e} | {err_max:.1e} / {err_max_t:.1e} | {angle:.1e} / {angle_t:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
