"""Trainer: AdamW with warm-up and cosine decay, gradient accumulation, bf16
autocast where supported, early stopping on validation accuracy, JSONL
metrics, atomic checksummed checkpoints and exact resume (docs/benchmark.md,
"Training"), data-parallel training under torchrun and skipping of
non-finite steps (docs/distributed.md)."""

import contextlib
import copy
import json
import math
import os
import random
import sys
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint, distributed
from ..data.missing import random_present
from .config import VAL_DROP, TrainConfig
from .methods import StepContext, build_method

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
METRICS = "metrics.jsonl"


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class NonFiniteError(RuntimeError):
    """Training met too many non-finite losses or gradients in a row."""


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


def _check_model(model, dataset):
    for name in ("encode", "fuse", "head", "parameters"):
        if not callable(getattr(model, name, None)):
            raise TypeError(f"model: expected a module with encode, fuse and head (DESIGN section 1); "
                            f"{type(model).__name__} has no {name}()")
    modalities = tuple(getattr(model, "modalities", ()))
    if modalities != tuple(dataset.modalities):
        raise ValueError(f"model: its modalities {list(modalities)} differ from the dataset's "
                         f"{list(dataset.modalities)}")


class Trainer:
    """Trains ``model`` on ``dataset`` with ``config`` (a TrainConfig, or its
    fields as keyword arguments). With ``out_dir``, writes ``metrics.jsonl``,
    and, when ``checkpoints``, ``checkpoint.pt`` and the final ``model.pt``."""

    def __init__(self, model, dataset, config=None, *, out_dir=None, checkpoints=True, **fields):
        if config is not None and fields:
            raise ValueError(f"config: give a TrainConfig or its fields, not both ({', '.join(fields)})")
        config = config if config is not None else TrainConfig(**fields)
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        _check_model(model, dataset)
        self.config, self.dataset, self.out_dir, self.checkpoints = config, dataset, out_dir, checkpoints
        self.method = build_method(config.method)
        self.device = resolve_device(config.device)
        self.bf16 = resolve_bf16(config.bf16, self.device)
        self.model = model.to(self.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        micro = math.ceil(dataset.split_size("train") / config.batch_size)
        self.steps_per_epoch = math.ceil(micro / config.grad_accum)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, config.warmup_fraction))
        self.state = {"epoch": 0, "batch": 0, "step": 0, "best_accuracy": -1.0, "best_epoch": -1,
                      "bad_epochs": 0, "done": False, "nonfinite_total": 0, "nonfinite_run": 0}
        self.best_model = None
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
        self.metrics = MetricsLog(os.path.join(out_dir, METRICS) if out_dir else None)
        self.method.setup(self.model, self)

    # -- pieces a method or a subclass may use ------------------------------------------------
    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def epoch_order(self, epoch):
        """The training order of ``epoch``: a function of the seed and the epoch only,
        so a resumed run sees the same batches."""
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        return torch.randperm(self.dataset.split_size("train"), generator=generator)

    @torch.no_grad()
    def validate(self):
        """Validation loss and accuracy with every modality; with ``config.select="robust"`` also the
        accuracy with random missing modalities (the same patterns every epoch) and ``val_score``,
        the figure that selects the model (docs/method_training.md, "Model selection")."""
        self.model.eval()
        model, robust = self.model, self.config.select == "robust"
        patterns = torch.Generator().manual_seed(self.config.split_seed + 65537) if robust else None
        correct, missing_correct, loss = 0, 0, 0.0
        for batch in self.dataset.batches("val", 512):
            batch = batch.to(self.device)
            with self.autocast():
                embeddings = model.encode(batch)  # once: the missing patterns reuse them
                logits = model.head(model.fuse(embeddings, model.all_present(batch), batch.masks)).float()
                if robust:
                    present = random_present(len(batch), len(self.dataset.modalities), VAL_DROP, patterns)
                    missing = model.head(model.fuse(embeddings, present.to(self.device), batch.masks)).float()
                    missing_correct += (missing.argmax(-1) == batch.labels).sum().item()
            loss += torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum").item()
            correct += (logits.argmax(-1) == batch.labels).sum().item()
        self.model.train()
        n = max(1, self.dataset.split_size("val"))
        val = {"val_loss": loss / n, "val_accuracy": correct / n}
        if robust:
            val.update(val_missing_accuracy=missing_correct / n, val_score=(correct + missing_correct) / (2 * n))
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
                                                   "config"))
        saved = TrainConfig.from_dict(state["config"])
        differs = [k for k in ("method", "seed", "batch_size", "grad_accum", "epochs")
                   if getattr(saved, k) != getattr(self.config, k)]
        if differs:
            raise ValueError(f"checkpoint: {path} was written with another {', '.join(differs)} "
                             f"({', '.join(f'{k}={getattr(saved, k)!r}' for k in differs)})")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state["method"])
        self.state = {"nonfinite_total": 0, "nonfinite_run": 0, **state["trainer"]}
        self.best_model = state["best_model"]
        ranks = state.get("rng_ranks") or [state["rng"]]
        if len(ranks) != distributed.world_size():
            warnings.warn(f"checkpoint: {path} was written by {len(ranks)} rank(s), this run has "
                          f"{distributed.world_size()}: training continues, but not exactly as it would have",
                          RuntimeWarning, stacklevel=2)
        checkpoint.set_rng_state(ranks[distributed.rank()] if len(ranks) == distributed.world_size() else ranks[0])
        self.metrics.truncate(state.get("metrics_bytes", self.metrics.size()))

    def export(self, path=None):
        """The final model (best validation weights) with what rebuilds it (rank 0 writes)."""
        from ..models import model_name

        if not distributed.is_main():
            return

        state = {"model": self.model.state_dict(), "model_name": model_name(self.model),
                 "model_options": dict(getattr(self.model, "config", {})),
                 "modalities": list(self.dataset.modalities), "num_classes": self.dataset.num_classes,
                 "dataset": self.dataset.name, "config": self.config.to_dict(),
                 "best_val_accuracy": self.state["best_accuracy"]}
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
            seed_everything(self.config.seed)
            self.metrics.reset()
        started = time.perf_counter()
        config, state = self.config, self.state
        bar = tqdm(total=self.total_steps, initial=state["step"], desc=config.method, unit="step",
                   disable=not config.progress or not sys.stderr.isatty(), leave=False)
        self.model.train()
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
                "best_val_accuracy": state["best_accuracy"], "best_epoch": state["best_epoch"],
                "stopped_early": state["done"] and state["epoch"] < config.epochs,
                "seconds": time.perf_counter() - started}

    def _run_epoch(self, bar, max_steps):
        config, state = self.config, self.state
        epoch = state["epoch"]
        chunks = list(torch.split(self.epoch_order(epoch), config.batch_size))
        index = self.dataset.indices("train")
        reduces = getattr(self.method, "reduces_gradients", False)
        while state["batch"] < len(chunks):
            group = chunks[state["batch"]:state["batch"] + config.grad_accum]
            self.optimizer.zero_grad(set_to_none=True)
            logs, weights = [], []
            for chunk in group:
                rows = distributed.shard_rows(len(chunk))  # this rank's part of the batch
                local = chunk[rows]
                weight = len(local) / len(chunk)  # its share of the batch mean
                ctx = StepContext(self.params, (1.0 if reduces else weight) / len(group), state["step"], epoch,
                                  config.epochs, config.rec_weight, rows=rows, global_rows=len(chunk))
                batch = self.dataset.batch(index[local]).to(self.device)
                with self.autocast():
                    logs.append(self.method.training_step(self.model, batch, ctx))
                weights.append(weight)
            finite_loss = all(math.isfinite(d["loss"]) for d in logs)
            self._apply_step(finite_loss, reduce=not reduces)
            state["batch"] += len(group)
            state["step"] += 1
            bar.update(1)
            if state["step"] % config.log_every == 0:
                keys = list(logs[0])
                means = distributed.sum_floats([sum(w * d[k] for w, d in zip(weights, logs)) / len(logs)
                                                for k in keys])
                record = dict(zip(keys, means), nonfinite_skipped=state["nonfinite_total"])
                self.metrics.write(event="step", step=state["step"], epoch=epoch,
                                   lr=self.scheduler.get_last_lr()[0], **record)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
            if state["nonfinite_run"] and state["nonfinite_run"] >= config.max_nonfinite_steps > 0:
                self._stop_nonfinite()
            if self._checkpoint_due():
                self.save_checkpoint()
            if max_steps is not None and state["step"] >= max_steps:
                return
        self._end_epoch()

    def _apply_step(self, finite_loss=True, reduce=True):
        """The one place gradients are combined across ranks and applied: sums the
        ranks' shares (``reduce``; a method with ``reduces_gradients`` did it already),
        clips, and steps, unless a loss or a gradient is not finite on some rank: then
        the step is skipped (parameters and optimizer untouched) and counted."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        for p, g in zip(self.params, grads):
            p.grad = g
        if reduce:
            distributed.all_reduce_sum(grads)
        flag = torch.tensor([0.0 if finite_loss else 1.0], device=self.device)
        distributed.all_reduce_max(flag)
        if self.config.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
        if flag.item() or not math.isfinite(norm.item()):
            self.optimizer.zero_grad(set_to_none=True)
            self.state["nonfinite_total"] += 1
            self.state["nonfinite_run"] += 1
        else:
            self.optimizer.step()
            self.state["nonfinite_run"] = 0
        self.scheduler.step()

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
        score = val.get("val_score", val["val_accuracy"])
        if score > state["best_accuracy"]:  # the best selection figure (config.select)
            state.update(best_accuracy=score, best_epoch=state["epoch"], bad_epochs=0)
            self.best_model = copy.deepcopy(self.model.state_dict())
        else:
            state["bad_epochs"] += 1
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

    state = checkpoint.load(path, ("model", "model_name", "model_options", "modalities", "num_classes"))
    if state["model_name"] is None:
        raise ValueError(f"checkpoint: {path} holds a user-defined model; rebuild it yourself, load "
                         "state['model'] and call modalimmune.evaluate")
    if list(state["modalities"]) != list(dataset.modalities) or state["num_classes"] != dataset.num_classes:
        raise ValueError(f"dataset: {dataset.name!r} has modalities {list(dataset.modalities)} and "
                         f"{dataset.num_classes} classes; the checkpoint {path} was trained on "
                         f"{list(state['modalities'])} with {state['num_classes']}")
    model = build_model(state["model_name"], dataset.spec, dataset.num_classes, **state["model_options"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ValueError(f"checkpoint: {path} does not fit the model it names ({str(error)[:200]})") from None
    return model, state
