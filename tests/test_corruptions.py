"""Corruption families (docs/corruptions.md): identity at level 0, measured rates against the level within a
binomial bound, structured drop's span, determinism, monotone laws, bad input, and the accuracy curve."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_data import single_thread, tiny_dataset  # noqa: F401 (autouse fixture)
from test_eval import Oracle

from modalimmune.data import MultimodalDataset
from modalimmune.eval import corruptions as c
from modalimmune.eval import metrics
from modalimmune.eval.protocol import _Cache
from modalimmune.models import build_model

LEVELS = c.LEVELS[1:]
SEQUENCE = {"noise": c.gaussian_noise, "step_drop": c.step_drop, "span_drop": c.span_drop}
VECTOR = {"noise": c.gaussian_noise, "entry_drop": c.entry_drop, "entry_swap": c.entry_swap}
TEXT = {"letter_swap": c.letter_swap, "typo": c.keyboard_typo, "word_omission": c.word_omission}


def seed():
    """A seed from the test's torch seed (conftest), so MODALIMMUNE_TEST_SEED replays a failure."""
    return int(torch.randint(2 ** 31, ()))


def within_binomial(measured, p, n):
    """``measured`` (a fraction of ``n`` Bernoulli(p) trials, p possibly an exact mean) is within 5 sigma of ``p``."""
    assert abs(measured - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12, (measured, p, n)


def sequences(batch=64, steps=40, dim=3, short=2):
    """Nonzero features (a zeroed step is visible) with lengths in [short, steps] and zero padding."""
    x = torch.randn(batch, steps, dim).abs() + 0.1
    x = x * torch.where(torch.rand(batch, steps, dim) < 0.5, -1.0, 1.0)
    lengths = torch.randint(short, steps + 1, (batch,))
    mask = torch.arange(steps) < lengths[:, None]
    return x * mask[..., None], mask


def bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def words(n=40, length=6):
    """Random lower-case words of ``length`` letters, each with at least two different adjacent letters."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    while len(out) < n:
        word = "".join(letters[i] for i in torch.randint(26, (length,)).tolist())
        out += [word] * any(a != b for a, b in itertools.pairwise(word))
    return out


# ---- level 0 and the input -----------------------------------------------------------------------------------------

def test_level_zero_is_the_identity_and_no_level_modifies_the_input():
    x, mask = sequences(8, 10)
    x[:, 0, 0] = -0.0  # x + 0 would flip these to 0.0 (wherever the noise drawn is positive)
    v = torch.randn(8, 5)
    v[:, 0] = -0.0
    texts = ["  Hello,  wörld\tfoo bar ", None, "", "x", "über cool"]
    for level in (0.0,) + LEVELS:
        before = [x.clone(), mask.clone(), v.clone(), list(texts)]
        for fn in SEQUENCE.values():
            out = fn(x, level, 3, mask=mask)
            assert out.shape == x.shape and out.dtype == x.dtype
            assert level > 0 or torch.equal(bits(out), bits(x))
        for fn in VECTOR.values():
            out = fn(v, level, 3)
            assert level > 0 or torch.equal(bits(out), bits(v))
        for fn in TEXT.values():
            out = fn(texts, level, 3)
            assert out is not texts and out[1] is None and out[2] == ""
            assert level > 0 or out == texts
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(before[:3], [x, mask, v])) and before[3] == texts


# ---- measured rates against the level ------------------------------------------------------------------------------

@pytest.mark.parametrize("level", LEVELS)
def test_noise_snr_matches_the_level(level):
    x, mask = sequences(96, 50, 8)
    noisy = c.gaussian_noise(x, level, seed(), mask=mask)
    assert torch.equal(noisy[~mask], x[~mask])  # padding untouched
    real = mask[..., None].expand_as(x)
    signal, noise = x[real].double(), (noisy - x)[real].double()
    # mean(noise^2) / (level^2 mean(x^2)) averages N unit chi-square(1) draws: relative std sqrt(2 / N)
    bound = 5 * math.sqrt(2 / signal.numel())
    ratio = noise.square().mean() / (level ** 2 * signal.square().mean())
    assert abs(ratio.item() - 1) <= bound
    measured_snr = 10 * math.log10(signal.square().mean() / noise.square().mean())  # the same bound, in dB
    assert measured_snr == pytest.approx(c.implied_snr_db(level), abs=-10 * math.log10(1 - bound))
    vectors = torch.randn(3000, 10) * 3
    noise = (c.gaussian_noise(vectors, level, seed()) - vectors).double()
    assert abs((noise.square().mean() / (level ** 2 * vectors.double().square().mean())).item() - 1) <= 5 * math.sqrt(
        2 / noise.numel())


def test_implied_snr():
    assert c.implied_snr_db(0) == math.inf
    assert c.implied_snr_db(0.1) == pytest.approx(20.0) and c.implied_snr_db(0.5) == pytest.approx(6.0206, abs=1e-4)


@pytest.mark.parametrize("level", LEVELS)
def test_step_drop_fraction_matches_the_level(level):
    x, mask = sequences(200, 40, 2, short=3)
    out = c.step_drop(x, level, seed(), mask=mask)
    dropped = (out == 0).all(-1) & mask
    assert torch.equal(out[~dropped], x[~dropped]) and (dropped <= mask).all()
    assert ((mask & ~dropped).sum(1) >= 1).all()  # at least one step kept
    lengths = mask.sum(1).double()
    # each real step dropped with probability level, except that a sample losing all T keeps one
    expected = ((level * lengths - level ** lengths).sum() / lengths.sum()).item()
    within_binomial(dropped.sum().item() / mask.sum().item(), expected, mask.sum().item())


@pytest.mark.parametrize("level", (0.0,) + LEVELS)
def test_span_drop_removes_one_span_of_the_right_length_inside_the_real_steps(level):
    x, mask = sequences(300, 12, 2, short=1)
    out = c.span_drop(x, level, seed(), mask=mask)
    dropped = (out == 0).all(-1) & mask
    assert torch.equal(out[~dropped], x[~dropped])  # padding and the other real steps untouched
    for row, length in zip(dropped, mask.sum(1).tolist()):
        span = min(math.floor(level * length + 0.5), length - 1)
        where = row.nonzero().flatten().tolist()
        assert where == list(range(where[0], where[0] + span)) if span else not where


def test_span_drop_is_contiguous_among_the_real_steps_of_a_mask_with_holes():
    mask = torch.tensor([[True, False, True, True, False, True, False]]).expand(50, -1)
    x = torch.randn(50, 7, 2).abs() + 0.1
    out = c.span_drop(x, 0.5, seed(), mask=mask)  # 4 real steps: a span of 2 of them
    real = torch.tensor([0, 2, 3, 5])
    for row in (out == 0).all(-1):
        assert not row[~mask[0]].any()
        ranks = row[real].nonzero().flatten().tolist()
        assert len(ranks) == 2 and ranks[1] == ranks[0] + 1


def test_span_start_is_uniform_over_the_places_where_it_fits():
    x = torch.randn(4000, 10, 1).abs() + 0.1
    out = c.span_drop(x, 0.3, seed())  # no mask: every step real; spans of 3, 8 places
    starts = (out == 0).all(-1).int().argmax(1)
    assert ((out == 0).all(-1).sum(1) == 3).all()
    for place in range(8):
        within_binomial((starts == place).double().mean().item(), 1 / 8, len(x))


@pytest.mark.parametrize("level", LEVELS)
def test_entry_drop_and_swap_fractions_match_the_level(level):
    x = torch.randn(300, 20)
    out = c.entry_drop(x, level, seed())
    dropped = out != x
    assert (out[dropped] == 0).all()
    within_binomial(dropped.double().mean().item(), level, x.numel())
    swapped = c.entry_swap(x, level, seed())
    changed = swapped != x
    within_binomial(changed.double().mean().item(), level, x.numel())
    # a swapped entry is the same feature of another sample
    rows, cols = changed.nonzero(as_tuple=True)
    same = x[:, cols].T == swapped[rows, cols][:, None]
    assert same.any(1).all() and not same[torch.arange(len(rows)), rows].any()


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("family", TEXT)
def test_text_changed_word_fraction_matches_the_level(family, level):
    texts = [" ".join(words(30)) for _ in range(60)]
    out = TEXT[family](texts, level, seed())
    n = 30 * len(texts)
    if family == "word_omission":
        kept = sum(len(t.split()) for t in out)
        assert all(t.split() for t in out)
        within_binomial(1 - kept / n, level - level ** 30 / 30, n)
        return
    changed = 0
    for before, after in zip(texts, out):
        for a, b in zip(before.split(" "), after.split(" ")):
            diff = [i for i in range(len(a)) if a[i] != b[i]]
            if diff and family == "letter_swap":
                i = diff[0]
                assert diff == [i, i + 1] and b == a[:i] + a[i + 1] + a[i] + a[i + 2:]
            if diff and family == "typo":
                assert len(diff) == 1 and b[diff[0]] in c.KEYBOARD_NEIGHBOURS[a[diff[0]]]
            changed += bool(diff)
    within_binomial(changed / n, level, n)


def test_text_keeps_spacing_case_and_ineligible_words():
    text = "  The CAT\tsat,  on  a mat.\n"
    for fn in (c.letter_swap, c.keyboard_typo):
        out = fn([text], 0.99, 5)[0]
        assert [len(w) for w in out.split()] == [len(w) for w in text.split()]
        assert [i for i, ch in enumerate(out) if ch.isspace()] == [i for i, ch in enumerate(text) if ch.isspace()]
    assert c.letter_swap(["a oo ... ?!"], 0.99, 0) == ["a oo ... ?!"]  # no two different adjacent letters
    assert c.keyboard_typo(["... 123 é"], 0.99, 0) == ["... 123 é"]  # no key of the layout
    assert c.keyboard_typo(["QQQQ"], 0.99, 0)[0] in ("WQQQ", "AQQQ", "QWQQ", "QAQQ", "QQWQ", "QQAQ", "QQQW", "QQQA")
    omitted = c.word_omission(["  one two\tthree  "], 0.99, 0)[0]
    assert omitted.startswith("  ") and omitted.endswith("  ") and len(omitted.split()) == 1
    assert omitted.strip() in ("one", "two", "three")


def test_keyboard_neighbours_are_symmetric_and_local():
    assert set(c.KEYBOARD_NEIGHBOURS) == set("abcdefghijklmnopqrstuvwxyz")
    for key, neighbours in c.KEYBOARD_NEIGHBOURS.items():
        assert 2 <= len(neighbours) <= 6 and key not in neighbours
        assert all(key in c.KEYBOARD_NEIGHBOURS[n] for n in neighbours)
    assert set(c.KEYBOARD_NEIGHBOURS["s"]) == set("awedxz") and set(c.KEYBOARD_NEIGHBOURS["q"]) == set("wa")


# ---- determinism and monotone laws ---------------------------------------------------------------------------------

def test_determinism_by_seed_and_generator():
    x, mask = sequences(16, 10)
    v = torch.randn(16, 6)
    texts = [" ".join(words(10)) for _ in range(5)]
    calls = [lambda g, f=f: f(x, 0.4, g, mask=mask) for f in SEQUENCE.values()]
    calls += [lambda g, f=f: f(v, 0.4, g) for f in VECTOR.values()]
    calls += [lambda g, f=f: f(texts, 0.4, g) for f in TEXT.values()]
    for call in calls:
        first = call(11)
        same = lambda a, b: torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b  # noqa: E731
        assert same(first, call(11)) and same(first, call(torch.Generator().manual_seed(11)))
        assert not same(first, call(12))


@settings(max_examples=30, deadline=None)
@given(low=st.floats(0, 0.99), high=st.floats(0, 0.99), seed=st.integers(0, 2 ** 31))
def test_a_higher_level_never_keeps_more_of_the_signal(low, high, seed):
    """Same seed, levels a <= b: b corrupts a superset of what a does, with the same values."""
    low, high = sorted((low, high))
    torch.manual_seed(seed)
    x, mask = sequences(6, 9, 2, short=1)
    v = torch.randn(7, 5)
    for fn in (c.step_drop, c.span_drop):
        a, b = fn(x, low, seed, mask=mask), fn(x, high, seed, mask=mask)
        kept_a, kept_b = (a != 0).all(-1), (b != 0).all(-1)
        if fn is c.step_drop:
            assert (kept_b <= kept_a).all()
        assert (kept_b.sum(1) <= kept_a.sum(1)).all() and (kept_b.sum(1) >= mask.sum(1).clamp_max(1)).all()
    noise_a, noise_b = (c.gaussian_noise(x, low, seed, mask=mask) - x), (c.gaussian_noise(x, high, seed, mask=mask) - x)
    assert (noise_a.abs() <= noise_b.abs() * (1 + 1e-5) + 1e-6).all()
    for fn in (c.entry_drop, c.entry_swap):
        a, b = fn(v, low, seed), fn(v, high, seed)
        assert ((a != v) <= (b != v)).all() and torch.equal(a[a != v], b[a != v])
    texts = [" ".join(words(8, 4)), "one two"]
    for fn in (c.letter_swap, c.keyboard_typo):
        for before, a, b in zip(texts, fn(texts, low, seed), fn(texts, high, seed)):
            for w, wa, wb in zip(before.split(), a.split(), b.split()):
                assert wa == w or wa == wb
    for a, b in zip(c.word_omission(texts, low, seed), c.word_omission(texts, high, seed)):
        remaining = iter(a.split())
        assert all(w in remaining for w in b.split())  # b's words are a subsequence of a's


# ---- bad input -----------------------------------------------------------------------------------------------------

def test_bad_input_names_the_argument_and_leaves_the_input_alone():
    x, mask = sequences(4, 5)
    v = torch.randn(4, 3)
    saved = x.clone(), mask.clone(), v.clone()
    for level, error in ((-0.1, ValueError), (1.0, ValueError), (float("nan"), ValueError), ("0.5", TypeError),
                         (True, TypeError)):
        for call in (lambda lv: c.step_drop(x, lv, 0, mask=mask), lambda lv: c.entry_swap(v, lv, 0),
                     lambda lv: c.gaussian_noise(v, lv, 0), lambda lv: c.word_omission(["a b"], lv, 0)):
            with pytest.raises(error, match=r"^level: expected"):
                call(level)
    with pytest.raises(ValueError, match=r"^x: expected a \(B, T, d\) tensor, got shape \(4, 3\)"):
        c.span_drop(v, 0.5, 0)
    with pytest.raises(ValueError, match=r"^x: expected a \(B, d\) tensor, got shape \(4, 5, 3\)"):
        c.entry_drop(x, 0.5, 0)
    with pytest.raises(ValueError, match=r"^x: expected a \(B, d\) or \(B, T, d\) tensor"):
        c.gaussian_noise(v[0], 0.5, 0)
    with pytest.raises(TypeError, match=r"^x: expected a floating-point tensor"):
        c.entry_drop(v.long(), 0.5, 0)
    with pytest.raises(TypeError, match=r"^x: expected a Tensor, got list"):
        c.entry_drop([[1.0]], 0.5, 0)
    with pytest.raises(ValueError, match=r"^mask: expected shape \(4, 5\)"):
        c.step_drop(x, 0.5, 0, mask=mask[:, :4])
    with pytest.raises(TypeError, match=r"^mask: expected a bool Tensor"):
        c.span_drop(x, 0.5, 0, mask=mask.float())
    with pytest.raises(ValueError, match=r"^mask: expected None for a \(B, d\) input"):
        c.gaussian_noise(v, 0.5, 0, mask=mask)
    with pytest.raises(ValueError, match=r"^x: expected at least 2 samples"):
        c.entry_swap(v[:1], 0.5, 0)
    with pytest.raises(TypeError, match=r"^generator: expected a torch.Generator or an int seed, got float"):
        c.entry_drop(v, 0.5, 1.5)
    with pytest.raises(ValueError, match=r"^generator: expected an int >= 0"):
        c.entry_drop(v, 0.5, -1)
    with pytest.raises(TypeError, match=r"^texts\[1\]: expected a str or None, got int"):
        c.letter_swap(["ok", 3], 0.5, 0)
    with pytest.raises(TypeError, match=r"^texts: expected a list of str"):
        c.keyboard_typo("not a list", 0.5, 0)
    with pytest.raises(ValueError, match=r"^family: expected one of 'noise', 'entry_drop', 'entry_swap'"):
        c.corrupt(v, "step_drop", 0.5, 0)
    with pytest.raises(ValueError, match=r"^family: expected one of 'noise', 'step_drop', 'span_drop'"):
        c.corrupt(x, "entry_swap", 0.5, 0, mask=mask)
    assert all(torch.equal(a, b) for a, b in zip(saved, (x, mask, v)))


# ---- the accuracy curve ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_hot_data():
    """``a`` a one-hot of the label (``Oracle`` reads it), ``b`` and ``c`` noise; 400 test samples."""
    y = torch.arange(2000) % 2
    return MultimodalDataset({"a": torch.eye(2)[y], "b": torch.randn(2000, 3), "c": torch.randn(2000, 1)}, y,
                             standardize=False)


def test_curve_on_a_known_model(one_hot_data):
    cache = _Cache(Oracle().eval(), one_hot_data, "test", 128, "cpu")
    ones = (torch.cat([b.labels for b in cache.batches]) == 1).double().mean().item()
    n = len(torch.cat([b.labels for b in cache.batches]))
    drop = c.corruption_curve(cache, "a", "entry_drop", seed=seed())
    assert drop["levels"] == list(c.LEVELS) and drop["accuracy"][0] == 1.0
    # a dropped 1 of class 1 leaves zeros, which Oracle reads as class 0
    for level, accuracy in zip(drop["levels"], drop["accuracy"]):
        within_binomial(1 - accuracy, level * ones, n)
    assert drop["relative_robustness"] == pytest.approx(metrics.relative_robustness(c.LEVELS, drop["accuracy"]))
    assert drop["effective_robustness"] is None and "snr_db" not in drop
    again = c.corruption_curve(cache, "a", "entry_drop", seed=3, reference=drop["accuracy"])
    assert again == c.corruption_curve(cache, "a", "entry_drop", seed=3, reference=drop["accuracy"])
    assert again["effective_robustness"] == metrics.effective_robustness(again["accuracy"], drop["accuracy"])
    itself = c.corruption_curve(cache, "a", "entry_drop", seed=3, reference=again["accuracy"])
    assert itself["effective_robustness"] == 0
    ignored = c.corruption_curve(cache, "b", "entry_swap")
    assert ignored["accuracy"] == [1.0] * 10 and ignored["relative_robustness"] == pytest.approx(0.9)
    noise = c.corruption_curve(cache, "a", "noise")
    assert noise["snr_db"][0] is None and noise["snr_db"][1] == pytest.approx(20.0)
    curves = c.corruption_curves(cache, seed=3, references={"a": {"entry_drop": drop["accuracy"]}})
    assert set(curves) == {"a", "b", "c"} and all(set(f) == set(c.VECTOR_FAMILIES) for f in curves.values())
    assert curves["a"]["entry_drop"] == again and curves["b"]["noise"]["effective_robustness"] is None


def test_curve_on_raw_text_before_a_frozen_encoder(one_hot_data):
    """``a`` is the frozen encoding of "... yes" (class 1) or "... no" (class 0); losing "yes" reads as class 0."""
    index = one_hot_data.indices("test")
    all_texts = ["the answer is " + ("yes" if label else "no") for label in one_hot_data.labels.tolist()]
    encode = lambda texts: torch.eye(2)[[int("yes" in (t or "").split()) for t in texts]]  # noqa: E731
    assert torch.equal(encode([all_texts[i] for i in index]), one_hot_data.inputs["a"][index])
    cache = _Cache(Oracle().eval(), one_hot_data, "test", 128, "cpu")
    texts, start = [], 0
    for batch in cache.batches:
        texts.append([all_texts[i] for i in index[start:start + len(batch)].tolist()])
        start += len(batch)
    ones = (one_hot_data.labels[index] == 1).double().mean().item()
    swap = c.corruption_curve(cache, "a", "letter_swap", texts=texts, encode_text=encode, seed=seed())
    omit = c.corruption_curve(cache, "a", "word_omission", texts=texts, encode_text=encode, seed=seed())
    for level, swapped, omitted in zip(c.LEVELS, swap["accuracy"], omit["accuracy"]):
        within_binomial(1 - swapped, level * ones, len(index))
        # "yes" omitted: with probability level, less level^4 / 4 (every word drawn, one kept at random)
        within_binomial(1 - omitted, (level - level ** 4 / 4) * ones, len(index))
    with pytest.raises(TypeError, match=r"^encode_text: expected a function"):
        c.corruption_curve(cache, "a", "typo", texts=texts)
    with pytest.raises(TypeError, match=r"^texts: expected a list of 4 lists of texts \(one per batch\), got NoneType"):
        c.corruption_curve(cache, "a", "typo", encode_text=encode)
    with pytest.raises(TypeError, match=r"^texts\[0\]\[0\]: expected a str or None, got int"):
        c.corruption_curve(cache, "a", "typo", texts=[[0] * len(t) for t in texts], encode_text=encode)
    with pytest.raises(ValueError, match=r"^texts\[3\]: expected 16 texts"):
        c.corruption_curve(cache, "a", "typo", texts=texts[:3] + [texts[3][:-1]], encode_text=encode)
    with pytest.raises(ValueError, match=r"^texts: expected a list of 4 lists"):
        c.corruption_curve(cache, "a", "typo", texts=texts[:1], encode_text=encode)
    with pytest.raises(ValueError, match=r"^encode_text: expected a tensor of shape \(400, 2\) \(the split's texts\)"):
        c.corruption_curve(cache, "a", "typo", texts=texts, encode_text=lambda t: torch.zeros(len(t), 3))


def yes_no_texts(labels, present=None):
    """"... yes" for class 1, "... no" for class 0; None where ``present`` is false."""
    return [None if present is not None and not present[i] else "the answer is " + ("yes" if y else "no")
            for i, y in enumerate(labels.tolist())]


def yes_no_encoder(calls):
    """A frozen "encoder": the one-hot of whether "yes" is a word (zeros for a missing text); counts its calls."""
    def encode(texts):
        calls.append(len(texts))
        return torch.eye(2)[[int("yes" in (t or "").split()) for t in texts]] * torch.tensor(
            [[t is not None] for t in texts])
    return encode


def test_raw_texts_are_corrupted_before_the_encoder_in_evaluate():
    """A dataset whose modality ``a`` is the encoding of raw texts (``raw_texts``): evaluate adds the text
    families at TEXT_LEVELS, encodes the split's corrupted texts once per level, with the same draws for
    every seed, and scores only the samples that have a text (one in five has none)."""
    from modalimmune import evaluate

    y = torch.arange(1000) % 2
    present = torch.ones(1000, 3, dtype=torch.bool)
    present[::5, 0] = False
    texts, calls = yes_no_texts(y, present[:, 0]), []
    data = MultimodalDataset({"a": torch.eye(2)[y], "b": torch.randn(1000, 3), "c": torch.randn(1000, 1)}, y,
                             present=present, standardize=False, raw_texts={"a": (texts, yes_no_encoder(calls))})
    assert torch.equal(data.text_input("a", texts), data.inputs["a"])
    calls.clear()
    first, second = (evaluate(Oracle(), data, seed=s, batch_size=64)["corruption"]["a"] for s in (0, 1))
    assert set(first) == set(c.VECTOR_FAMILIES + c.TEXT_FAMILIES)
    n = data.split_size("test")
    assert calls == [n] * 2 * 3 * (len(c.TEXT_LEVELS) - 1)  # per seed, family and corrupted level: one call
    for family in c.TEXT_FAMILIES:
        assert first[family]["levels"] == list(c.TEXT_LEVELS) and first[family] == second[family]  # the same draws
    test = data.indices("test")
    ones, has = (y[test] == 1), present[test, 0]
    clean = first["letter_swap"]["accuracy"][0]  # a sample without its text: the oracle says class 0
    assert clean == pytest.approx((~(~has & ones)).double().mean().item())
    for level, accuracy in zip(c.TEXT_LEVELS, first["letter_swap"]["accuracy"]):
        within_binomial(clean - accuracy, level * (has & ones).double().mean().item(), n)
    with pytest.raises(ValueError, match=r"raw_texts: expected keys among the vector modalities \(a, b, c\), got 'd'"):
        MultimodalDataset({"a": torch.eye(2)[y], "b": torch.randn(1000, 3), "c": torch.randn(1000, 1)}, y,
                          raw_texts={"d": (texts, yes_no_encoder([]))})
    with pytest.raises(TypeError, match=r"raw_texts\['a'\] text 0: expected None \(the sample lacks the modality\)"):
        MultimodalDataset({"a": torch.eye(2)[y], "b": torch.randn(1000, 3), "c": torch.randn(1000, 1)}, y,
                          present=present, raw_texts={"a": (yes_no_texts(y), yes_no_encoder([]))})
    with pytest.raises(ValueError, match=r"raw_texts\['a'\]: expected 1000 texts \(one per sample\), got 999"):
        MultimodalDataset({"a": torch.eye(2)[y], "b": torch.randn(1000, 3), "c": torch.randn(1000, 1)}, y,
                          raw_texts={"a": (yes_no_texts(y)[1:], yes_no_encoder([]))})


def test_curve_matches_a_direct_evaluation():
    data = tiny_dataset(n=120)
    model = build_model("mlp", data.spec, data.num_classes).eval()
    cache = _Cache(model, data, "test", 7, "cpu")
    whole = data.batch(data.indices("test"))
    assert "seq" in whole.masks
    for name in data.modalities:
        for family in c.families(whole, name):
            curve = c.corruption_curve(cache, name, family, seed=5, levels=(0.0, 0.5))
            generator = torch.Generator().manual_seed(c._curve_seed(5, name, family))
            corrupted = c.corrupt(whole.inputs[name], family, 0.5, generator, mask=whole.masks.get(name))
            with torch.no_grad():
                direct = (model(whole.replace(name, corrupted)).argmax(-1) == whole.labels).float().mean().item()
                clean = (model(whole).argmax(-1) == whole.labels).float().mean().item()
            assert curve["accuracy"] == [pytest.approx(clean), pytest.approx(direct)], (name, family)


def test_curve_bad_input(one_hot_data):
    cache = _Cache(Oracle().eval(), one_hot_data, "test", 512, "cpu")
    with pytest.raises(ValueError, match=r"^name: expected one of 'a', 'b', 'c'"):
        c.corruption_curve(cache, "d", "noise")
    with pytest.raises(ValueError, match=r"^family: expected one of 'noise', 'entry_drop', 'entry_swap', 'letter"):
        c.corruption_curve(cache, "a", "span_drop")
    with pytest.raises(ValueError, match=r"^levels: expected increasing levels in \[0, 1\) starting at 0"):
        c.corruption_curve(cache, "a", "noise", levels=(0.1, 0.2))
    with pytest.raises(ValueError, match=r"^levels\[1\]: expected a finite number in \[0.0, 1.0\)"):
        c.corruption_curve(cache, "a", "noise", levels=(0.0, 1.0))
    with pytest.raises(ValueError, match=r"^seed: expected an int >= 0"):
        c.corruption_curve(cache, "a", "noise", seed=-1)
