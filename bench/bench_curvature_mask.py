"""Benchmark of curvature_mask_ over a transformer's parameter list.

Per size: the fused op on each usable backend, the eager PyTorch reference,
torch.compile of the reference, and a plain copy of the same number of bytes,
all in one run. Reports ms, GB/s (bytes the op must move: g_c read and written,
g_d read, D read, plus D written and the probe read when probed) and the
fraction of the measured copy bandwidth.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import modalimmune  # noqa: E402
from modalimmune.ops import curvature_mask as cm  # noqa: E402


def transformer_shapes(total):
    """Parameter shapes of a pre-norm transformer (d_model d, 4d MLP) with about ``total`` elements."""
    d = 128 if total <= 2_000_000 else 1024
    vocab = 4 * d
    layer = [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]
    per_layer = sum(torch.Size(s).numel() for s in layer)
    layers = max(1, round((total - vocab * d) / per_layer))
    return [(vocab, d)] + layer * layers + [(d,), (d,)]


def make_lists(shapes, dtype, device):
    gc = [torch.randn(s, device=device).to(dtype) for s in shapes]
    gd = [torch.randn(s, device=device).to(dtype) for s in shapes]
    d = [torch.randn(s, device=device).abs_() for s in shapes]
    probe = [torch.randn(s, device=device) for s in shapes]
    return gc, gd, d, probe


def measure(shapes, dtype, device, backends, reference, repeats):
    """The table rows of one parameter list and gradient dtype (its tensors are freed on return)."""
    numel = sum(torch.Size(s).numel() for s in shapes)
    gc, gd, d, probe = make_lists(shapes, dtype, device)
    g_bytes = torch.empty((), dtype=dtype).element_size()
    moved = numel * (3 * g_bytes + 4 + 8)  # probed pass: D written, probe read
    copy_t = copy_time(moved, device, repeats)
    copy_bw = moved / copy_t
    candidates = {f"op ({b})": (lambda b=b: cm.curvature_mask_(gc, gd, d, probe, beta=0.9, tau=0.5, backend=b))
                  for b in backends}
    candidates["eager reference"] = lambda: cm.curvature_mask_reference(gc, gd, d, probe, 0.9, 0.5, False)
    candidates["torch.compile(reference)"] = lambda: reference(gc, gd, d, probe, 0.9, 0.5, False)
    times = {name: _common.median_time(fn, device, repeats) for name, fn in candidates.items()}
    eager, compiled = times["eager reference"], times["torch.compile(reference)"]
    return [[f"{numel / 1e6:.1f}M", str(dtype).removeprefix("torch."), name, f"{t * 1e3:.2f}",
             f"{moved / t / 1e9:.1f}", f"{moved / t / copy_bw:.2f}", f"{eager / t:.1f}x", f"{compiled / t:.2f}x"]
            for name, t in [("copy of the same bytes", copy_t)] + list(times.items())]


def copy_time(moved, device, repeats):
    """Time of a plain copy that moves ``moved`` bytes (read and written: half each way)."""
    src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return _common.median_time(lambda: dst.copy_(src), device, repeats)


def main():
    args = _common.parser(__doc__).parse_args()
    device = args.device
    if device == "cuda":
        sizes = [128_000_000] if args.quick else [16_000_000, 128_000_000]
        dtypes = [torch.float32, torch.bfloat16]
        backends = [b for b in ("cuda", "triton") if modalimmune.backend.unavailable_reason(b, device) is None]
    else:
        sizes = [1_000_000] if args.quick else [1_000_000, 16_000_000, 64_000_000]
        dtypes = [torch.float32]
        backends = [b for b in ("cpp",) if modalimmune.backend.unavailable_reason(b, device) is None]
    repeats = 3 if args.quick else 10
    reference = torch.compile(cm.curvature_mask_reference, dynamic=False)
    rows = []
    for size in sizes:
        shapes = transformer_shapes(size)
        for dtype in dtypes:
            rows += measure(shapes, dtype, device, backends, reference, repeats)
    header = ["params", "grad dtype", "implementation", "ms", "GB/s", "of copy BW", "vs eager", "vs compile"]
    table = _common.markdown_table(header, rows)
    print(table)
    goal = ("Goals: CPU >= 60% of copy bandwidth and >= 10x the eager reference at 16M+; "
            "GPU >= 85% of copy bandwidth at >= 100M parameters and >= 1.3x torch.compile of the reference.")
    out = args.out or _common.RESULTS / "kernels" / f"curvature_mask_{device}{'_quick' if args.quick else ''}.md"
    _common.write_report(out, f"curvature_mask_ benchmark ({device})", device, table,
                         "Bytes moved per element: 3 x grad bytes + 12 (probed pass). " + goal)


if __name__ == "__main__":
    main()
