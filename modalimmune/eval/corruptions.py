"""Per-modality corruptions at levels 0-0.9, MultiBench's families, and the accuracy
curve of one modality under one family (docs/corruptions.md).

Every corruption is a pure function of its input, its ``level`` in [0, 1) and a
``generator`` (a ``torch.Generator`` or an int seed): the input is never
modified, level 0 returns it unchanged, and the random draws do not depend on
the level, so that with the same seed a higher level corrupts a superset of
what a lower one does (docs/corruptions.md, "Levels").
"""

import itertools
import math
import re
import zlib

import torch

from ..checks import choice, fail, integer, number
from . import metrics

LEVELS = metrics.DROP_RATES
SEQUENCE_FAMILIES = ("noise", "step_drop", "span_drop")
VECTOR_FAMILIES = ("noise", "entry_drop", "entry_swap")
TEXT_FAMILIES = ("letter_swap", "typo", "word_omission")
# the text families run the encoder once per level on the split's texts: fewer levels, and the same
# draws for every run (seed and method), so that the corrupted texts' embeddings are cached once
TEXT_LEVELS = (0.0, 0.2, 0.5, 0.8)
TEXT_SEED = 0
_SHAPES = {2: "(B, d)", 3: "(B, T, d)"}
_KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


# ---- arguments --------------------------------------------------------------------------------------------------

def _level(level):
    return number("level", level, 0.0, 1.0, high_open=True)


def _generator(generator):
    """A ``torch.Generator`` as given, or a fresh CPU one seeded with an int."""
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        fail("generator", "a torch.Generator or an int seed", type(generator).__name__, TypeError)
    return torch.Generator().manual_seed(integer("generator", generator, 0))


def _features(x, ranks):
    """``x``, a floating tensor of one of the ``ranks``."""
    if not isinstance(x, torch.Tensor):
        fail("x", "a Tensor", type(x).__name__, TypeError)
    if not x.is_floating_point():
        fail("x", "a floating-point tensor", f"dtype {x.dtype}", TypeError)
    if x.ndim not in ranks:
        fail("x", f"a {' or '.join(_SHAPES[r] for r in ranks)} tensor", f"shape {tuple(x.shape)}")
    return x


def _real_steps(x, mask):
    """The ``(B, T)`` bool mask of real steps of a sequence ``x`` (all of them when ``mask`` is None)."""
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        fail("mask", "a bool Tensor", f"dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else
             type(mask).__name__, TypeError)
    if mask.shape != x.shape[:2]:
        fail("mask", f"shape {tuple(x.shape[:2])} (x's (B, T))", f"shape {tuple(mask.shape)}")
    return mask.to(x.device)


def _uniform(shape, generator, like):
    """Uniform draws in [0, 1) from ``generator`` on its device, moved to ``like``'s."""
    return torch.rand(shape, generator=generator, device=generator.device).to(like.device)


# ---- sequences (B, T, d) with a (B, T) mask, and vectors (B, d) ---------------------------------------------------

def implied_snr_db(level):
    """The SNR of :func:`gaussian_noise` at ``level``: ``-20 log10(level)`` dB (inf at 0)."""
    level = _level(level)
    return math.inf if level == 0 else -20 * math.log10(level)


def gaussian_noise(x, level, generator, *, mask=None):
    """White Gaussian noise of std ``level x RMS`` added to every real entry of ``x``
    (``(B, d)``, or ``(B, T, d)`` with ``mask``; RMS over the real entries of ``x``,
    so pass a whole split for a split-wide scale); padding is untouched."""
    x = _features(x, (2, 3))
    if x.ndim == 2 and mask is not None:
        fail("mask", "None for a (B, d) input", type(mask).__name__)
    real = _real_steps(x, mask).unsqueeze(-1).expand_as(x) if x.ndim == 3 else torch.ones_like(x, dtype=torch.bool)
    level, generator = _level(level), _generator(generator)
    if level == 0:  # x + 0 would turn -0.0 into 0.0
        return x.clone()
    rms = ((x.double().square() * real).sum() / real.sum().clamp_min(1)).sqrt()
    noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
    return torch.where(real, x + (noise * (level * rms)).to(x.dtype), x)


def step_drop(x, level, generator, *, mask=None):
    """Each real step of a sequence zeroed with probability ``level``, the mask kept
    (the model is not told, as in MultiBench); a sample that would lose every real
    step keeps the one with the largest draw, so at least one step stays."""
    x = _features(x, (3,))
    real, level, generator = _real_steps(x, mask), _level(level), _generator(generator)
    draws = _uniform(x.shape[:2], generator, x).masked_fill(~real, -1.0)
    dropped = real & (draws < level)
    emptied = real.any(1) & ~(real & ~dropped).any(1)
    dropped[emptied, draws[emptied].argmax(1)] = False
    return x.masked_fill(dropped.unsqueeze(-1), 0.0)


def span_drop(x, level, generator, *, mask=None):
    """One contiguous span of ``round(level x T_real)`` real steps zeroed per sample
    (halves rounded up, at most ``T_real - 1``), its start uniform among the
    positions where it fits; contiguous in the order of the real steps."""
    x = _features(x, (3,))
    real, level, generator = _real_steps(x, mask), _level(level), _generator(generator)
    real_count = real.sum(1)
    span = torch.minimum(torch.floor(level * real_count.double() + 0.5).long(), real_count - 1).clamp_min(0)
    start = torch.floor(_uniform(len(x), generator, x).double() * (real_count - span + 1)).long()
    rank = real.long().cumsum(1) - 1  # position of each real step among the real ones
    dropped = real & (rank >= start[:, None]) & (rank < (start + span)[:, None])
    return x.masked_fill(dropped.unsqueeze(-1), 0.0)


def entry_drop(x, level, generator):
    """Each entry of ``(B, d)`` vectors set to 0 with probability ``level``: the
    feature's missing value, its training mean after standardisation."""
    x = _features(x, (2,))
    level, generator = _level(level), _generator(generator)
    return x.masked_fill(_uniform(x.shape, generator, x) < level, 0.0)


def entry_swap(x, level, generator):
    """Each entry of ``(B, d)`` vectors replaced, with probability ``level``, by the
    same feature of another sample of ``x`` drawn uniformly (needs B >= 2)."""
    x = _features(x, (2,))
    if len(x) < 2:
        fail("x", "at least 2 samples (a swap takes an entry of another sample)", f"{len(x)}")
    level, generator = _level(level), _generator(generator)
    swapped = _uniform(x.shape, generator, x) < level
    offset = torch.randint(1, len(x), x.shape, generator=generator, device=generator.device).to(x.device)
    donor = (torch.arange(len(x), device=x.device)[:, None] + offset) % len(x)
    return torch.where(swapped, x.gather(0, donor), x)


# ---- raw text, before a frozen encoder ---------------------------------------------------------------------------

def _keyboard_neighbours():
    """``{key: its neighbours}`` on a QWERTY layout: a key's x position is its column
    plus half a key per row (the rows' stagger); its neighbours are the keys beside it
    in its row and those half a key away in the rows above and below."""
    place = {key: (row, col + row / 2) for row, keys in enumerate(_KEYBOARD_ROWS) for col, key in enumerate(keys)}
    return {key: "".join(other for other, (r, c) in place.items()
                         if (r == row and abs(c - x) == 1) or (abs(r - row) == 1 and abs(c - x) == 0.5))
            for key, (row, x) in place.items()}


KEYBOARD_NEIGHBOURS = _keyboard_neighbours()


def _swap_letters(word, position_draw, key_draw):
    pairs = [i for i in range(len(word) - 1) if word[i].isalpha() and word[i + 1].isalpha() and word[i] != word[i + 1]]
    if not pairs:
        return word
    i = pairs[int(position_draw * len(pairs))]
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def _typo(word, position_draw, key_draw):
    letters = [i for i, char in enumerate(word) if char.lower() in KEYBOARD_NEIGHBOURS]
    if not letters:
        return word
    i = letters[int(position_draw * len(letters))]
    neighbours = KEYBOARD_NEIGHBOURS[word[i].lower()]
    key = neighbours[int(key_draw * len(neighbours))]
    return word[:i] + (key.upper() if word[i].isupper() else key) + word[i + 1:]


def _omit(word, position_draw, key_draw):
    return None


def _texts(texts, name="texts"):
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        fail(name, "a list of str (None for a missing text)", type(texts).__name__, TypeError)
    for i, text in enumerate(texts):
        if text is not None and not isinstance(text, str):
            fail(f"{name}[{i}]", "a str or None", type(text).__name__, TypeError)
    return texts


def _corrupt_words(texts, level, generator, change):
    """Each word (a run of non-space characters) of each text passed, with probability
    ``level``, through ``change(word, position_draw, key_draw)`` (None: omitted; a text
    keeps at least one word, the one with the largest draw); spacing is kept."""
    texts, level, generator = _texts(texts), _level(level), _generator(generator)
    out = []
    for text in texts:
        spans = [m.span() for m in re.finditer(r"\S+", text)] if text is not None else []
        if not spans:
            out.append(text)
            continue
        draws = torch.rand(len(spans), 3, generator=generator, device=generator.device, dtype=torch.float64).tolist()
        words = [change(text[s:e], u[1], u[2]) if u[0] < level else text[s:e] for (s, e), u in zip(spans, draws)]
        if all(w is None for w in words):
            keep = max(range(len(spans)), key=lambda i: draws[i][0])
            words[keep] = text[slice(*spans[keep])]
        kept = [i for i, w in enumerate(words) if w is not None]
        # the leading and trailing spacing stay; each kept word after the first keeps the spacing before it
        inner = [text[spans[i - 1][1]:spans[i][0]] + words[i] for i in kept[1:]]
        out.append("".join([text[:spans[0][0]], words[kept[0]], *inner, text[spans[-1][1]:]]))
    return out


def letter_swap(texts, level, generator):
    """Two adjacent, different letters of a word swapped, each word with probability ``level``."""
    return _corrupt_words(texts, level, generator, _swap_letters)


def keyboard_typo(texts, level, generator):
    """One letter of a word replaced by a QWERTY neighbour (case kept), each word with probability ``level``."""
    return _corrupt_words(texts, level, generator, _typo)


def word_omission(texts, level, generator):
    """Each word omitted with probability ``level``; a text keeps at least one word."""
    return _corrupt_words(texts, level, generator, _omit)


TEXT_CORRUPTIONS = {"letter_swap": letter_swap, "typo": keyboard_typo, "word_omission": word_omission}


# ---- one modality of a batch, and the accuracy curve ------------------------------------------------------------

def families(batch, name):
    """The tensor families that apply to modality ``name`` of ``batch``."""
    return SEQUENCE_FAMILIES if name in batch.masks else VECTOR_FAMILIES


TENSOR_CORRUPTIONS = {"noise": gaussian_noise, "step_drop": step_drop, "span_drop": span_drop,
                      "entry_drop": entry_drop, "entry_swap": entry_swap}


def corrupt(x, family, level, generator, *, mask=None):
    """``x`` under ``family`` at ``level``: a sequence ``(B, T, d)`` with its ``mask``
    (None: every step real), or vectors ``(B, d)``."""
    if _features(x, (2, 3)).ndim == 2:
        if mask is not None:
            fail("mask", "None for a (B, d) input", type(mask).__name__)
        return TENSOR_CORRUPTIONS[choice("family", family, VECTOR_FAMILIES)](x, level, generator)
    return TENSOR_CORRUPTIONS[choice("family", family, SEQUENCE_FAMILIES)](x, level, generator, mask=mask)


def _curve_seed(seed, name, family):
    """One seed per (seed, modality, family), stable across processes (unlike ``hash``)."""
    return integer("seed", seed, 0) * 2 ** 32 + zlib.crc32(f"{name}/{family}".encode())


def _levels(levels):
    levels = [number(f"levels[{i}]", v, 0.0, 1.0, high_open=True) for i, v in enumerate(levels)]
    if not levels or levels[0] != 0 or any(b <= a for a, b in itertools.pairwise(levels)):
        fail("levels", "increasing levels in [0, 1) starting at 0", repr(levels))
    return levels


@torch.no_grad()
def corruption_curve(cache, name, family, *, levels=LEVELS, seed=0, reference=None, texts=None, encode_text=None):
    """Accuracy with modality ``name`` corrupted by ``family`` at each of ``levels``.

    ``cache``: the protocol's split cache (``model``, ``batches``, ``embeddings`` and
    ``metric`` and ``score(present_for, embeddings)``, as ``protocol._Cache``); the model in eval
    mode. Tensor families corrupt the split's whole ``name`` input at once (so the
    noise scale and swap donors are split-wide) and re-encode it batch by batch with
    the other modalities' embeddings taken from the cache. Text families need
    ``texts`` (per batch, the raw texts whose encoding is cached; None: a missing text) and
    ``encode_text(texts) -> tensor``, called once per level on the split's corrupted texts
    and shaped like the split's ``name`` input. Every
    level uses the same draws (the seed of ``(seed, name, family)``), so a higher
    level corrupts a superset. Returns ``{"family", "levels", METRIC, "relative_robustness",
    "effective_robustness"}`` (METRIC the cache's: ``accuracy``, or ``mae`` for regression; the
    effective robustness against ``reference``, another curve at the same levels, else None) and,
    for noise, ``"snr_db"`` per level (None at level 0).
    """
    model, batches = cache.model, cache.batches
    name = choice("name", name, tuple(model.modalities))
    family = choice("family", family, families(batches[0], name) + TEXT_FAMILIES)
    levels, curve_seed = _levels(levels), _curve_seed(seed, name, family)
    if family in TEXT_FAMILIES:
        if not callable(encode_text):
            fail("encode_text", "a function texts -> the modality's input", type(encode_text).__name__, TypeError)
        expected = f"a list of {len(batches)} lists of texts (one per batch)"
        if not isinstance(texts, (list, tuple)):
            fail("texts", expected, type(texts).__name__, TypeError)
        if len(texts) != len(batches):
            fail("texts", expected, f"{len(texts)}")
        for i, (batch_texts, batch) in enumerate(zip(texts, batches)):
            if len(_texts(batch_texts, f"texts[{i}]")) != len(batch):
                fail(f"texts[{i}]", f"{len(batch)} texts (the batch's size)", f"{len(batch_texts)}")
    everything = lambda n, i: torch.ones(n, len(model.modalities), dtype=torch.bool)  # noqa: E731
    scores = []
    for level in levels:
        if level == 0:  # the identity: the cached embeddings
            scores.append(cache.score(everything))
            continue
        generator = torch.Generator().manual_seed(curve_seed)
        if family in TEXT_FAMILIES:  # one generator over the batches in order: as corrupting each in turn
            corrupted = TEXT_CORRUPTIONS[family]([t for batch_texts in texts for t in batch_texts], level, generator)
            inputs = _encoded(encode_text, corrupted, batches, name).split([len(b) for b in batches])
        else:
            whole = torch.cat([b.inputs[name] for b in batches])
            mask = torch.cat([b.masks[name] for b in batches]) if name in batches[0].masks else None
            inputs = corrupt(whole, family, level, generator, mask=mask).split([len(b) for b in batches])
        embeddings = [{**emb, name: model.encode(b.replace(name, x))[name]}
                      for b, emb, x in zip(batches, cache.embeddings, inputs)]
        scores.append(cache.score(everything, embeddings))
    curve = {"family": family, "levels": levels, cache.metric: scores,
             **metrics.robustness(levels, scores, reference, cache.metric)}
    if family == "noise":
        curve["snr_db"] = [None if level == 0 else implied_snr_db(level) for level in levels]
    return curve


def _encoded(encode_text, texts, batches, name):
    """``encode_text(texts)``, checked to be shaped like the batches' ``name`` inputs together, on their device."""
    x = encode_text(texts)
    like = batches[0].inputs[name]
    shape = (sum(len(b) for b in batches), *like.shape[1:])
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
        got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        fail("encode_text", f"a tensor of shape {shape} (the split's texts)", got)
    return x.to(like.device, like.dtype)


def corruption_curves(cache, *, seed=0, levels=LEVELS, references=None, texts=None):
    """``{name: {family: corruption_curve(...)}}`` for every modality and tensor family and, for the
    modalities in ``texts`` (``{name: (per-batch texts, encode_text)}``), the text families at
    ``TEXT_LEVELS`` with the draws of ``TEXT_SEED`` (docs/corruptions.md, "Raw text");
    ``references`` (same layout, accuracies) gives the effective robustness."""
    references, texts = references or {}, texts or {}
    curves = {}
    for name in cache.model.modalities:
        reference = references.get(name, {})
        curves[name] = {family: corruption_curve(cache, name, family, levels=levels, seed=seed,
                                                 reference=reference.get(family))
                        for family in families(cache.batches[0], name)}
        if name in texts:
            batch_texts, encode_text = texts[name]
            curves[name].update({family: corruption_curve(cache, name, family, levels=TEXT_LEVELS, seed=TEXT_SEED,
                                                          reference=reference.get(family), texts=batch_texts,
                                                          encode_text=encode_text)
                                 for family in TEXT_FAMILIES})
    return curves
