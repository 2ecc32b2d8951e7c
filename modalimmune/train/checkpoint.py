"""Checkpoints: checksummed, written atomically, read without running code
(docs/benchmark.md, "Training"; docs/distributed.md, "Faults").

A file is a one-line header ``MODALIMMUNE-CKPT sha256=<hex> size=<bytes>``
followed by what ``torch.save`` wrote. It is written to a temporary file in
the same folder, fsynced and renamed, so a reader sees the old file or the
whole new one; with ``keep_previous`` the old one is first renamed to
``<name>.prev``. A reader checks the size and the checksum before
``torch.load(weights_only=True)``, so a truncated or corrupted file is
detected, and a checkpoint can hold tensors and plain containers, never code.
"""

import glob
import hashlib
import io
import os
import random
import tempfile
import warnings

import numpy as np
import torch

FORMAT = "modalimmune-checkpoint-1"
MAGIC = b"MODALIMMUNE-CKPT"
_HEADER_LIMIT = 200


def previous_path(path):
    return f"{path}.prev"


def _temp_prefix(path):
    return f".{os.path.basename(path)}.tmp-"


def save(path, state, keep_previous=False):
    """Writes ``state`` (plain containers of tensors and numbers) to ``path``;
    a reader sees either the old file or the whole new one. With ``keep_previous``
    the file it replaces stays as ``<path>.prev`` (the fallback of :func:`load_latest`)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(os.path.join(folder, glob.escape(_temp_prefix(path)) + "*")):
        os.unlink(stale)  # left by a writer that was killed
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    payload = buffer.getbuffer()
    header = b"%s sha256=%s size=%d\n" % (MAGIC, hashlib.sha256(payload).hexdigest().encode(), len(payload))
    handle, tmp = tempfile.mkstemp(dir=folder, prefix=_temp_prefix(path), suffix=".pt")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(header)
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        if keep_previous and os.path.exists(path):
            # a hard link, then a rename over .prev: ``path`` itself never goes missing
            link = f"{tmp}.prev"
            os.link(path, link)
            os.replace(link, previous_path(path))
        os.replace(tmp, path)
        _sync_folder(folder)
    except BaseException:
        for leftover in (tmp, f"{tmp}.prev"):
            if os.path.exists(leftover):
                os.unlink(leftover)
        raise


def _sync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _payload(path):
    """The torch.save bytes of ``path`` after the header's size and checksum are verified."""
    with open(path, "rb") as file:
        data = file.read()
    line, sep, payload = data.partition(b"\n")
    parts = line.split(b" ") if sep and len(line) < _HEADER_LIMIT else []
    if len(parts) != 3 or parts[0] != MAGIC or not parts[1].startswith(b"sha256=") or not parts[2].startswith(b"size="):
        raise ValueError(f"checkpoint: {path} is not a readable modalimmune checkpoint (no checksum header)")
    size = int(parts[2][5:]) if parts[2][5:].isdigit() else -1
    if size != len(payload):
        raise ValueError(f"checkpoint: {path} is not a readable modalimmune checkpoint "
                         f"(truncated: {len(payload)} of {size} bytes)")
    if hashlib.sha256(payload).hexdigest().encode() != parts[1][7:]:
        raise ValueError(f"checkpoint: {path} is not a readable modalimmune checkpoint (checksum mismatch: corrupted)")
    return payload


def load(path, required=()):
    """The state saved by :func:`save`; a clear ValueError when ``path`` is not one."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint: expected a path, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no such file {path}")
    try:
        payload = _payload(path)
    except OSError as error:
        raise ValueError(f"checkpoint: {path} cannot be read ({error.strerror or error})") from None
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several kinds for foreign files or pickled code
        raise ValueError(f"checkpoint: {path} is not a readable modalimmune checkpoint "
                         f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint: {path} is not a modalimmune checkpoint (format {FORMAT} expected)")
    missing = [key for key in required if key not in state]
    if missing:
        raise ValueError(f"checkpoint: {path} lacks {', '.join(missing)}")
    return state


def load_latest(path, required=()):
    """(state, the path it came from): ``path``, or with a warning ``<path>.prev``
    when ``path`` is missing, truncated or corrupted and the previous one is whole."""
    try:
        return load(path, required), path
    except (ValueError, FileNotFoundError) as error:
        previous = previous_path(path)
        if not os.path.isfile(previous):
            raise
        state = load(previous, required)
        warnings.warn(f"{error}; resuming from the previous checkpoint {previous}", RuntimeWarning, stacklevel=2)
        return state, previous


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
