"""method="modalimmune": masking and hypergradient wired, ablations, whole-state checkpoint/resume."""

import dataclasses
import math

import pytest
import torch
from test_data import single_thread, tiny_arrays, tiny_dataset  # noqa: F401 (autouse fixture)

import modalimmune.methods.modalimmune.objective as objective
import modalimmune.methods.modalimmune.tuner as tuner
from modalimmune.data import MultimodalDataset
from modalimmune.methods import CurvatureMasker, StepContext, build_method
from modalimmune.methods.modalimmune import Views
from modalimmune.methods.modalimmune.interventions import draw_swaps, intervene
from modalimmune.methods.modalimmune.options import LOG_LAMBDA_RANGE
from modalimmune.models import build_model
from modalimmune.train import Trainer


@pytest.fixture(scope="module")
def data():
    return tiny_dataset(n=90)


SMALL_MODELS = {"mlp": dict(hidden=16, embed_dim=8, fused_dim=16), "transformer": dict(dim=16, heads=2, patch=4)}


def make(data, method, out_dir=None, model_seed=0, model="mlp", **fields):
    torch.manual_seed(model_seed)
    model = build_model(model, data.spec, data.num_classes, **SMALL_MODELS[model])
    fields = {"epochs": 2, "batch_size": 16, "progress": False, "patience": 0, "method": method, **fields}
    return Trainer(model, data, out_dir=out_dir, **fields)


def one_step(trainer, step=0):
    """One training step of the trainer's method on its first training batch; p.grad holds the result."""
    trainer.optimizer.zero_grad(set_to_none=True)
    batch = trainer.dataset.batch(trainer.dataset.indices("train")[:16])
    ctx = StepContext(trainer.params, 1.0, step, 0, trainer.config.epochs)
    return trainer.method.training_step(trainer.model, batch, ctx)


def test_mask_is_applied_to_the_gradient(data, monkeypatch):
    trainer = make(data, "modalimmune[mask=hard,probe_every=0]")
    method = trainer.method
    for d in method.masker.curvature:  # every coordinate sharply curved: disagreements are blocked
        d.fill_(1.0)
    method.masker.tau = 0.5
    seen = {}
    original = CurvatureMasker.apply

    def spy(self, g_c, g_d, probe=None):
        seen.update(g_c=[g.clone() for g in g_c], g_d=[g.clone() for g in g_d])
        return original(self, g_c, g_d, probe)
    monkeypatch.setattr(CurvatureMasker, "apply", spy)
    logs = one_step(trainer)
    assert seen, "the curvature mask was never applied"
    blocked = 0
    for p, g_c, g_d in zip(trainer.params, seen["g_c"], seen["g_d"]):
        agree = g_c * g_d >= 0
        torch.testing.assert_close(p.grad, g_c + torch.where(agree, g_d, torch.zeros_like(g_d)))
        blocked += int((~agree).sum())
    assert blocked > 0 and logs["mask/masked_fraction"] == pytest.approx(
        blocked / sum(p.numel() for p in trainer.params))
    assert sum(float(g.abs().sum()) for g in seen["g_d"]) > 0  # the destructive part is not empty


def test_mask_off_adds_the_full_destructive_gradient(data):
    trainer = make(data, "modalimmune[mask=off,hypergrad=off]")
    assert trainer.method.masker is None
    logs = one_step(trainer)
    assert "mask/masked_fraction" not in logs and all(p.grad is not None for p in trainer.params)


def test_probe_updates_the_curvature(data):
    trainer = make(data, "modalimmune[mask=hard,probe_every=1]")
    one_step(trainer)
    assert sum(float(d.abs().sum()) for d in trainer.method.masker.curvature) > 0
    assert trainer.method.masker.tau < float(torch.finfo(torch.float32).max)


def test_hypergradient_moves_phi_when_certified(data, monkeypatch):
    trainer = make(data, "modalimmune[hypergrad=neumann,hyper_every=1,hyper_lr=0.1]")
    method = trainer.method
    calls = []
    original = tuner.implicit_hypergradient

    def spy(*args, **kwargs):
        g, cert = original(*args, **kwargs)
        calls.append((g, cert, kwargs))
        return g, cert
    monkeypatch.setattr(tuner, "implicit_hypergradient", spy)
    before = method.tuner.phi.detach().clone()
    one_step(trainer, step=0)  # no hypergradient on the first step
    assert not calls
    logs = one_step(trainer, step=1)
    assert len(calls) == 1
    (g,), cert, kwargs = calls[0]
    assert kwargs["curvature"] == "ggn" and cert.certified, cert.reason
    encoders = {id(p) for p in trainer.model.encoders.parameters()}
    assert [id(p) for p in method.tuner.targets] == [id(p) for p in trainer.params if id(p) not in encoders]
    # first RMS-normalised step: each coordinate moves by hyper_lr * sign(g) (clamped)
    expected = (before - 0.1 * torch.sign(g)).clamp(*LOG_LAMBDA_RANGE)
    torch.testing.assert_close(method.tuner.phi.detach(), torch.where(g == 0, before, expected))
    assert logs["hyper/applied"] == 1.0 and logs["hyper/certified"] == 1.0 and logs["hyper/iterations"] > 0


def test_the_hypergradient_moves_the_single_view_weight(data, monkeypatch):
    """phi's last coordinate is log l_single, and its hypergradient is the single-view term's: on a model
    that is still learning, with validation batches that mostly keep one modality (val_drop 0.95),
    raising l_single lowers their loss, so g < 0 and l_single rises by the step's factor; with the term
    off (lambda_single=0) its hypergradient is 0 and its weight stays 0 (as the consistency's, off by
    default), while the weights that are on have a hypergradient."""
    moved, original = {}, tuner.implicit_hypergradient
    for spec in ("modalimmune[hypergrad=neumann,hyper_every=1,val_drop=0.95]",
                 "modalimmune[hypergrad=neumann,hyper_every=1,val_drop=0.95,lambda_single=0]"):
        trainer = make(data, spec)
        calls = []
        monkeypatch.setattr(tuner, "implicit_hypergradient",
                            lambda *a, **k: calls.append(original(*a, **k)) or calls[-1])
        before = trainer.method.tuner.lambdas().clone()
        one_step(trainer, step=1)
        (g,), cert = calls[0]
        assert cert.certified, cert.reason
        assert torch.equal(g == 0, ~trainer.method.tuner.active)  # every weight that is on has a hypergradient
        moved[spec] = g, trainer.method.tuner.lambdas() / before.clamp_min(1e-30)
    (g_on, ratio_on), (g_off, _) = moved.values()
    assert g_on[3] < 0 and ratio_on[3].item() == pytest.approx(math.exp(0.1), rel=1e-5)
    assert g_off[3] == 0 and trainer.method.tuner.lambdas()[3] == 0


def test_hypergradient_through_the_attention_model(data):
    """The fusion transformer's attention (a fused kernel in training) is differentiated twice by the
    solve; the damping relative to the curvature's scale certifies it within ``hyper_iters``."""
    trainer = make(data, "modalimmune[hypergrad=neumann,hyper_every=1]", model="transformer")
    one_step(trainer, step=0)
    logs = one_step(trainer, step=1)
    assert logs["hyper/solves"] == 1 and logs["hyper/iterations"] > 0
    assert logs["hyper/certified"] == 1.0 and logs["hyper/applied"] == 1.0
    assert logs["hyper/damping"] >= trainer.method.options.hyper_damping
    assert torch.isfinite(trainer.method.tuner.phi).all()


def test_uncertified_hypergradient_leaves_phi_unchanged(data):
    trainer = make(data, "modalimmune[hypergrad=neumann,hyper_every=1,hyper_tol=1e-12,hyper_iters=2]")
    before = trainer.method.tuner.phi.detach().clone()
    one_step(trainer, step=0)
    logs = one_step(trainer, step=1)
    assert logs["hyper/solves"] == 1.0 and logs["hyper/certified"] == 0.0 and logs["hyper/applied"] == 0.0
    assert logs["hyper/grad_norm"] > 0
    assert torch.equal(trainer.method.tuner.phi.detach(), before)


def test_uncertified_by_certificate_flag_is_not_applied(data, monkeypatch):
    trainer = make(data, "modalimmune[hypergrad=neumann,hyper_every=1]")
    original = tuner.implicit_hypergradient

    def refuse(*args, **kwargs):
        g, cert = original(*args, **kwargs)
        return g, dataclasses.replace(cert, certified=False, reason="test")
    monkeypatch.setattr(tuner, "implicit_hypergradient", refuse)
    before = trainer.method.tuner.phi.detach().clone()
    one_step(trainer, step=1)
    assert torch.equal(trainer.method.tuner.phi.detach(), before)


def test_hypergrad_off_never_solves(data, monkeypatch):
    trainer = make(data, "modalimmune[hyper_every=1,hypergrad=off]")
    monkeypatch.setattr(tuner, "implicit_hypergradient", lambda *a, **k: pytest.fail("solved with hypergrad=off"))
    for step in range(3):
        one_step(trainer, step)


@pytest.mark.parametrize("options", [
    "controller=shapley", "controller=uniform,collapse=zero,mask=soft,s_min=0.3",
    "collapse=fixed_rank,hypergrad=off,s_min=0.3",
    "intervention=remove,max_targets=2,budget=1.5", "intervention=noise", "intervention=token_dropout",
    "per_sample=true,s_min=0.3", "per_sample=true,intervention=token_dropout,s_min=0.3"])
def test_ablations_train(data, options):
    trainer = make(data, f"modalimmune[{options},hyper_every=2]", epochs=1)
    summary = trainer.fit()
    assert summary["finished"] and all(torch.isfinite(p).all() for p in trainer.params)
    assert trainer.method.controller.counts.sum() > 0 or trainer.method.controller.estimator == "uniform"


def test_controller_estimates_are_logged(data):
    trainer = make(data, "modalimmune[controller=ig,per_sample=false]")
    logs = one_step(trainer)
    for name in data.modalities:
        assert logs[f"ig/{name}"] >= 0 and 0 <= logs[f"strength/{name}"] <= 1 and f"target/{name}" in logs
    assert 1 <= sum(logs[f"target/{name}"] > 0 for name in data.modalities) < len(data.modalities)
    controller = trainer.method.controller  # joint targets: one estimate per set of up to M - 1 modalities
    assert controller.joint and len(controller.target_sets) == 2 ** len(data.modalities) - 2
    assert controller.counts.tolist() == [1] * len(controller.target_sets)


@pytest.mark.parametrize("samples, rows", [(0, 16), (5, 5), (40, 16)])
def test_controller_measures_the_first_ig_samples(data, samples, rows):
    trainer = make(data, f"modalimmune[controller=ig,ig_samples={samples}]")
    controller, seen = trainer.method.controller, []
    measure = controller.measure
    controller.measure = lambda model, embeddings, present, *args: (
        seen.append((present.shape[0], {k: z.shape[0] for k, z in embeddings.items()})) or
        measure(model, embeddings, present, *args))
    one_step(trainer)
    assert seen == [(rows, {name: rows for name in data.modalities})]


@pytest.mark.parametrize("samples, rows", [(0, 16), (5, 5)])
def test_learnability_measures_the_first_ig_samples_of_the_batch_and_of_a_validation_batch(data, samples, rows):
    """... and encodes those validation rows in eval mode (no dropout draw), while training goes on in train mode."""
    trainer = make(data, f"modalimmune[controller=learnability,ig_samples={samples}]")
    method, seen, drawn = trainer.method, [], []
    observe, next_batch = method.controller.observe_learnability, method.validation_batch
    method.validation_batch = lambda: drawn.append(next_batch()) or drawn[-1]
    method.controller.observe_learnability = lambda model, params, train, validation, *args: (
        seen.append((len(train[1]), train[0].present.shape[0], len(validation[1]), validation[0].present.shape[0],
                     validation[0].embeddings)) or observe(model, params, train, validation, *args))
    one_step(trainer)
    val_rows = min(rows, data.split_size("val"))  # a validation batch is at most the split
    assert [s[:4] for s in seen] == [(rows, rows, val_rows, val_rows)]
    assert trainer.model.training
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model.encode(drawn[0].select(slice(rows)))
    for name, z in seen[0][4].items():
        torch.testing.assert_close(z, want[name])


def test_resume_restores_the_whole_method_state(data, tmp_path):
    spec = "modalimmune[mask=hard,hypergrad=neumann,hyper_every=3,probe_every=2]"
    whole = make(data, spec, tmp_path / "whole", checkpoint_every=3)
    whole.fit()
    cut = make(data, spec, tmp_path / "cut", checkpoint_every=3)
    cut.fit(max_steps=7)  # "killed" after step 7: the last checkpoint is from step 6
    resumed = make(data, spec, tmp_path / "cut", checkpoint_every=3, model_seed=99)
    resumed.fit(resume=True)
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    a, b = whole.method.state_dict(), resumed.method.state_dict()
    assert torch.equal(a["tuner"]["phi"], b["tuner"]["phi"]) and a["tuner"]["steps"] == b["tuner"]["steps"] > 0
    assert torch.equal(a["controller"]["estimates"], b["controller"]["estimates"])
    assert all(torch.equal(x, y) for x, y in zip(a["masker"]["curvature"], b["masker"]["curvature"]))
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (tmp_path / "cut" / "metrics.jsonl").read_text()


@pytest.mark.parametrize("spec, name", [
    ("modalimmune[controller=oracle]", "controller"), ("modalimmune[collapse=half]", "collapse"),
    ("modalimmune[mask=maybe]", "mask"), ("modalimmune[hypergrad=exact]", "hypergrad"),
    ("modalimmune[lambda_imm=-1]", "lambda_imm"), ("modalimmune[hyper_every=0]", "hyper_every"),
    ("modalimmune[val_drop=1]", "val_drop"), ("modalimmune[hyper_rel_damping=-0.5]", "hyper_rel_damping"),
    ("modalimmune[ig_samples=-1]", "ig_samples"), ("modalimmune[joint_targets=2]", "joint_targets"),
    ("modalimmune[speed=2]", "speed"), ("modalimmune[blank_share=1.5]", "blank_share"),
    ("modalimmune[swap_share=1]", "swap_share")])
def test_bad_options(spec, name):
    with pytest.raises((ValueError, TypeError), match=name):
        build_method(spec)


def intervened(trainer, fill):
    """The method's intervention on 16 training samples: ``fill(strengths)`` sets the (16, M)
    strengths; returns (embeddings, present, intervened embeddings, intervened present)."""
    batch = trainer.dataset.batch(trainer.dataset.indices("train")[:16])
    embeddings = trainer.model.encode(batch)
    present = trainer.model.all_present(batch)
    strengths = torch.zeros(16, len(trainer.dataset.modalities), dtype=torch.float64)
    fill(strengths)
    out = trainer.method.intervene(Views(embeddings, present, batch.masks), strengths)
    return embeddings, present, out.embeddings, out.present


def test_full_strength_collapse_is_the_models_missing_handling(data):
    def fill(strengths):
        strengths[:, 0], strengths[:, 1] = 1.0, 0.5
    embeddings, present, out, out_present = intervened(make(data, "modalimmune[hypergrad=off]"), fill)
    first, second = data.modalities[:2]
    assert not out_present[:, 0].any() and out_present[:, 1:].all() and present.all()
    assert out[first] is embeddings[first] and not torch.allclose(out[second], embeddings[second])


def test_per_sample_targets_damage_only_their_rows(data):
    def fill(strengths):
        strengths[:8, 0] = 1.0  # removed from the first half
        strengths[4:12, 1] = 0.5  # collapsed on the middle rows
    trainer = make(data, "modalimmune[hypergrad=off,per_sample=true]")
    embeddings, _, out, out_present = intervened(trainer, fill)
    second = data.modalities[1]
    assert not out_present[:8, 0].any() and out_present[8:, 0].all() and out_present[:, 1:].all()
    untouched = torch.cat([torch.arange(4), torch.arange(12, 16)])
    assert torch.equal(out[second][untouched], embeddings[second][untouched])
    assert not torch.allclose(out[second][4:12], embeddings[second][4:12])
    drawn = trainer.method.draw_targets(16)
    assert drawn.shape == (16, len(data.modalities)) and ((drawn > 0).sum(1) >= 1).all()
    assert len({tuple(row) for row in (drawn > 0).tolist()}) > 1  # the samples draw their own subsets


def test_blank_share_keeps_removed_targets_present_with_the_batch_mean(data):
    """``blank_share``: each removed target is either removed (absent, its embedding untouched) or blanked
    (present, its embedding the batch's mean one), never both; untargeted rows and modalities are untouched."""
    def fill(strengths):
        strengths[:12, 0] = 1.0
    trainer = make(data, "modalimmune[hypergrad=off,per_sample=true,blank_share=0.5]")
    embeddings, _, out, out_present = intervened(trainer, fill)
    first = data.modalities[0]
    z, got, kept = embeddings[first], out[first], out_present[:, 0]
    mean = z.mean(0, keepdim=True).expand_as(z)
    blanked = kept[:12]
    assert torch.equal(got[:12][blanked], mean[:12][blanked]) and torch.equal(got[:12][~blanked], z[:12][~blanked])
    assert torch.equal(got[12:], z[12:]) and kept[12:].all() and out_present[:, 1:].all()
    assert 0 < blanked.sum() < 12  # both kinds (the method's generator is seeded)
    assert all(out[name] is embeddings[name] for name in data.modalities[1:])


def test_swap_share_keeps_removed_targets_present_with_another_samples_embedding(data):
    """``swap_share``: a removed target of a sample that keeps two other views is either removed or swapped
    (present, its embedding and token mask those of the batch's previous sample); a sample left with one view
    is never swapped; untargeted rows and modalities are untouched."""
    trainer = make(data, "modalimmune[hypergrad=off,per_sample=true,swap_share=0.75]")
    batch = trainer.dataset.batch(trainer.dataset.indices("train")[:16])
    embeddings = trainer.model.encode(batch)
    strengths = torch.zeros(16, 3, dtype=torch.float64)
    strengths[:12, 2] = 1.0  # the sequence view removed from 12 rows...
    strengths[:4, 0] = 1.0  # ...and, from the first 4, the first view too: one view left there
    out = trainer.method.intervene(Views(embeddings, trainer.model.all_present(batch), batch.masks), strengths)
    seq = data.modalities[2]
    z, mask, kept = embeddings[seq], batch.masks[seq], out.present[:, 2]
    swapped = torch.cat([kept[:12], torch.zeros(4, dtype=torch.bool)])
    assert not swapped[:4].any() and 0 < swapped[4:].sum() < 8  # both kinds (the generator is seeded)
    assert kept[12:].all() and not out.present[:4, 0].any() and out.present[4:, :2].all()
    for got, real in ((out.embeddings[seq], z), (out.masks[seq], mask)):
        assert torch.equal(got[swapped], real.roll(1, 0)[swapped]) and torch.equal(got[~swapped], real[~swapped])
    first, second = data.modalities[:2]
    assert torch.equal(out.embeddings[first], embeddings[first]) and out.embeddings[second] is embeddings[second]
    assert set(out.apart.tolist()) >= set(swapped.nonzero().flatten().tolist())  # the rows fused apart


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_swapped_rows_fused_apart_are_the_whole_perturbed_pass(data, model):
    """With swaps the perturbed views share the clean pass but on ``apart``'s rows, fused again on their own:
    the result is the perturbed views' own fusion and head, every row (eval mode: no dropout)."""
    trainer = make(data, "modalimmune[hypergrad=off,swap_share=0.5]", model=model)
    net = trainer.model.eval()
    batch = trainer.dataset.batch(trainer.dataset.indices("train")[:16])
    clean = Views(net.encode(batch), net.all_present(batch), batch.masks)
    strengths = torch.zeros(16, 3, dtype=torch.float64)
    strengths[:12, 2], strengths[8:, 1], strengths[:2, 0] = 1.0, 1.0, 1.0
    perturbed = trainer.method.intervene(clean, strengths)
    assert 0 < len(perturbed.apart) < 16 and (perturbed.present & (strengths > 0)).any()  # some swapped
    got = objective.forward_pair(net, clean, perturbed)
    joint = net.fuse(perturbed.embeddings, perturbed.present, perturbed.masks)
    torch.testing.assert_close(got.joint_tilde, joint, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.logits_tilde, net.head(joint), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.logits, net.head(net.fuse(clean.embeddings, clean.present, clean.masks)),
                               rtol=1e-5, atol=1e-5)


def test_swap_share_takes_no_view_from_a_sample_that_lacks_it():
    """The previous sample's view must be real: a row whose donor has the view missing (its embedding the
    model's filler) is removed, never swapped."""
    z = {name: torch.randn(6, 4, generator=torch.Generator().manual_seed(i)) for i, name in enumerate("abc")}
    present = torch.ones(6, 3, dtype=torch.bool)
    present[2, 2] = False  # row 2 lacks c: row 3's donor
    strengths = torch.zeros(6, 3, dtype=torch.float64)
    strengths[[0, 1, 3, 4, 5], 2] = 1.0
    out = intervene(Views(z, present, {}), strengths, list("abc"), swaps=strengths > 0)
    assert torch.equal(out.present[:, 2], torch.tensor([True, True, False, False, True, True]))
    swapped = torch.tensor([0, 1, 4, 5])
    assert torch.equal(out.embeddings["c"][swapped], z["c"].roll(1, 0)[swapped])


def test_swap_share_leaves_two_modalities_as_removal():
    """With two modalities a removal leaves one view, which nothing could outvote: ``swap_share`` draws no
    swap, nothing from the generator, and the intervention is removal."""
    z = {name: torch.randn(6, 4, generator=torch.Generator().manual_seed(i)) for i, name in enumerate("ab")}
    strengths = torch.zeros(6, 2, dtype=torch.float64)
    strengths[::2, 0] = 1.0
    generator = torch.Generator().manual_seed(0)
    assert draw_swaps(strengths, 0.9, generator) is None
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())
    out = intervene(Views(z, torch.ones(6, 2, dtype=torch.bool), {}), strengths, ["a", "b"])
    assert torch.equal(out.present[:, 0], torch.arange(6) % 2 == 1) and out.embeddings["a"] is z["a"]
    assert out.apart is None
    swaps = draw_swaps(torch.ones(4000, 3, dtype=torch.float64), 0.25, generator)
    assert abs(swaps.double().mean().item() - 0.25) < 0.02  # each target, with probability the share


def method_state(method):
    """Copies of every part of the method's state that a step may change."""
    return {"controller": {k: v.clone() for k, v in method.controller.state_dict().items() if k != "generator"},
            "curvature": [d.clone() for d in method.masker.curvature], "tau": method.masker.tau,
            "masker_steps": method.masker.steps,
            "tuner": {k: v for k, v in method.tuner.state_dict().items() if k != "power_init"}}


def same_state(a, b):
    tensors = lambda s: [*s["controller"].values(), *s["curvature"], s["tuner"]["phi"],  # noqa: E731
                         s["tuner"]["mean_square"]]
    return (all(torch.equal(x, y) for x, y in zip(tensors(a), tensors(b))) and a["tau"] == b["tau"]
            and a["masker_steps"] == b["masker_steps"] and a["tuner"]["steps"] == b["tuner"]["steps"]
            and a["tuner"]["log"] == b["tuner"]["log"])


def test_a_nonfinite_step_is_skipped_and_leaves_the_method_state_untouched(data, monkeypatch):
    """NaN embeddings on one step, on which the controller measures, the masker probes and phi is
    solved for: the step is skipped and counted like any method's, and the controller's estimates,
    the masker's D, tau and step count and phi are as before it; training then goes on."""
    trainer = make(data, "modalimmune[mask=hard,hypergrad=neumann,ig_every=1,probe_every=1,hyper_every=1]", epochs=2)
    encode, poisoned = trainer.model.encode, {"on": False}
    monkeypatch.setattr(trainer.model, "encode", lambda batch: {
        k: z * float("nan") if poisoned["on"] else z for k, z in encode(batch).items()})
    trainer.fit(max_steps=2)
    before = method_state(trainer.method)
    params = [p.detach().clone() for p in trainer.params]
    poisoned["on"] = True
    trainer.fit(max_steps=3)  # step 2: measured, probed, solved for, and not finite
    poisoned["on"] = False
    assert trainer.state["nonfinite_total"] == 1
    assert all(torch.equal(p, q) for p, q in zip(params, trainer.params))
    assert same_state(before, method_state(trainer.method))
    assert trainer.method.tuner.log["hyper/solves"] == before["tuner"]["log"]["hyper/solves"]
    summary = trainer.fit(max_steps=5)
    assert summary["steps"] == 5 and trainer.state["nonfinite_run"] == 0
    assert not same_state(before, method_state(trainer.method))  # the good steps do move the state
    assert all(torch.isfinite(p).all() for p in trainer.params)


def test_single_view_share_tops_up_what_the_draws_leave_alone(data):
    """``single_share=rest`` (the default): the term weighs lambda_single (1 - q), q the share of the draws
    that already leave one modality alone."""
    method = build_method("modalimmune")
    strengths = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]],
                             dtype=torch.float64)  # two of the four rows keep one modality of three
    share = method.single_view_share(strengths)
    assert share.device.type == "cpu" and share.item() == pytest.approx(0.5)
    both_alone = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # with two, every draw does
    assert method.single_view_share(both_alone).item() == 0


def test_the_single_view_term_is_logged_and_trains_with_three_modalities(data):
    trainer = make(data, "modalimmune")
    logs = one_step(trainer)
    has_term = len(trainer.model.modalities) > 2
    assert (logs["term/single"].item() > 0) == has_term
    off = make(data, "modalimmune[lambda_single=0]")
    assert one_step(off)["term/single"].item() == 0


def test_single_views_auto_stacks_the_views_only_where_patterns_are_cheap(data):
    """``single_views=auto`` (the default): every view alone (``all``) with the late-fusion MLP, whose
    patterns share its first layer; one view per sample (``one``) with the transformer and with a model
    that does not say its patterns are cheap; a declared choice is kept; the declared options stay."""
    for model, want in (("mlp", "all"), ("transformer", "one")):
        trainer = make(data, "modalimmune", model=model)
        assert trainer.method.options.single_views == want and trainer.method.declared.single_views == "auto"
        assert make(data, "modalimmune[single_views=all]", model=model).method.options.single_views == "all"
    plug_in = build_model("mlp", data.spec, data.num_classes, **SMALL_MODELS["mlp"])
    plug_in.cheap_patterns = False
    assert build_method("modalimmune").declared.for_model(plug_in).single_views == "one"
    assert build_method("modalimmune").declared.for_model(torch.nn.Linear(2, 2)).single_views == "one"  # no flag
    with pytest.raises(ValueError, match="single_views"):
        build_method("modalimmune[single_views=some]")


def test_the_step_draws_the_single_views_the_model_resolves_to(data, monkeypatch):
    """The transformer's step under the defaults fuses one single-view pattern (P = 1) with the clean and
    damaged ones; the MLP's fuses M = 3."""
    seen = []
    original = objective.fuse_patterns
    monkeypatch.setattr(objective, "fuse_patterns", lambda m, z, present, masks: seen.append(len(present))
                        or original(m, z, present, masks))
    for model, patterns in (("transformer", 1), ("mlp", 3)):
        seen.clear()
        one_step(make(data, "modalimmune", model=model))
        assert seen == [2 + patterns], (model, seen)


def test_single_share_full_adds_the_whole_term_with_two_modalities_too():
    """``single_share=full``: the term at l_single on every step, whatever the draws leave
    alone, so with two modalities (where ``rest`` leaves nothing: q = 1) it is on; the step's loss is, by
    hand, L_task + l_imm L_imm + l_single L_single (the consistency and the guard off)."""
    arrays, y, _ = tiny_arrays(n=60)
    two = MultimodalDataset({"a": arrays["a"], "b": arrays["b"]}, y, name="two")
    assert one_step(make(two, "modalimmune"))["term/single"].item() == 0
    logs = one_step(make(two, "modalimmune[single_share=full,lambda_single=0.7]"))
    assert logs["term/single"].item() > 0 and logs["lambda/single"].item() == pytest.approx(0.7)
    by_hand = logs["term/task"] + logs["lambda/imm"] * logs["term/immunity"] + 0.7 * logs["term/single"]
    assert logs["loss"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    with pytest.raises(ValueError, match="single_share"):
        build_method("modalimmune[single_share=half]")
