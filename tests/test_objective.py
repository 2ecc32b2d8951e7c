"""The ModalImmune objective: each term on hand-written cases, and g_c / g_d separated."""

import math

import pytest
import torch
from test_controller import ToyModel, toy_batch

from modalimmune.data.dataset import Batch, ModalitySpec
from modalimmune.methods import forward
from modalimmune.methods.modalimmune.interventions import Views, collapse
from modalimmune.methods.modalimmune.objective import (
    Outputs,
    SingleViews,
    Terms,
    consistency_loss,
    forward_pair,
    normalised_effective_rank,
    objective_terms,
    reconstruction_loss,
    single_view_loss,
    single_view_patterns,
    task_loss,
)
from modalimmune.models import LateFusionMLP


def test_consistency_by_hand():
    joint = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    tilde = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert consistency_loss(joint, tilde).item() == pytest.approx((4 + 9) / 2 / 2)


def test_task_loss_by_hand():
    assert task_loss(torch.tensor([[0.0, 0.0], [math.log(3), 0.0]]), torch.tensor([0, 0])).item() == \
        pytest.approx((math.log(2) + math.log(4 / 3)) / 2)


def test_effective_rank_term_by_hand():
    orthogonal = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]])  # two equal singular values
    assert normalised_effective_rank(orthogonal).item() == pytest.approx(1.0, rel=1e-4)
    rank_one = torch.tensor([[1.0, 2.0, 0.0, 0.0], [2.0, 4.0, 0.0, 0.0]])
    assert normalised_effective_rank(rank_one).item() == pytest.approx(0.5, rel=1e-4)


def test_reconstruction_by_hand_with_a_stop_gradient():
    pooled = torch.zeros(1, 2, requires_grad=True)
    tokens = torch.tensor([[[2.0], [4.0], [100.0]]], requires_grad=True)  # the third token is padding
    decoded = {"a": torch.tensor([[1.0, 1.0]], requires_grad=True), "b": torch.tensor([[5.0]], requires_grad=True)}
    loss = reconstruction_loss(decoded, {"a": pooled, "b": tokens}, {"b": torch.tensor([[True, True, False]])})
    assert loss.item() == pytest.approx(1.0 + 4.0)  # ||(1,1)||^2 / 2 + (5 - 3)^2 / 1
    loss.backward()
    assert pooled.grad is None and tokens.grad is None  # the targets are constants
    torch.testing.assert_close(decoded["b"].grad, torch.tensor([[4.0]]))


def test_destructive_combination():
    terms = Terms(*(torch.tensor(v) for v in (1.0, 2.0, 3.0, 0.5, 7.0)))
    weights = torch.tensor([2.0, 3.0, 5.0])
    assert terms.destructive(weights).item() == pytest.approx(2 * 2 + 3 * 3 - 5 * 0.5)
    assert terms.destructive(weights, rec_weight=0.1).item() == pytest.approx(2 * 2 + 3 * 3 - 5 * 0.5 + 0.7)
    with_single = torch.tensor([2.0, 3.0, 5.0, 4.0])  # l_single (1 - q) L_single, here 4 * 0.25 * 6
    assert terms.destructive(with_single, 0.1, torch.tensor(6.0), 0.25).item() == pytest.approx(
        2 * 2 + 3 * 3 - 5 * 0.5 + 0.7 + 4 * 0.25 * 6)


def tiny_setup(decode=False):
    spec = {"a": ModalitySpec(6), "b": ModalitySpec(4), "c": ModalitySpec(3, max_len=5)}
    model = LateFusionMLP(spec, 3, embed_dim=8, hidden=16, fused_dim=12, dropout=0.0, decode=decode)
    masks = {"c": torch.arange(5)[None, :] < torch.randint(1, 6, (16, 1))}
    batch = Batch({"a": torch.randn(16, 6), "b": torch.randn(16, 4), "c": torch.randn(16, 5, 3)},
                  torch.randint(0, 3, (16,)), masks)
    return model, batch


def intervened_terms(model, batch, decode=False, consistency="kl"):
    z = model.encode(batch)
    present = model.all_present(batch)
    clean = Views(z, present, batch.masks)
    perturbed = Views({**z, "b": collapse(z["b"], 0.6)}, present, batch.masks)
    outputs = forward_pair(model, clean, perturbed, decode=decode)
    return outputs, objective_terms(outputs, batch.labels, z, batch.masks, consistency=consistency)


def test_clean_term_is_the_erm_loss_and_its_gradient_ignores_the_intervention():
    model, batch = tiny_setup()
    params = list(model.parameters())
    outputs, terms = intervened_terms(model, batch)
    g_c = torch.autograd.grad(terms.task, params, allow_unused=True)
    erm = forward(model, batch)
    g_erm = torch.autograd.grad(erm.loss, params, allow_unused=True)
    assert terms.task.item() == pytest.approx(erm.loss.item(), rel=1e-6)
    for a, b in zip(g_c, g_erm):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_prediction_consistency_moves_only_the_damaged_prediction():
    model, batch = tiny_setup()
    outputs, terms = intervened_terms(model, batch)
    g_clean, g_tilde = torch.autograd.grad(terms.consistency, [outputs.logits, outputs.logits_tilde],
                                           allow_unused=True)
    assert g_clean is None and g_tilde.abs().max() > 0  # the clean prediction is the teacher: no gradient


def test_terms_against_direct_computation():
    model, batch = tiny_setup(decode=True)
    outputs, terms = intervened_terms(model, batch, decode=True)
    assert isinstance(outputs, Outputs)
    torch.testing.assert_close(terms.immunity, torch.nn.functional.cross_entropy(outputs.logits_tilde, batch.labels))
    p_clean = outputs.logits.double().softmax(-1)
    kl = (p_clean * (p_clean.log() - outputs.logits_tilde.double().log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(terms.consistency.double(), kl)
    _, representation = intervened_terms(model, batch, decode=True, consistency="representation")
    torch.testing.assert_close(representation.consistency, ((outputs.joint - outputs.joint_tilde) ** 2).mean())
    singular = torch.linalg.svdvals(outputs.joint_tilde.detach().double())
    p = singular / singular.sum() + 1e-7
    assert terms.erank.item() == pytest.approx(torch.exp(-(p * p.log()).sum()).item() / 12, rel=1e-3)
    assert terms.reconstruction.item() > 0


def test_destructive_gradient_reaches_the_collapsed_encoder():
    model, batch = tiny_setup()
    _, terms = intervened_terms(model, batch)
    loss = terms.destructive(torch.tensor([1.0, 1.0, 0.1]))
    grads = torch.autograd.grad(loss, list(model.encoders["b"].parameters()))
    assert all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("damage", ["removal", "collapse"])
def test_forward_pair_with_patterns_is_the_separate_passes(damage):
    """Clean, perturbed and the single-view patterns in one pass (removal: the perturbed views keep the
    clean embeddings, so all are one ``fuse_patterns``; a partial collapse: the perturbed pass apart)
    give what each pass alone gives, and the single-view term from that pass is ``single_view_loss``."""
    model, batch = tiny_setup(decode=True)
    model.double()
    for name in model.modalities:
        batch = batch.replace(name, batch.inputs[name].double())
    z = model.encode(batch)
    present = model.all_present(batch)
    removed = present & (torch.rand(present.shape) < 0.5)
    clean = Views(z, present, batch.masks)
    perturbed = (Views(dict(z), removed, dict(batch.masks)) if damage == "removal" else
                 Views({**z, "b": collapse(z["b"], 0.6)}, present, batch.masks))
    patterns, weights = single_view_patterns(present)
    got = forward_pair(model, clean, perturbed, decode=True, patterns=patterns)
    want = forward_pair(model, clean, perturbed, decode=True)
    assert want.pattern_logits is None
    for field in ("joint", "logits", "joint_tilde", "logits_tilde"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.joint_tilde, model.fuse(perturbed.embeddings, perturbed.present, batch.masks))
    for name, decoded in want.decoded.items():
        torch.testing.assert_close(got.decoded[name], decoded)
    torch.testing.assert_close(got.pattern_logits, torch.cat([model.head(model.fuse(z, p, batch.masks))
                                                              for p in patterns]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(SingleViews.of(got.pattern_logits, batch.labels, weights).loss(),
                               single_view_loss(model, clean, batch.labels), rtol=1e-10, atol=1e-12)


def test_single_view_loss_matches_a_float64_loop_and_trains_each_view_alone():
    """The sum over the modalities of the loss with that modality alone, over the samples that have it
    (natural missingness: some rows lack some modalities); each copy's gradient reaches only its view."""
    torch.manual_seed(3)
    dims = {"a": 3, "b": 5, "c": 2}
    model = ToyModel(dims, classes=4)
    embeddings = {k: z.requires_grad_() for k, z in toy_batch(dims, 13).items()}
    present = torch.rand(13, 3) < 0.7
    present[0] = False  # a row with nothing: it counts for no view
    labels = torch.randint(0, 4, (13,))
    got = single_view_loss(model, Views(embeddings, present, {}), labels)
    model64 = ToyModel(dims, classes=4).double()
    model64.load_state_dict(model.state_dict())
    want = []
    for m in range(3):
        rows = present[:, m]
        alone = torch.zeros_like(present)
        alone[:, m] = present[:, m]
        logits = model64.head(model64.fuse({k: z.double() for k, z in embeddings.items()}, alone))
        want.append(torch.nn.functional.cross_entropy(logits[rows], labels[rows]))
    torch.testing.assert_close(got.double(), torch.stack(want).sum(), rtol=1e-5, atol=1e-6)
    for m, g in enumerate(torch.autograd.grad(got, list(embeddings.values()))):
        assert (g[~present[:, m]] == 0).all() and (g[present[:, m]].abs().sum(1) > 0).all()


def test_one_view_per_sample_is_an_unbiased_draw_of_every_view_alone():
    """``each="one"``: each row (that has any view) with one of its k_b views alone, drawn uniformly, its
    loss weighted k_b / n_m (n_m rows have the drawn view m): the value of each draw by hand (the loss
    is taken in float32), and the draw's frequencies (seen through which view's embedding the gradient
    reaches) 1 / k_b, so the mean over draws is the stacked term, sum_m (1 / n_m) sum_{b has m} L(b, m)."""
    torch.manual_seed(4)
    dims = {"a": 3, "b": 5, "c": 2}
    model = ToyModel(dims, classes=4).double()
    embeddings = {k: z.double().requires_grad_() for k, z in toy_batch(dims, 11).items()}
    present = torch.rand(11, 3) < 0.6
    present[0], present[1] = False, True
    labels = torch.randint(0, 4, (11,))
    views = Views(embeddings, present, {})
    alone_losses = torch.stack([torch.nn.functional.cross_entropy(
        model.head(model.fuse(embeddings, present & (torch.arange(3) == m)[None])), labels, reduction="none")
        for m in range(3)], 1).detach()  # (B, M): each row with view m alone
    n, k = present.sum(0), present.sum(1)
    torch.testing.assert_close(single_view_loss(model, views, labels).detach().double(),
                               ((alone_losses * present).sum(0) / n).sum(), rtol=1e-5, atol=1e-6)
    generator, reached = torch.Generator().manual_seed(0), torch.zeros(11, 3)
    for _ in range(1000):
        replay = torch.Generator().set_state(generator.get_state())
        drawn = torch.rand(present.shape, generator=replay).masked_fill(~present, -1).argmax(1)
        got = single_view_loss(model, views, labels, each="one", generator=generator)
        rows = k > 0
        want = (k[rows] / n[drawn[rows]] * alone_losses[rows, drawn[rows]]).sum()
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-5, atol=1e-6)
        hit = torch.stack([g.abs().sum(1) > 0 for g in torch.autograd.grad(got, list(embeddings.values()))], 1)
        assert torch.equal(hit.sum(1), rows.long())
        reached += hit
    frequency = reached / 1000
    assert (frequency[~present] == 0).all()
    assert torch.allclose(frequency[present], (1 / k[:, None].double()).expand(-1, 3)[present].float(), atol=0.07)
