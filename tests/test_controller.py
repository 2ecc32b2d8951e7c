"""InfoGainController: information gain, exact Shapley values, target sampling, strengths, state."""

import itertools
import math

import pytest
import scipy.stats
import torch
from torch import nn

from modalimmune.methods.modalimmune.controller import (
    InfoGainController,
    coalition_values,
    information_gain,
    shapley_from_values,
    shapley_values,
)


class ToyModel(nn.Module):
    """Pooled embeddings of ``dims``; the fusion is a small MLP over the modalities in ``used``,
    a missing modality (``present`` false) replaced by its learned "missing" embedding."""

    def __init__(self, dims, used=None, classes=4):
        super().__init__()
        self.modalities = tuple(dims)
        self.used = tuple(used or dims)
        self.fusion = nn.Sequential(nn.Linear(sum(dims[m] for m in self.used), 16), nn.Tanh())
        self.classifier = nn.Linear(16, classes)
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.randn(d)) for m, d in dims.items()})

    def fuse(self, embeddings, present, masks=None):
        parts = [torch.where(present[:, i, None], embeddings[m], self.missing[m])
                 for i, m in enumerate(self.modalities) if m in self.used]
        return self.fusion(torch.cat(parts, -1))

    def head(self, joint):
        return self.classifier(joint)


def toy_batch(dims, batch=32):
    return {m: 3 * torch.randn(batch, d) for m, d in dims.items()}


def all_present(embeddings, M):
    return torch.ones(len(next(iter(embeddings.values()))), M, dtype=torch.bool)


def test_information_gain_is_zero_for_an_ignored_modality():
    dims = {"a": 5, "b": 3, "c": 4}
    model = ToyModel(dims, used=("a", "b"))
    z = toy_batch(dims)
    gains = information_gain(model, z, all_present(z, 3))
    assert gains[2] == 0.0
    assert gains[0] > 1e-4 and gains[1] > 1e-4
    phi = shapley_values(model, z, all_present(z, 3))
    assert abs(phi[2]) < 1e-12  # a null player gets nothing


def test_information_gain_matches_hand_computed_kl():
    dims = {"a": 2, "b": 2}
    model = ToyModel(dims)
    z = toy_batch(dims, 8)
    present = all_present(z, 2)
    p = model.head(model.fuse(z, present)).log_softmax(-1)
    removed = present.clone()
    removed[:, 1] = False  # knocked out = removed: the model's missing embedding stands in
    q = model.head(model.fuse({"a": z["a"], "b": model.missing["b"].expand(8, 2)}, present)).log_softmax(-1)
    assert torch.equal(q, model.head(model.fuse(z, removed)).log_softmax(-1))
    expected = sum(sum(math.exp(pi) * (pi - qi) for pi, qi in zip(pr.tolist(), qr.tolist()))
                   for pr, qr in zip(p, q)) / 8
    assert information_gain(model, z, present)[1].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5])
def test_shapley_efficiency(M):
    dims = {f"m{i}": 2 + i for i in range(M)}
    model = ToyModel(dims)
    z = toy_batch(dims)
    present = all_present(z, M)
    values = coalition_values(model, z, present)
    assert len(values) == 2 ** M
    assert values[frozenset(range(M))] == pytest.approx(0.0, abs=1e-6)  # KL(p || p)
    phi = shapley_values(model, z, present)
    assert phi.sum().item() == pytest.approx(values[frozenset(range(M))] - values[frozenset()], rel=1e-9, abs=1e-9)


def test_shapley_of_a_hand_written_game():
    # v = 1 for player 0, 2 for player 1, +3 when 0 and 1 play together, player 2 a null player
    def v(s):
        return (1.0 if 0 in s else 0.0) + (2.0 if 1 in s else 0.0) + (3.0 if {0, 1} <= s else 0.0)
    values = {frozenset(s): v(set(s)) for r in range(4) for s in itertools.combinations(range(3), r)}
    torch.testing.assert_close(shapley_from_values(values, 3), torch.tensor([2.5, 3.5, 0.0], dtype=torch.float64))


def test_shapley_refuses_more_than_five_modalities():
    with pytest.raises(ValueError, match="estimator"):
        InfoGainController([f"m{i}" for i in range(6)], estimator="shapley")


def test_sampling_frequencies_follow_pi():
    controller = InfoGainController("abcd", temperature=0.5, epsilon=0.2, seed=int(torch.randint(0, 2**31, ())))
    controller.update(torch.tensor([0.05, 0.4, 0.1, 0.0]))
    pi = controller.probabilities()
    expected = 0.8 * torch.softmax(torch.tensor([0.05, 0.4, 0.1, 0.0], dtype=torch.float64) / 0.5, 0) + 0.05
    torch.testing.assert_close(pi, expected)
    draws = 20000
    counts = torch.bincount(torch.tensor([controller.choose()[0][0] for _ in range(draws)]), minlength=4)
    # chi-square goodness of fit: a false alarm once in a million runs
    assert scipy.stats.chisquare(counts.numpy(), (pi * draws).numpy()).pvalue > 1e-6


def test_strengths_follow_the_estimates():
    controller = InfoGainController("abc", s_min=0.1, s_max=0.7)
    torch.testing.assert_close(controller.strengths(), torch.full((3,), 0.4, dtype=torch.float64))  # no estimate yet
    controller.update(torch.tensor([0.2, 0.8, -0.1]))
    torch.testing.assert_close(controller.strengths(), torch.tensor([0.25, 0.7, 0.1], dtype=torch.float64))
    uniform = InfoGainController("abc", estimator="uniform", s_min=0.1, s_max=0.7)
    uniform.update(torch.tensor([0.2, 0.8, 0.0]))
    torch.testing.assert_close(uniform.probabilities(), torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(uniform.strengths(), torch.full((3,), 0.4, dtype=torch.float64))


def test_ema_and_counts():
    controller = InfoGainController("ab", momentum=0.75)
    controller.update(torch.tensor([1.0, 2.0]))
    controller.update(torch.tensor([3.0, 0.0]), which=[0])
    torch.testing.assert_close(controller.estimates, torch.tensor([1.5, 2.0], dtype=torch.float64))
    assert controller.counts.tolist() == [2, 1]
    controller.update(torch.tensor([0.0, 0.0]), which=[1])
    assert controller.estimates[1].item() == pytest.approx(1.5)


def test_observe_uses_the_model():
    dims = {"a": 5, "b": 3}
    model = ToyModel(dims, used=("a",))
    z = toy_batch(dims)
    controller = InfoGainController(dims)
    controller.observe(model, z, all_present(z, 2))
    assert controller.counts.tolist() == [1, 1]
    assert controller.estimates[0] > 0 and controller.estimates[1] == 0
    assert controller.strengths()[1].item() == controller.s_min


def test_subsets_stay_within_budget():
    controller = InfoGainController("abcde", max_targets=3, budget=1.0, s_min=0.2, s_max=0.9, seed=3)
    controller.update(torch.tensor([0.1, 0.5, 0.2, 0.0, 0.05]))
    sizes = set()
    for _ in range(300):
        targets = controller.choose()
        modalities = [m for m, _ in targets]
        sizes.add(len(targets))
        assert len(set(modalities)) == len(modalities) <= 3
        assert len(targets) == 1 or sum(s for _, s in targets) <= 1.0 + 1e-12
    assert sizes >= {1, 2}


def test_state_dict_round_trip_replays_choices():
    controller = InfoGainController("abc", seed=5)
    controller.update(torch.tensor([0.3, 0.1, 0.2]))
    [controller.choose() for _ in range(7)]
    state = controller.state_dict()
    expected = [controller.choose() for _ in range(20)]
    other = InfoGainController("abc", seed=99)
    other.load_state_dict(state)
    assert [other.choose() for _ in range(20)] == expected
    torch.testing.assert_close(other.estimates, controller.estimates)
    assert other.counts.tolist() == controller.counts.tolist()


@pytest.mark.parametrize("kwargs, name", [
    ({"estimator": "random"}, "estimator"), ({"temperature": 0.0}, "temperature"),
    ({"epsilon": 1.5}, "epsilon"), ({"s_min": 0.5, "s_max": 0.3}, "s_max"), ({"max_targets": 0}, "max_targets"),
    ({"momentum": 1.0}, "momentum"), ({"budget": float("nan")}, "budget")])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        InfoGainController("abc", **kwargs)


def test_bad_update_leaves_state_untouched():
    controller = InfoGainController("abc")
    controller.update(torch.tensor([0.1, 0.2, 0.3]))
    before = controller.state_dict()
    for bad in (torch.tensor([0.1, 0.2]), torch.tensor([0.1, float("nan"), 0.3])):
        with pytest.raises(ValueError, match="values"):
            controller.update(bad)
    torch.testing.assert_close(controller.estimates, before["estimates"])
    assert controller.counts.tolist() == before["counts"].tolist()


def test_information_gain_ignores_dropout_noise_and_keeps_the_mode():
    from modalimmune.data.dataset import ModalitySpec
    from modalimmune.models import LateFusionMLP
    model = LateFusionMLP({"a": ModalitySpec(4), "b": ModalitySpec(3)}, 3, embed_dim=8, dropout=0.5)
    with torch.no_grad():
        model.fusion[0].weight[:, 8:] = 0  # the fusion ignores b
    z = {"a": torch.randn(16, 8), "b": torch.randn(16, 8)}
    model.train()
    gains = information_gain(model, z, all_present(z, 2))
    assert gains[1] == 0.0 and gains[0] > 0
    assert model.training


def test_per_sample_draws_follow_pi_and_the_budget():
    controller = InfoGainController("abcd", temperature=0.5, epsilon=0.2, max_targets=3, budget=1.2, s_min=0.3,
                                    s_max=0.9, seed=int(torch.randint(0, 2**31, ())))
    controller.update(torch.tensor([0.05, 0.4, 0.1, 0.0]))
    strengths = controller.choose_per_sample(20000)
    targeted = strengths > 0
    assert targeted.any(1).all() and (targeted.sum(1) <= 3).all()
    single = targeted.sum(1) == 1
    assert (strengths[~single].sum(1) <= 1.2 + 1e-12).all()
    expected = controller.strengths().expand_as(strengths)
    torch.testing.assert_close(strengths[targeted], expected[targeted])
    # one target per sample: the targets' frequencies follow pi
    controller.max_targets, controller.budget = 1, None
    counts = (controller.choose_per_sample(20000) > 0).sum(0)
    assert counts.sum() == 20000
    assert scipy.stats.chisquare(counts.numpy(), (controller.probabilities() * 20000).numpy()).pvalue > 1e-6


def test_joint_information_gain_of_sets_matches_removing_them_together():
    dims = {"a": 3, "b": 2, "c": 4}
    model = ToyModel(dims, used=("a", "b"))
    z = toy_batch(dims, 16)
    present = all_present(z, 3)
    controller = InfoGainController(dims, max_targets=2, joint=True)
    assert controller.target_sets == [frozenset(s) for s in ({0}, {1}, {2}, {0, 1}, {0, 2}, {1, 2})]
    gains = controller.measure(model, z, present)
    torch.testing.assert_close(gains[:3], information_gain(model, z, present))  # the singles come first
    p = model.head(model.fuse(z, present)).log_softmax(-1)
    removed = present.clone()
    removed[:, :2] = False
    q = model.head(model.fuse(z, removed)).log_softmax(-1)
    expected = (p.exp() * (p - q)).sum(-1).mean().item()
    assert gains[3].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    # c is ignored: removing it with another modality costs what removing that one alone costs
    torch.testing.assert_close(gains[4], gains[0])
    torch.testing.assert_close(gains[5], gains[1])


@pytest.mark.parametrize("budget", [None, 1.0])
def test_joint_draws_follow_the_sets_pi(budget):
    controller = InfoGainController("abcd", max_targets=3, temperature=0.5, epsilon=0.3, budget=budget, s_min=0.2,
                                    s_max=0.8, joint=True, seed=int(torch.randint(0, 2**31, ())))
    gains = torch.rand(len(controller.target_sets), dtype=torch.float64)
    controller.update(gains)
    sizes = controller.membership.sum(1)
    cost = controller.membership.double() @ controller.strengths()
    allowed = torch.ones_like(sizes, dtype=torch.bool) if budget is None else (sizes == 1) | (cost <= budget)
    assert budget is None or not allowed.all()  # the budget excludes some sets
    # by hand: the uniform controller's draw is a size in 1..3, then a set of that size
    uniform = torch.tensor([1 / (3 * math.comb(4, int(k))) for k in sizes], dtype=torch.float64) * allowed
    tilted = uniform * torch.exp(gains / 0.5)  # the uniform draw tilted by the scores
    expected = 0.7 * tilted / tilted.sum() + 0.3 * uniform / uniform.sum()
    torch.testing.assert_close(controller.set_probabilities(), expected)
    torch.testing.assert_close(controller.probabilities(), expected @ controller.membership.double())
    draws = 30000
    targeted = controller.choose_per_sample(draws) > 0
    index = {tuple(row): i for i, row in enumerate(controller.membership.tolist())}
    counts = torch.bincount(torch.tensor([index[tuple(row)] for row in targeted.tolist()]),
                            minlength=len(index))
    assert (counts[~allowed] == 0).all()
    assert scipy.stats.chisquare(counts[allowed].numpy(), (expected[allowed] * draws).numpy()).pvalue > 1e-6
    assert sorted(m for m, _ in controller.choose()) in [sorted(s) for s in controller.target_sets]


def test_joint_state_and_logs():
    controller = InfoGainController("abc", max_targets=2, joint=True, seed=1)
    controller.update(torch.arange(6, dtype=torch.float64) / 10)
    assert [controller.log()[f"ig/{m}"] for m in "abc"] == pytest.approx([0.0, 0.1, 0.2])
    with pytest.raises(ValueError, match="values"):
        controller.update(torch.zeros(3))  # one value per set, not per modality
    with pytest.raises(ValueError, match="estimates"):
        controller.load_state_dict(InfoGainController("abc", max_targets=2, seed=1).state_dict())
    # joint needs the IG estimator and several targets a step; otherwise the sets are the modalities
    assert len(InfoGainController("abc", max_targets=1, joint=True).target_sets) == 3
    assert len(InfoGainController("abc", estimator="uniform", max_targets=2, joint=True).target_sets) == 3


@pytest.mark.parametrize("kwargs, name", [({"joint": 1}, "joint"), ({"max_targets": 9, "joint": True}, "joint")])
def test_bad_joint_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        InfoGainController([f"m{i}" for i in range(9)], **kwargs)
