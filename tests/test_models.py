"""The ready models follow the model contract (docs/benchmark.md, "Models")."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_data import single_thread, tiny_dataset  # noqa: F401 (autouse fixture)

from modalimmune.models import build_model, pool
from modalimmune.models.base import fuse_patterns
from modalimmune.models.transformer import length_buckets

SMALL = {"mlp": dict(hidden=16, embed_dim=8, fused_dim=12), "transformer": dict(dim=16, heads=2, patch=4)}


@pytest.fixture(scope="module")
def data():
    return tiny_dataset()


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_contract_shapes(data, name):
    model = build_model(name, data.spec, data.num_classes, decode=True).eval()
    batch = data.batch(data.indices("train")[:7])
    embeddings = model.encode(batch)
    assert set(embeddings) == set(data.modalities)
    assert all(z.shape[0] == 7 and z.ndim in (2, 3) for z in embeddings.values())
    present = torch.ones(7, 3, dtype=torch.bool)
    joint = model.fuse(embeddings, present, batch.masks)
    assert joint.ndim == 2 and joint.shape[0] == 7
    assert model.head(joint).shape == (7, data.num_classes)
    decoded = model.decode(joint)
    assert {k: v.shape for k, v in decoded.items()} == {
        k: pool(z, batch.masks.get(k)).shape for k, z in embeddings.items()}
    assert torch.equal(model(batch), model.head(joint))


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_missing_modality_input_is_ignored(data, name):
    model = build_model(name, data.spec, data.num_classes).eval()
    batch = data.batch(data.indices("test")[:5])
    present = torch.tensor([[True, False, True]] * 5)
    before = model(batch, present)
    garbage = batch.replace("b", torch.randn_like(batch.inputs["b"]) * 100)
    assert torch.allclose(model(garbage, present), before, atol=1e-5)
    assert not torch.allclose(model(garbage), model(batch), atol=1e-3)  # but it counts when present


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_padding_is_ignored(data, name):
    model = build_model(name, data.spec, data.num_classes).eval()
    batch = data.batch(data.indices("train")[:6])
    seq = batch.inputs["seq"].clone()
    seq[~batch.masks["seq"]] = 50.0
    assert torch.allclose(model(batch.replace("seq", seq)), model(batch), atol=1e-5)


def test_unknown_model_name(data):
    with pytest.raises(ValueError, match="model: unknown 'cnn'"):
        build_model("cnn", data.spec, data.num_classes)


def test_pool_averages_real_tokens():
    z = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert pool(z, torch.tensor([[True, True, False]])).item() == 2.0
    assert torch.equal(pool(z[:, 0]), z[:, 0])


def _double_views(model, data, rows):
    batch = data.batch(data.indices("train")[:rows])
    for name in data.modalities:
        batch = batch.replace(name, batch.inputs[name].double())
    with torch.no_grad():
        embeddings = model.encode(batch)
    return {k: z.requires_grad_() for k, z in embeddings.items()}, batch.masks


@pytest.mark.parametrize("name", ["mlp", "transformer"])
@settings(max_examples=12, deadline=None)
@given(patterns=st.integers(1, 6), rows=st.integers(1, 9), depth=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_fuse_patterns_is_fuse_under_each_pattern(data, name, patterns, rows, depth, seed):
    """The law of the multi-pattern pass: ``fuse_patterns(Z, P)[p] == fuse(Z, P[p])`` for every
    pattern, values and gradients (into the embeddings and every parameter), in float64, for random
    masks (rows with nothing present, with everything, the sequence's own padding) and, for the
    transformer, any depth."""
    torch.manual_seed(seed)
    model = build_model(name, data.spec, data.num_classes, **SMALL[name],
                        **({"depth": depth} if name == "transformer" else {})).double().eval()
    if name == "mlp":
        for missing in model.missing.values():
            torch.nn.init.normal_(missing)
    embeddings, masks = _double_views(model, data, rows)
    present = torch.rand(patterns, rows, 3) < 0.5
    present[0, 0] = True
    inputs = [*embeddings.values(), *model.parameters()]
    got = model.fuse_patterns(embeddings, present, masks)
    want = torch.stack([model.fuse(embeddings, p, masks) for p in present])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(got)  # a random linear functional of the joint representations
    for a, b in zip(torch.autograd.grad((got * weights).sum(), inputs, allow_unused=True),
                    torch.autograd.grad((want * weights).sum(), inputs, allow_unused=True)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def _fewest_padded_tokens(lengths, most):
    """By enumeration: the fewest padded tokens of ascending ``lengths`` in at most ``most`` consecutive
    buckets, each cut at its longest."""
    n = len(lengths)
    return min(sum(lengths[end - 1] * (end - start) for start, end in zip((0, *cuts), (*cuts, n)))
               for k in range(min(most, n)) for cuts in itertools.combinations(range(1, n), k))


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=9).map(sorted), most=st.integers(1, 5))
def test_length_buckets_pad_the_fewest_tokens(lengths, most):
    """The transformer's buckets of rows by length: at most ``most`` consecutive ones covering every row,
    each reported at its longest row, with the fewest padded tokens of any such split."""
    sizes, longest = length_buckets(lengths, most)
    assert len(sizes) <= most and sum(sizes) == len(lengths) and min(sizes) > 0
    ends = list(itertools.accumulate(sizes))
    assert longest == [lengths[end - 1] for end in ends]
    assert sum(s * top for s, top in zip(sizes, longest)) == _fewest_padded_tokens(lengths, most)


def test_fuse_patterns_of_a_model_without_its_own_stacks_the_batch(data):
    """A model with no ``fuse_patterns`` of its own (the plug-in contract asks only for ``fuse``):
    the function stacks the patterns through ``fuse``, one call."""
    model = build_model("mlp", data.spec, data.num_classes, **SMALL["mlp"]).double().eval()
    calls = []

    class OnlyFuse(torch.nn.Module):
        modalities = model.modalities

        def fuse(self, embeddings, present, masks=None):
            calls.append(present.shape)
            return model.fuse(embeddings, present, masks)
    embeddings, masks = _double_views(model, data, 5)
    present = torch.rand(4, 5, 3) < 0.5
    got = fuse_patterns(OnlyFuse(), embeddings, present, masks)
    assert calls == [(20, 3)]
    torch.testing.assert_close(got, model.fuse_patterns(embeddings, present, masks), rtol=1e-10, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(depth=st.integers(1, 3), rows=st.integers(1, 7), training=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_transformer_readout_is_the_torch_encoders_class_token(data, depth, rows, training, seed):
    """The transformer's blocks compute the class token's row alone in the last block: its output is
    ``nn.TransformerEncoder``'s class token over the whole sequence, values and gradients, in float64
    (training mode with dropout 0 takes the training path; evaluation mode torch's own)."""
    torch.manual_seed(seed)
    model = build_model("transformer", data.spec, data.num_classes, **SMALL["transformer"], depth=depth,
                        dropout=0.0).double().train(training)
    embeddings, masks = _double_views(model, data, rows)
    present = torch.rand(rows, 3) < 0.6
    tokens, real, modality, missing = model._tokens(embeddings, masks)
    keep = model._keep(real, present, modality, missing)
    want = model.norm(model.blocks(tokens, src_key_padding_mask=~keep)[:, 0])
    got = model.fuse(embeddings, present, masks)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    inputs = [*embeddings.values(), *model.parameters()]
    weights = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad((got * weights).sum(), inputs, allow_unused=True),
                    torch.autograd.grad((want * weights).sum(), inputs, allow_unused=True)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_transformer_token_layout_by_hand_and_built_once(data):
    """Each position's modality (-1: the class token; each modality's tokens, then its missing token) and
    whether it is a missing token, as written out by hand; the same tensors on every call with the same
    token counts (no copy from the host per fusion pass), new ones for other counts."""
    model = build_model("transformer", data.spec, data.num_classes, dim=16, heads=2, patch=4)
    batch = data.batch(data.indices("train")[:5])
    embeddings = model.encode(batch)
    counts = [embeddings[name].shape[1] for name in model.modalities]
    _, real, modality, missing = model._tokens(embeddings, batch.masks)
    want_modality, want_missing = [-1], [False]
    for i, count in enumerate(counts):
        want_modality += [i] * count + [i]
        want_missing += [False] * count + [True]
    assert modality.tolist() == want_modality and missing.tolist() == want_missing
    assert real.shape == (5, len(want_modality))
    again = model._tokens(embeddings, batch.masks)
    assert again[2] is modality and again[3] is missing
    shorter = {**embeddings, model.modalities[0]: embeddings[model.modalities[0]][:, :1]}
    assert model._tokens(shorter, {})[2].shape[0] == len(want_modality) - counts[0] + 1
