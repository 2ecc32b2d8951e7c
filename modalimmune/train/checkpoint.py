"""Checkpoints: written atomically (a temporary file in the same folder, then a
rename), read with ``torch.load(weights_only=True)`` so that a checkpoint can
only hold tensors and plain containers, never code."""

import os
import random
import tempfile

import numpy as np
import torch

FORMAT = "modalimmune-checkpoint-1"


def save(path, state):
    """Writes ``state`` (plain containers of tensors and numbers) to ``path``;
    a reader sees either the old file or the whole new one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save({"format": FORMAT, **state}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path, required=()):
    """The state saved by :func:`save`; a clear ValueError when ``path`` is not one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no such file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several kinds for truncated or foreign files
        raise ValueError(f"checkpoint: {path} is not a readable modalimmune checkpoint "
                         f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint: {path} is not a modalimmune checkpoint (format {FORMAT} expected)")
    missing = [key for key in required if key not in state]
    if missing:
        raise ValueError(f"checkpoint: {path} lacks {', '.join(missing)}")
    return state


def rng_state():
    """torch, CUDA, numpy and Python RNG states as checkpointable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
