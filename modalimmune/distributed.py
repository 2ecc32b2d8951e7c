"""Data-parallel helpers over ``torch.distributed`` (docs/distributed.md).

The process group is set up by :func:`init_from_env` from the variables
torchrun exports (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` ...);
we never open a socket ourselves. Every helper is a no-op in a single process,
so the same code runs with and without torchrun.

A data-parallel decision (the controller's estimates, the curvature statistics
that set tau, the hypergradient's inner products) must be computed from
values that are identical on every rank: reduce them with these helpers
before deciding.
"""

import contextlib
import importlib
import os

import torch
import torch.distributed as dist

from .checks import fail


def is_distributed():
    """Whether a process group with more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def rank():
    return dist.get_rank() if is_distributed() else 0


def is_main():
    """Rank 0 (or the only process): the one that writes checkpoints, metrics and reports."""
    return rank() == 0


def launched_by_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def require_one_process(name):
    """Refuses work that is not data-parallel (``name``, e.g. ``compare``) when torchrun started several
    processes: each of them would do all of it and write the same files."""
    if launched_by_torchrun():
        fail(name, "one process (it is not data-parallel: every rank would do all of it and write the same files)",
             f"WORLD_SIZE={os.environ['WORLD_SIZE']} from torchrun; run it without torchrun")


def init_from_env(device_type="cpu"):
    """Joins the process group torchrun describes (gloo on the CPU, nccl on CUDA);
    returns the device this rank trains on. Without torchrun's variables: nothing,
    and the device is left to the caller (None)."""
    if not launched_by_torchrun():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        # torch.distributed.nn.functional binds group.WORLD as its functions' default argument when it is
        # imported, and the first torch.optim optimizer imports it (through torch._dynamo). Imported after
        # init_process_group, it would hold the group for ever: destroy_process_group could not free the
        # backend, and at exit a surviving gloo thread can abort the process (docs/distributed.md, "Shutdown").
        # Imported now, its defaults are None: the world group, looked up at each call.
        importlib.import_module("torch.distributed.nn.functional")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                **({"device_id": device} if device.type == "cuda" else {}))
    return device


def shutdown(wait=True):
    """Leaves the process group. ``wait``: first a barrier, so that no rank exits while another (rank 0
    writing ``model.pt``) is still at work; pass False after an error, when another rank may never get there."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device_type="cpu"):
    """:func:`init_from_env` for the block (it yields the device), then :func:`shutdown`: after every rank
    finished the block, or at once when it raised."""
    device = init_from_env(device_type)
    try:
        yield device
    except BaseException:
        shutdown(wait=False)
        raise
    shutdown()


def barrier():
    if is_distributed():
        dist.barrier()


def _reduce(tensors, op, scale=None):
    """All-reduces a tensor or a list of tensors in place (one flat buffer per dtype
    and device, so one collective however many tensors); returns its argument."""
    single = isinstance(tensors, torch.Tensor)
    items = [tensors] if single else list(tensors)
    if not is_distributed() or not items:
        return tensors
    groups = {}
    for t in items:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=op)
        if scale is not None:
            flat.mul_(scale)
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t))
    return tensors


def all_reduce_sum(tensors):
    """Sums a tensor (or a list of tensors) over the ranks, in place."""
    return _reduce(tensors, dist.ReduceOp.SUM)


def all_reduce_mean(tensors):
    """Averages a tensor (or a list of tensors) over the ranks, in place."""
    return _reduce(tensors, dist.ReduceOp.SUM, 1.0 / world_size()) if is_distributed() else tensors


def all_reduce_max(tensors):
    return _reduce(tensors, dist.ReduceOp.MAX)


def sum_floats(values, device="cpu"):
    """A list of Python floats summed over the ranks (float64)."""
    if not is_distributed():
        return list(values)
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def shard_rows(count):
    """This rank's contiguous part of ``count`` rows, a slice (the parts of all ranks, in rank
    order, are the whole; sizes differ by at most one, the larger ones first)."""
    size, extra = divmod(count, world_size())
    start = rank() * size + min(rank(), extra)
    return slice(start, start + size + (rank() < extra))


def batch_mean(values, count, device="cpu"):
    """The whole batch's mean from this rank's batch mean ``values`` (a tensor) over
    ``count`` samples: the count-weighted mean over the ranks (``values`` itself in one
    process). Collectives run on ``device`` (a CUDA device under nccl)."""
    if not is_distributed():
        return values
    packed = torch.cat([values.detach().reshape(-1).double() * count,
                        torch.tensor([float(count)], dtype=torch.float64)]).to(device)
    all_reduce_sum(packed)
    return (packed[:-1] / packed[-1]).to(values.device, values.dtype).view_as(values)


def _gather(x):
    """(rows of every rank concatenated in rank order, every rank's row count). The
    collective moves equal shapes, so the parts are padded to the longest."""
    sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor(x.shape[0], device=x.device))
    sizes = [int(s) for s in sizes]
    wire = x.to(torch.uint8) if x.dtype == torch.bool else x  # gloo moves no bool
    padded = wire.new_zeros((max(sizes), *x.shape[1:]))
    padded[:x.shape[0]] = wire
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    rows = torch.cat([part[:n] for part, n in zip(parts, sizes)])
    return rows.to(x.dtype), sizes


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grad_scale):
        rows, ctx.sizes = _gather(x)
        ctx.grad_scale = grad_scale
        return rows

    @staticmethod
    def backward(ctx, grad):
        # The ranks' gradients are summed after each is multiplied by its grad_scale, so the
        # gradient of the combined loss for our rows is sum_s scale_s grad_s, divided by ours.
        start, count = sum(ctx.sizes[:rank()]), ctx.sizes[rank()]
        grad = grad.contiguous() * ctx.grad_scale
        dist.all_reduce(grad)
        ours = grad[start:start + count]
        return (ours / ctx.grad_scale if count else ours), None


def gather_rows(x, grad_scale=1.0):
    """The rows of ``x`` of every rank concatenated in rank order (the global batch): a
    batch-level statistic (an SVD over the samples, an effective rank) computed on the
    result is the one of the whole batch. Identity in one process.

    Differentiable when ``x`` requires grad: the backward gives this rank's rows the
    gradient of the loss the ranks train together, for ranks whose parameter gradients
    are multiplied by ``grad_scale`` (each its own) and then summed; e.g. a method that
    reduces its gradients with ``StepContext.reduce_mean`` passes ``ctx.rank_weight``
    (``StepContext.gather_rows`` does). Bool tensors are gathered too (without gradient)."""
    if not is_distributed():
        return x
    if x.requires_grad:
        return _GatherRows.apply(x, float(grad_scale))
    return _gather(x)[0]
