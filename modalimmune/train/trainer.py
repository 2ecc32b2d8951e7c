"""Trainer: AdamW with warm-up and cosine decay, gradient accumulation, bf16
autocast where supported, model selection and early stopping on a robust validation score, JSONL
metrics, atomic checksummed checkpoints and exact resume (docs/benchmark.md,
"Training"), data-parallel training under torchrun and skipping of
non-finite steps (docs/distributed.md)."""

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm

from .. import distributed
from ..data.missing import missing_patterns
from ..data.user import as_data
from ..methods import MethodRunner, build_method
from . import checkpoint
from .config import VAL_PATTERNS, TrainConfig

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
METRICS = "metrics.jsonl"


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class NonFiniteError(RuntimeError):
    """Training met too many non-finite losses or gradients in a row."""


class Preempted(RuntimeError):
    """Training stopped at a step boundary on SIGTERM, after writing its checkpoint."""


PREEMPTED_EXIT_CODE = 75  # the CLI's exit status after a SIGTERM stop (EX_TEMPFAIL: run it again to resume)


@contextlib.contextmanager
def stop_on_sigterm(trainer):
    """While training: SIGTERM (what schedulers send before killing a job) asks the trainer to stop
    at the next optimizer-step boundary (``trainer._stop_requested``; after the last step it has no
    effect); outside the main thread, a no-op. The previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):
        trainer._stop_requested = True
    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def resolve_device(device):
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and distributed.is_distributed():
            return torch.device("cuda", torch.cuda.current_device())  # set by distributed.init_from_env
        return torch.device(device)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"config.device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("config.device: 'cuda' asked for, but no GPU is visible")
    return device


def resolve_bf16(mode, device):
    """Whether to autocast to bfloat16 ("auto": on CUDA devices that support it)."""
    supported = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    if mode == "on" and not supported:
        raise ValueError(f"config.bf16: 'on' but {device} does not support bfloat16 autocast")
    return mode == "on" or (mode == "auto" and device.type == "cuda" and supported)


def warmup_cosine(total_steps, warmup_fraction):
    warmup = max(1, round(warmup_fraction * total_steps)) if warmup_fraction > 0 else 0

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


class MetricsLog:
    """Append-only JSONL; on resume the records after the checkpoint are dropped
    so that the file equals the one of an uninterrupted run."""

    def __init__(self, path):
        self.path = path if distributed.is_main() else None  # rank 0 writes for everyone

    def write(self, **record):
        if self.path:
            with open(self.path, "a") as file:
                file.write(json.dumps(record) + "\n")

    def size(self):
        return os.path.getsize(self.path) if self.path and os.path.exists(self.path) else 0

    def truncate(self, size):
        """Back to the ``size`` bytes a checkpoint recorded (also drops a line cut by a kill)."""
        if self.path and os.path.exists(self.path):
            with open(self.path, "r+b") as file:
                file.truncate(size)

    def reset(self):
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)


class SplitCycle:
    """``next()`` of a split's batches, cycled: each pass over the split in a fresh order (a function
    of ``seed`` and the pass only; a stream: its own order), moved to ``device``. Its position is part
    of the checkpoint. The Trainer gives one over the validation split to its method
    (``MethodEnv.validation_batch``)."""

    def __init__(self, dataset, split, batch_size, seed, device):
        self.dataset, self.split, self.batch_size, self.seed, self.device = dataset, split, batch_size, seed, device
        self.cursor, self.passes, self._stream = 0, 0, None

    def __call__(self):
        if self.cursor >= self.dataset.split_size(self.split):
            self.cursor, self.passes, self._stream = 0, self.passes + 1, None
        if self.dataset.random_access:
            index = self.dataset.indices(self.split)
            order = torch.randperm(len(index), generator=torch.Generator().manual_seed(self.seed + self.passes))
            batch = self.dataset.batch(index[order[self.cursor:self.cursor + self.batch_size]])
        else:
            if self._stream is None:  # a new pass, or a restored one replayed up to the cursor
                self._stream = itertools.islice(self.dataset.batches(self.split, self.batch_size),
                                                self.cursor // self.batch_size, None)
            batch = next(self._stream)
        self.cursor += self.batch_size
        return batch.to(self.device)

    def state_dict(self):
        return {"cursor": self.cursor, "passes": self.passes}

    def load_state_dict(self, state):
        self.cursor, self.passes, self._stream = int(state["cursor"]), int(state["passes"]), None


def host_floats(records):
    """``records`` (dicts of 0-dim tensors and floats) with every value a Python float, read with one
    device-to-host copy per device: the one place a step's logs reach the host."""
    tensors = {}
    for i, record in enumerate(records):
        for key, value in record.items():
            if isinstance(value, torch.Tensor):
                tensors.setdefault(value.device, []).append((i, key, value))
    out = [dict(record) for record in records]
    for items in tensors.values():
        values = torch.stack([v.detach().reshape(()).double() for _, _, v in items]).tolist()
        for (i, key, _), value in zip(items, values):
            out[i][key] = value
    return out


def _hits(outputs, labels):
    """The correct predictions of a batch (class labels), or its summed absolute error (regression)."""
    if labels.is_floating_point():
        return (outputs.squeeze(-1) - labels).abs().sum()
    return (outputs.argmax(-1) == labels).sum()


MODEL_METHODS = ("encode", "fuse", "head", "all_present", "parameters")
# TrainConfig fields a resumed run may change (they do not change what is computed)
RESUMABLE_CHANGES = ("progress", "checkpoint_every", "log_every", "max_nonfinite_steps", "device")


def dataset_signature(dataset):
    """What identifies a dataset to a checkpoint: its name, modalities, classes and split sizes."""
    return {"name": dataset.name, "modalities": list(dataset.modalities), "task": dataset.task,
            "num_outputs": dataset.num_outputs,
            "splits": {split: dataset.split_size(split) for split in ("train", "val", "test")}}


def _check_model(model, dataset):
    for name in MODEL_METHODS:
        if not callable(getattr(model, name, None)):
            raise TypeError(f"model: expected a module with {', '.join(MODEL_METHODS[:-1])} "
                            f"(docs/benchmark.md, \"Models\"), got {type(model).__name__} without {name}()")
    modalities = tuple(getattr(model, "modalities", ()))
    if modalities != tuple(dataset.modalities):
        raise ValueError(f"model: its modalities {list(modalities)} differ from the dataset's "
                         f"{list(dataset.modalities)}")


class Trainer:
    """Trains ``model`` on ``dataset`` (MultimodalData, or what :func:`modalimmune.data.as_data` takes:
    a torch Dataset of dict samples, ``{"train", "val", "test"}`` iterables) with ``config`` (a TrainConfig, or its
    fields as keyword arguments). With ``out_dir``, writes ``metrics.jsonl``,
    and, when ``checkpoints``, ``checkpoint.pt`` and the final ``model.pt``; a
    fresh run refuses an ``out_dir`` that holds a run unless ``overwrite``."""

    def __init__(self, model, dataset, config=None, *, out_dir=None, checkpoints=True, overwrite=False, **fields):
        if config is not None and fields:
            raise ValueError(f"config: give a TrainConfig or its fields, not both ({', '.join(fields)})")
        config = config if config is not None else TrainConfig(**fields)
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        dataset = as_data(dataset)
        _check_model(model, dataset)
        self.config, self.dataset, self.out_dir, self.checkpoints = config, dataset, out_dir, checkpoints
        self.overwrite = overwrite
        self.method = build_method(config.method)
        self.method.check(dataset.modalities, dataset.task)
        self.device = resolve_device(config.device)
        self.bf16 = resolve_bf16(config.bf16, self.device)
        self.model = model.to(self.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.micro_batches_per_epoch = math.ceil(dataset.split_size("train") / config.batch_size)
        self.steps_per_epoch = math.ceil(self.micro_batches_per_epoch / config.grad_accum)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, config.warmup_fraction))
        self._stop_requested = False
        self.state = {"epoch": 0, "batch": 0, "step": 0, "best_score": -math.inf, "best_epoch": -1,
                      "bad_epochs": 0, "done": False, "nonfinite_total": 0, "nonfinite_run": 0}
        self.best_model = None
        self.validation_cycle = SplitCycle(dataset, "val", config.batch_size, config.seed + 32452843, self.device)
        self.runner = MethodRunner(self.method, self.model, self.params, seed=config.seed,
                                   validation_batch=self.validation_cycle, grad_accum=config.grad_accum,
                                   rec_weight=config.rec_weight, epochs=config.epochs, task=dataset.task)
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
        self.metrics = MetricsLog(os.path.join(out_dir, METRICS) if out_dir else None)

    # -- pieces a method or a subclass may use ------------------------------------------------
    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def epoch_order(self, epoch):
        """The training order of ``epoch``: a function of the seed and the epoch only,
        so a resumed run sees the same batches (data with random access)."""
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        return torch.randperm(self.dataset.split_size("train"), generator=generator)

    def micro_batches(self, epoch, start=0):
        """The micro-batches of ``epoch`` from the ``start``-th on, each as (this rank's rows of it, their
        slice, the micro-batch's size): chunks of ``epoch_order``, or for a stream its pass read from the
        beginning, the first ``start`` skipped (docs/benchmark.md, "Your own torch data")."""
        size = self.config.batch_size
        if not self.dataset.random_access:
            for batch in itertools.islice(self.dataset.batches("train", size), start, None):
                rows = distributed.shard_rows(len(batch))
                yield batch.select(rows), rows, len(batch)
            return
        index = self.dataset.indices("train")
        for chunk in torch.split(self.epoch_order(epoch), size)[start:]:
            rows = distributed.shard_rows(len(chunk))  # this rank's part of the batch
            yield self.dataset.batch(index[chunk[rows]]), rows, len(chunk)

    @torch.no_grad()
    def validate(self):
        """Validation loss and figure (accuracy; regression: the mean absolute error) with every
        modality, the figure's mean over the missing patterns (``config.select="robust"``) and
        ``val_score``, the figure that selects the model (higher is better: an error enters negated;
        docs/method_training.md, "Model selection"). A method trained on a fixed pattern (``method.keep``,
        the oracle ``erm[keep=...]``) is validated on that pattern alone."""
        self.model.eval()
        model, names = self.model, self.dataset.modalities
        regression = self.dataset.task == "regression"
        figure = "mae" if regression else "accuracy"
        kept = self.method.kept(names, self.device)
        patterns = (missing_patterns(len(names), VAL_PATTERNS) if self.config.select == "robust" and kept is None
                    else [])
        pattern_masks = torch.zeros(len(patterns), len(names), dtype=torch.bool, device=self.device)
        for i, pattern in enumerate(patterns):
            pattern_masks[i, list(pattern)] = True
        hits, loss = 0, 0.0  # correct predictions (or summed errors) with every modality, the loss
        pattern_hits, pattern_rows = (torch.zeros(len(patterns), dtype=torch.float64) for _ in range(2))
        for batch in self.dataset.batches("val", 512):
            batch = batch.to(self.device)
            with self.autocast():
                embeddings = model.encode(batch)  # once: the missing patterns reuse them
                present = model.all_present(batch)
                if kept is not None:
                    present = present & kept
                logits = model.head(model.fuse(embeddings, present, batch.masks)).float()
                for i, mask in enumerate(pattern_masks):
                    rows = (present | ~mask).all(1)  # natural missingness: the samples that have the whole pattern
                    outputs = model.head(model.fuse(embeddings, present & mask, batch.masks)).float()
                    pattern_hits[i] += _hits(outputs[rows], batch.labels[rows]).item()
                    pattern_rows[i] += rows.sum().item()
            if regression:
                loss += torch.nn.functional.mse_loss(logits.squeeze(-1), batch.labels, reduction="sum").item()
            else:
                loss += torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum").item()
            hits += _hits(logits, batch.labels).item()
        self.model.train()
        n = max(1, self.dataset.split_size("val"))
        val = {"val_loss": loss / n, f"val_{figure}": hits / n}
        score = hits / n
        scored = pattern_rows > 0  # a pattern no validation sample has is left out
        if scored.any():
            val[f"val_missing_{figure}"] = (pattern_hits[scored] / pattern_rows[scored]).mean().item()
            score = (score + val[f"val_missing_{figure}"]) / 2
        val["val_score"] = -score if regression else score
        return val

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self):
        """Everything a resume needs; under torchrun the RNG states of every rank
        (a collective: call it on every rank)."""
        rng = checkpoint.rng_state()
        ranks = [rng]
        if distributed.is_distributed():
            ranks = [None] * distributed.world_size()
            torch.distributed.all_gather_object(ranks, rng)
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "method": self.method.state_dict(),
                "validation_cycle": self.validation_cycle.state_dict(), "dataset": dataset_signature(self.dataset),
                "trainer": dict(self.state), "best_model": self.best_model, "rng": rng, "rng_ranks": ranks,
                "world_size": distributed.world_size(), "metrics_bytes": self.metrics.size(),
                "config": self.config.to_dict()}

    def save_checkpoint(self, path=None):
        """Rank 0 writes (atomically, keeping the previous file as ``.prev``); every rank must call it."""
        state = self.state_dict()
        if distributed.is_main():
            checkpoint.save(path or os.path.join(self.out_dir, CHECKPOINT), state, keep_previous=True)

    def load_checkpoint(self, path):
        """Loads ``path``, or its ``.prev`` (with a warning) when ``path`` is truncated or corrupted."""
        state, path = checkpoint.load_latest(path, ("model", "optimizer", "scheduler", "method", "trainer", "rng",
                                                   "config", "dataset", "validation_cycle"))
        self._check_resumable(path, state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state["method"])
        self.validation_cycle.load_state_dict(state["validation_cycle"])
        self.state = {"nonfinite_total": 0, "nonfinite_run": 0, **state["trainer"]}
        self.best_model = state["best_model"]
        ranks = state.get("rng_ranks") or [state["rng"]]
        if len(ranks) != distributed.world_size():
            warnings.warn(f"checkpoint: {path} was written by {len(ranks)} rank(s), this run has "
                          f"{distributed.world_size()}: training continues, but not exactly as it would have",
                          RuntimeWarning, stacklevel=2)
        checkpoint.set_rng_state(ranks[distributed.rank()] if len(ranks) == distributed.world_size() else ranks[0])
        self.metrics.truncate(state.get("metrics_bytes", self.metrics.size()))

    def _check_resumable(self, path, state):
        """Refuses (before anything is loaded) a checkpoint of another run: another dataset, a model
        whose weights do not fit, or another setting outside ``RESUMABLE_CHANGES``."""
        saved = TrainConfig.from_dict(state["config"])
        differs = [f.name for f in dataclasses.fields(TrainConfig)
                   if f.name not in RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(self.config, f.name)]
        if differs:
            raise ValueError(f"checkpoint: {path} was written with another {', '.join(differs)} "
                             f"({', '.join(f'{k}={getattr(saved, k)!r}' for k in differs)}; this run: "
                             f"{', '.join(f'{k}={getattr(self.config, k)!r}' for k in differs)}); a resumed run "
                             f"keeps its settings, except {', '.join(RESUMABLE_CHANGES)}")
        ours = dataset_signature(self.dataset)
        if state["dataset"] != ours:
            raise ValueError(f"checkpoint: {path} was trained on another dataset ({state['dataset']}); "
                             f"this run has {ours}")
        theirs = {k: tuple(v.shape) for k, v in state["model"].items()}
        mine = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        if theirs != mine:
            odd = sorted(set(theirs.items()) ^ set(mine.items()))[:3]
            raise ValueError(f"checkpoint: {path} holds the weights of another model (first differences, "
                             f"name and shape: {odd})")

    def export(self, path=None):
        """The final model (best validation weights) with what rebuilds it (rank 0 writes)."""
        from ..models import model_name

        if not distributed.is_main():
            return

        state = {"model": self.model.state_dict(), "model_name": model_name(self.model),
                 "model_options": dict(getattr(self.model, "config", {})),
                 "modalities": list(self.dataset.modalities), "num_classes": self.dataset.num_classes,
                 "dataset": self.dataset.name, "dataset_source": getattr(self.dataset, "source", None),
                 "config": self.config.to_dict(),
                 "task": self.dataset.task, "num_outputs": self.dataset.num_outputs,
                 "best_val_score": self.state["best_score"]}
        checkpoint.save(path or os.path.join(self.out_dir, MODEL), state)

    # -- the loop --------------------------------------------------------------------------------
    def fit(self, resume=False, max_steps=None):
        """Trains to the end (or early stop); returns a summary dict.

        ``resume``: True continues from ``out_dir/checkpoint.pt`` when it exists,
        a path continues from that checkpoint. ``max_steps`` stops after that many
        optimizer steps in total without finishing (as an interruption would)."""
        path = resume if isinstance(resume, (str, os.PathLike)) else (
            os.path.join(self.out_dir, CHECKPOINT) if resume and self.out_dir else None)
        if path and (os.path.exists(path) or os.path.exists(checkpoint.previous_path(path)) or resume is not True):
            self.load_checkpoint(path)
        else:
            self._check_fresh_out_dir(resume)
            seed_everything(self.config.seed)
            self.metrics.reset()
        self._stop_requested = False
        started = time.perf_counter()
        config, state = self.config, self.state
        bar = tqdm(total=self.total_steps, initial=state["step"], desc=config.method, unit="step",
                   disable=not config.progress or not sys.stderr.isatty(), leave=False)
        self.model.train()
        with stop_on_sigterm(self):  # also over the export: a late SIGTERM lets it finish
            try:
                while not state["done"] and state["epoch"] < config.epochs:
                    if max_steps is not None and state["step"] >= max_steps:
                        break
                    self._run_epoch(bar, max_steps)
            finally:
                bar.close()
            finished = state["done"] or state["epoch"] >= config.epochs
            if finished and self.best_model is not None:
                self.model.load_state_dict(self.best_model)
            if finished and self.out_dir and self.checkpoints:
                self.export()
        return {"finished": finished, "steps": state["step"], "epochs": state["epoch"],
                "best_val_score": state["best_score"], "best_epoch": state["best_epoch"],
                "stopped_early": state["done"] and state["epoch"] < config.epochs,
                "seconds": time.perf_counter() - started}

    def _check_fresh_out_dir(self, resume):
        """A fresh run (no ``resume``) never replaces the files of a run already in ``out_dir`` (a trainer
        that has trained continues where it stands)."""
        if resume or self.overwrite or not self.out_dir or self.state["step"] > 0:
            return
        held = [name for name in (CHECKPOINT, METRICS, MODEL) if os.path.exists(os.path.join(self.out_dir, name))]
        if held:
            raise FileExistsError(f"out_dir: expected a folder without a run, got {self.out_dir} holding "
                                  f"{', '.join(held)}; continue it with resume=True (--resume) or replace it "
                                  "with overwrite=True (--overwrite)")

    def _run_epoch(self, bar, max_steps):
        config, state = self.config, self.state
        epoch = state["epoch"]
        micro_batches = self.micro_batches(epoch, state["batch"])
        reduces = getattr(self.method, "reduces_gradients", False)
        while state["batch"] < self.micro_batches_per_epoch:
            group = min(config.grad_accum, self.micro_batches_per_epoch - state["batch"])
            self.optimizer.zero_grad(set_to_none=True)
            self.runner.step, self.runner.epoch = state["step"], epoch
            logs, weights = [], []
            for batch, rows, size in itertools.islice(micro_batches, group):
                weight = len(batch) / size  # its share of the batch mean
                batch = batch.to(self.device)
                with self.autocast():
                    logs.append(self.runner(batch, share=(1.0 if reduces else weight) / group, rows=rows,
                                            global_rows=size))
                weights.append(weight)
            stop = self._apply_step([d["loss"] for d in logs], reduce=not reduces)
            state["batch"] += group
            state["step"] += 1
            bar.update(1)
            if state["step"] % config.log_every == 0:
                logs, keys = host_floats(logs), list(logs[0])
                means = distributed.sum_floats([sum(w * d[k] for w, d in zip(weights, logs)) / len(logs)
                                                for k in keys])
                record = dict(zip(keys, means), nonfinite_skipped=state["nonfinite_total"])
                self.metrics.write(event="step", step=state["step"], epoch=epoch,
                                   lr=self.scheduler.get_last_lr()[0], **record)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
            if state["nonfinite_run"] and state["nonfinite_run"] >= config.max_nonfinite_steps > 0:
                self._stop_nonfinite()
            if self._checkpoint_due() or stop:
                self.save_checkpoint()
            if stop:
                self._stop_preempted()
            if max_steps is not None and state["step"] >= max_steps:
                return
        self._end_epoch()

    def _apply_step(self, losses, reduce=True):
        """The one place gradients are combined across ranks and applied: sums the
        ranks' shares (``reduce``; a method with ``reduces_gradients`` did it already),
        clips, and steps, unless a loss (of the micro-batches' ``losses``: tensors or floats)
        or a gradient is not finite on some rank: then the step is skipped (parameters and
        optimizer untouched) and counted. Its one host sync is that decision."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        for p, g in zip(self.params, grads):
            p.grad = g
        if reduce:
            distributed.all_reduce_sum(grads)
        losses = torch.stack([torch.as_tensor(loss).detach().to(self.device, torch.float64).reshape(())
                              for loss in losses])
        # (some loss not finite, a stop asked for): every rank decides alike
        flags = torch.stack([(~torch.isfinite(losses)).any().float(),
                             torch.tensor(float(self._stop_requested), device=self.device)])
        distributed.all_reduce_max(flags)
        if self.config.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
        skip, stop = torch.stack([(flags[0] > 0) | ~torch.isfinite(norm), flags[1] > 0]).tolist()
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            self.state["nonfinite_total"] += 1
            self.state["nonfinite_run"] += 1
        else:
            self.optimizer.step()
            self.state["nonfinite_run"] = 0
        self.runner.finish(not skip)
        self.scheduler.step()
        return stop

    def _stop_preempted(self):
        where = (f"{os.path.join(self.out_dir, CHECKPOINT)} holds it; continue with resume=True (--resume)"
                 if self.out_dir and self.checkpoints else "nothing was saved (no out_dir)")
        raise Preempted(f"training: stopped by SIGTERM after optimizer step {self.state['step']}; {where}")

    def _stop_nonfinite(self):
        """Saves the last good state (no skipped step touched the parameters) and stops."""
        state, where = self.state, ""
        if self.out_dir and self.checkpoints:
            self.save_checkpoint()
            where = f"; the last good state is in {os.path.join(self.out_dir, CHECKPOINT)}"
        raise NonFiniteError(f"training: {state['nonfinite_run']} optimizer steps in a row had a non-finite loss "
                             f"or gradient (up to step {state['step']}; {state['nonfinite_total']} skipped in all; "
                             f"config.max_nonfinite_steps={self.config.max_nonfinite_steps}){where}")

    def _checkpoint_due(self):
        every = self.config.checkpoint_every
        return bool(self.out_dir and self.checkpoints and every and self.state["step"] % every == 0)

    def _end_epoch(self):
        config, state = self.config, self.state
        val = self.validate()
        score = state["epoch"] if config.select == "last" else val["val_score"]
        # the best selection figure (config.select; higher is better) is kept, a tie keeping the later epoch;
        # patience counts the epochs without a strictly better one
        state["bad_epochs"] = 0 if score > state["best_score"] else state["bad_epochs"] + 1
        if score >= state["best_score"]:
            state.update(best_score=score, best_epoch=state["epoch"])
            self.best_model = copy.deepcopy(self.model.state_dict())
        self.metrics.write(event="val", step=state["step"], epoch=state["epoch"], **val)
        state["epoch"] += 1
        state["batch"] = 0
        state["done"] = bool(config.patience and state["bad_epochs"] >= config.patience)
        if self.out_dir and self.checkpoints and not config.checkpoint_every:
            self.save_checkpoint()


def load_model(path, dataset):
    """Rebuilds a ready model from a ``model.pt`` written by :meth:`Trainer.export`
    for ``dataset`` (which must have the same modalities)."""
    from ..models import build_model

    state = checkpoint.load(path, ("model", "model_name", "model_options", "modalities", "num_outputs", "task"))
    if state["model_name"] is None:
        raise ValueError(f"checkpoint: {path} holds a user-defined model; rebuild it yourself, load "
                         "state['model'] and call modalimmune.evaluate")
    ours = (list(dataset.modalities), dataset.task, dataset.num_outputs)
    theirs = (list(state["modalities"]), state["task"], state["num_outputs"])
    if ours != theirs:
        raise ValueError(f"dataset: {dataset.name!r} has (modalities, task, outputs) {ours}; the checkpoint "
                         f"{path} was trained on {theirs}")
    model = build_model(state["model_name"], dataset.spec, dataset.num_outputs, **state["model_options"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ValueError(f"checkpoint: {path} does not fit the model it names ({str(error)[:200]})") from None
    return model, state
