"""Cost of a ModalImmune training step over an ERM step (goals: <= 2.0x ERM, <= 1.1x its design floor).

Same model (the late-fusion MLP, or --model transformer), same batch of the
mfeat data (or avdigits): one full optimizer step (method step, clipping,
AdamW) for each variant. ``--frozen``: the encoders frozen (their parameters
do not train), the setting of pretrained encoders whose embeddings are cached.
The design floor is the step with nothing but what every step of the design
requires (the second fusion pass with the drawn patterns removed, the
single-view term's patterns: every view alone where the model's patterns are
cheap, one view per sample elsewhere, ``single_views=auto``; one backward):
the defaults' step, whose draw is the uniform one with no periodic measurement.
The variants with a periodic measurement (the learnability controller) are
counted over it. Times are block means over ``ig_every`` steps, so the periodic
measurement is counted as often as training runs it.
"""

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from modalimmune.data.sources import load_dataset  # noqa: E402
from modalimmune.methods import StepContext  # noqa: E402
from modalimmune.models import build_model  # noqa: E402
from modalimmune.train import Trainer  # noqa: E402

VARIANTS = [("erm", "erm"), ("moddrop", "moddrop"), ("modalimmune (defaults: the design floor)", "modalimmune"),
            ("  lambda_single=0 (no single-view term)", "modalimmune[lambda_single=0]"),
            ("  swap_share=0.1 (swapped views: their rows fused again apart)", "modalimmune[swap_share=0.1]"),
            ("  single_views=all (every view alone: the MLP's auto)", "modalimmune[single_views=all]"),
            ("  single_views=one (one view alone per sample: the transformer's auto)", "modalimmune[single_views=one]"),
            ("  lambda_rank=0.01 (the effective rank on)", "modalimmune[lambda_rank=0.01]"),
            ("  lambda_con=0.1 (the consistency on)", "modalimmune[lambda_con=0.1]"),
            ("  with mask=hard", "modalimmune[mask=hard]"),
            ("  controller=learnability (measured every ig_every steps)", "modalimmune[controller=learnability]"),
            ("  the same, learn_on=fusion_head", "modalimmune[controller=learnability,learn_on=fusion_head]")]
DEFAULTS = VARIANTS[2][0]


def make_trainer(data, spec, args):
    torch.manual_seed(0)
    model = build_model(args.model, data.spec, data.num_classes)
    if args.frozen:
        for name in model.modalities:
            for parameter in model.modality_parameters(name):
                parameter.requires_grad_(False)
    return Trainer(model, data, method=spec, batch_size=args.batch_size, epochs=1, progress=False,
                   device=args.device, bf16="off")


def step_fn(trainer, batch, step, period=1):
    """``period`` consecutive optimizer steps per call: a block that holds every periodic part of the
    method (the controller's measurement, the masker's probe) as often as training does."""
    def run():
        for _ in range(period):
            trainer.optimizer.zero_grad(set_to_none=True)
            ctx = StepContext(trainer.params, 1.0, step[0], 0, 1)
            logs = trainer.method.training_step(trainer.model, batch, ctx)
            trainer._apply_step([logs["loss"]])
            step[0] += 1
    return run


def interleaved_medians(fns, device, repeats, warmup=3):
    """Median time of each of ``fns`` (a dict), timed in interleaved rounds so that a change in the
    machine's load hits every variant alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            samples[label].append(_common.median_time(fn, device, repeats=1, warmup=0))
    return {label: statistics.median(t) for label, t in samples.items()}


def main():
    p = _common.parser(__doc__)
    p.add_argument("--dataset", default="mfeat")
    p.add_argument("--model", default="mlp")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--frozen", action="store_true", help="freeze the encoders (only fusion and head train)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset)
    batch = data.batch(data.indices("train")[:args.batch_size]).to(args.device)
    repeats = 5 if args.quick else 15
    trainers = {label: make_trainer(data, spec, args) for label, spec in VARIANTS}
    period = trainers[DEFAULTS].method.options.ig_every
    steps = {label: step_fn(trainer, batch, [1], period) for label, trainer in trainers.items()}
    times = {label: t / period for label, t in interleaved_medians(steps, args.device, repeats, warmup=1).items()}
    erm, floor = times["erm"], times[DEFAULTS]
    rows = [[label, f"{t * 1e3:.2f}", f"{t / erm:.2f}x", f"{t / floor:.2f}x"] for label, t in times.items()]
    table = _common.markdown_table(["step", "ms", "over ERM", "over the design floor"], rows)
    print(table)
    trainer = trainers[DEFAULTS]
    notes = (f"{args.dataset}, model `{args.model}` ({sum(p.numel() for p in trainer.params):,} trainable parameters"
             f"{', encoders frozen' if args.frozen else ''}), batch {args.batch_size}, {len(data.modalities)} "
             f"modalities. Goals: the ModalImmune step <= 2.0x ERM and <= 1.1x its design floor. Each time is the "
             f"median over {repeats} blocks of {period} steps (the learnability controller measures every {period}) "
             f"divided by {period}; the variants are timed in interleaved rounds, so that a change in the machine's "
             "load moves them together.")
    suffix = f"{'_frozen' if args.frozen else ''}{'_' + args.model if args.model != 'mlp' else ''}"
    name = f"train_step_{args.device}{suffix}{'_quick' if args.quick else ''}.md"
    out = args.out or _common.RESULTS / "kernels" / name
    _common.write_report(out, "ModalImmune training step over ERM", args.device, table, notes)


if __name__ == "__main__":
    main()
