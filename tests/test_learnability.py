"""The learnability controller: a_S = grad L_S(train) . grad L_S(val) on the head, per missing pattern."""

import warnings

import pytest
import torch
from test_controller import ToyModel, toy_batch
from test_data import tiny_dataset

from modalimmune.methods.modalimmune import Views
from modalimmune.methods.modalimmune.controller import InfoGainController
from modalimmune.methods.modalimmune.learnability import head_parameters, learnability, pattern_gradients
from modalimmune.models import build_model

DIMS = {"a": 3, "b": 2, "c": 4}


def setup(seed=0, batch=24):
    torch.manual_seed(seed)
    model = ToyModel(DIMS, classes=3)
    views = [Views(toy_batch(DIMS, batch), torch.ones(batch, 3, dtype=torch.bool), {}) for _ in range(2)]
    labels = [torch.randint(0, 3, (batch,)) for _ in range(2)]
    controller = InfoGainController(DIMS, estimator="learnability", max_targets=2, joint=True, temperature=0.5,
                                    epsilon=0.2)
    params = head_parameters(model, list(model.parameters()), views[0])
    return model, views, labels, controller, params


def test_head_parameters_are_the_classifiers():
    model, views, _, _, params = setup()
    assert [id(p) for p in params] == [id(model.classifier.weight), id(model.classifier.bias)]


def test_pattern_gradients_match_a_float64_loop():
    model, views, labels, controller, params = setup()
    kept = ~controller.membership
    got = pattern_gradients(model, params, views[0], labels[0], kept).double()
    model64 = model.double()
    for row, g in zip(kept, got):
        embeddings = {k: z.double() for k, z in views[0].embeddings.items()}
        joint = model64.fuse(embeddings, views[0].present & row).detach()
        loss = torch.nn.functional.cross_entropy(model64.head(joint), labels[0])
        want = torch.cat([x.flatten() for x in torch.autograd.grad(loss, params)])
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6)


def test_pattern_gradients_through_the_fusion_match_a_float64_loop():
    model, views, labels, controller, _ = setup()
    kept, params = ~controller.membership, list(model.parameters())  # fusion, missing embeddings, head
    got = pattern_gradients(model, params, views[0], labels[0], kept, through_fusion=True).double()
    model64 = model.double()
    for row, g in zip(kept, got):
        embeddings = {k: z.double() for k, z in views[0].embeddings.items()}
        loss = torch.nn.functional.cross_entropy(model64.head(model64.fuse(embeddings, views[0].present & row)),
                                                 labels[0])
        want = torch.cat([x.flatten() for x in torch.autograd.grad(loss, params)])
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6)


def test_pattern_gradients_through_a_transformers_fusion_are_vectorised():
    """Attention under ``vmap``: the per-pattern gradients through the fusion transformer match a
    loop and vmap falls back to no loop of its own (torch warns when it does)."""
    torch.manual_seed(0)
    data = tiny_dataset()
    model = build_model("transformer", data.spec, data.num_classes, dim=16, heads=2, patch=4).eval()
    batch = data.batch(data.indices("train")[:9])
    views = Views({k: z.detach() for k, z in model.encode(batch).items()}, model.all_present(batch), batch.masks)
    labels, kept = batch.labels, torch.tensor([[True, False, True], [False, True, False], [True, True, True]])
    params = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a batching-rule fallback is a UserWarning
        got = pattern_gradients(model, params, views, labels, kept, through_fusion=True)
    for row, g in zip(kept, got):
        loss = torch.nn.functional.cross_entropy(model.head(model.fuse(views.embeddings, views.present & row,
                                                                       views.masks)), labels)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        want = torch.cat([(torch.zeros_like(p) if x is None else x).flatten() for x, p in zip(grads, params)])
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6)


def test_learnability_is_the_dot_of_train_and_val_gradients_and_a_squared_norm_on_one_batch():
    model, views, labels, controller, params = setup()
    kept = ~controller.membership
    a = learnability(model, params, (views[0], labels[0]), (views[1], labels[1]), kept)
    g0 = pattern_gradients(model, params, views[0], labels[0], kept).double()
    g1 = pattern_gradients(model, params, views[1], labels[1], kept).double()
    torch.testing.assert_close(a, (g0 * g1).sum(1))
    same = learnability(model, params, (views[0], labels[0]), (views[0], labels[0]), kept)
    assert (same >= 0).all()  # a_S(x, x) = |grad L_S|^2


def test_a_pattern_at_its_floor_scores_zero_and_loses_its_draws():
    """Fit the head to pattern S's loss exactly: its gradient vanishes, so a_S falls to 0 while the other
    patterns keep a positive score, and S gets the smallest share of the draw (the uniform share remains)."""
    model, views, labels, controller, params = setup()
    kept = ~controller.membership
    pair = (views[0], labels[0])
    before = learnability(model, params, pair, pair, kept)
    floor = 0  # the pattern with modality "a" removed
    joint = model.fuse(views[0].embeddings, views[0].present & kept[floor]).detach()
    optimizer = torch.optim.LBFGS(params, lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model.head(joint), labels[0]) + 1e-3 * sum(
            p.square().sum() for p in params)  # a unique minimum: separable data has none without it
        loss.backward()
        return loss
    optimizer.step(closure)
    after = learnability(model, params, pair, pair, kept)
    assert after[floor] < 1e-2 * before[floor]
    assert (after[1:] > 10 * after[floor]).all()
    controller.observe_learnability(model, params, pair, pair)
    pi = controller.set_probabilities()
    assert pi[floor] == pi.min() and pi[floor] >= 0.2 * controller.uniform_draw[floor] - 1e-12


def test_equal_scores_draw_as_the_uniform_controller():
    """pi_S is proportional to u_S exp(score_S): whatever the common score, the draw is u (the sizes of
    the removed sets uniform), not a uniform draw over the sets, which would favour the many mid-sized ones."""
    for estimator in ("learnability", "ig"):
        controller = InfoGainController(DIMS, estimator=estimator, max_targets=2, joint=True, temperature=0.5,
                                        epsilon=0.2)
        uniform = controller.uniform_draw / controller.uniform_draw.sum()
        torch.testing.assert_close(controller.set_probabilities(), uniform)
        controller.update(torch.full((6,), 0.7))
        torch.testing.assert_close(controller.set_probabilities(), uniform)


@pytest.mark.parametrize("scale", ["current", "max"])
def test_scores_are_scale_free_and_max_falls_back_to_uniform_at_the_floor(scale):
    controllers = [InfoGainController(DIMS, estimator="learnability", max_targets=2, joint=True, temperature=0.5,
                                      epsilon=0.2, scale=scale) for _ in range(3)]
    uniform = controllers[0].uniform_draw / controllers[0].uniform_draw.sum()
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    controllers[0].update(scores)
    controllers[1].update(scores * 1e6)  # the same scores at another scale: the same draw
    torch.testing.assert_close(controllers[0].set_probabilities(), controllers[1].set_probabilities())
    tilted = controllers[0].set_probabilities()
    assert tilted[-1] > uniform[-1] and tilted[0] < uniform[0]
    for _ in range(200):  # every score falls a billionfold
        controllers[0].update(scores * 1e-9)
    if scale == "max":  # the scores are shares of the largest ever: the draw goes back to the uniform one
        torch.testing.assert_close(controllers[0].set_probabilities(), uniform, atol=1e-6, rtol=0)
    else:  # shares of the largest now: the same tilt as before
        torch.testing.assert_close(controllers[0].set_probabilities(), tilted)
    controllers[2].load_state_dict(controllers[0].state_dict())
    torch.testing.assert_close(controllers[2].set_probabilities(), controllers[0].set_probabilities())


@pytest.mark.parametrize("s_min, measured", [(1.0, False), (0.3, True)])
def test_information_gain_sets_the_strengths_only_with_a_range(s_min, measured):
    model, views, labels, _, params = setup()
    controller = InfoGainController(DIMS, estimator="learnability", s_min=s_min, s_max=1.0)
    controller.observe_learnability(model, params, (views[0], labels[0]), (views[1], labels[1]))
    assert bool(controller.gains.abs().sum() > 0) == measured
    if measured:
        assert controller.strengths().max() == 1.0 and controller.strengths().min() >= s_min
    else:
        assert (controller.strengths() == 1.0).all()


def test_learnability_needs_its_own_observe():
    model, views, _, controller, _ = setup()
    with pytest.raises(ValueError, match="observe_learnability"):
        controller.observe(model, views[0].embeddings, views[0].present)


def test_shrinkage_leaves_a_steady_score_and_silences_one_within_its_noise():
    """learn_shrink: a_S max(0, 1 - se^2 / a^2); a steady score keeps its value, one that flips sign from one
    measurement to the next is within its noise of 0 and tilts nothing (its set keeps the uniform draw's odds)."""
    controller = InfoGainController(DIMS, estimator="learnability", max_targets=2, joint=True, temperature=0.5,
                                    epsilon=0.2, shrink=True)
    steady = torch.tensor([0.0, 0.5, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    for k in range(60):
        controller.update(steady + torch.tensor([(-1.0) ** k] + [0.0] * 5, dtype=torch.float64))
    resolved = controller.resolved()
    torch.testing.assert_close(resolved[1:], controller.estimates[1:])
    assert controller.estimates[0].abs() > 0.01 and resolved[0] == 0
    plain = InfoGainController(DIMS, estimator="learnability", max_targets=2, joint=True, shrink=False)
    plain.load_state_dict(controller.state_dict())
    torch.testing.assert_close(plain.resolved(), controller.estimates)
    controller.settle(True)
    before = controller.squares.clone()
    controller.update(steady * 3)
    controller.settle(False)  # a skipped step undoes its updates, the squares too
    torch.testing.assert_close(controller.squares, before)
