"""Any modalimmune method inside a plain PyTorch loop (docs/own_loop.md): bf16 autocast and
gradient accumulation, the loop written out. With the Trainer's schedule, order and skip rule
(as here) it trains exactly the Trainer's parameters for the same seed (tests/test_own_loop.py).

    python docs/examples/own_loop.py --method "modalimmune" --epochs 5
"""

import argparse
import math

import torch

import modalimmune
from modalimmune.methods import MethodRunner
from modalimmune.train import SplitCycle, seed_everything
from modalimmune.train.trainer import warmup_cosine


def train(model, dataset, method, *, epochs=5, batch_size=64, grad_accum=1, lr=2e-3, weight_decay=1e-2,
          warmup_fraction=0.05, max_grad_norm=1.0, bf16=False, seed=0):
    """Trains ``model`` on ``dataset``'s training split with ``method`` (a spec); returns the runner."""
    seed_everything(seed)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    validation = SplitCycle(dataset, "val", batch_size, seed + 32452843, device)  # ModalImmune's hypergradient
    runner = MethodRunner(method, model, params, seed=seed, validation_batch=validation, grad_accum=grad_accum,
                          epochs=epochs)
    train_index = dataset.indices("train")
    steps = epochs * math.ceil(math.ceil(len(train_index) / batch_size) / grad_accum)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup_fraction))
    model.train()
    for epoch in range(epochs):
        runner.epoch = epoch
        order = torch.randperm(len(train_index), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        chunks = torch.split(order, batch_size)
        for start in range(0, len(chunks), grad_accum):
            group = chunks[start:start + grad_accum]
            optimizer.zero_grad(set_to_none=True)
            losses = []
            for chunk in group:
                batch = dataset.batch(train_index[chunk]).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    losses.append(runner(batch, share=1.0 / len(group))["loss"])  # fills p.grad
            for p in params:  # every parameter steps (weight decay, moments), as in the Trainer
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            applied = bool(torch.isfinite(torch.stack([*losses, norm.to(losses[0].dtype)])).all())
            if applied:
                optimizer.step()
            runner.finish(applied)  # a skipped step leaves the method's state as it was
            scheduler.step()
    return runner


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mfeat")
    parser.add_argument("--method", default="modalimmune")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (on the CPU too)")
    args = parser.parse_args()
    dataset = modalimmune.data.load_dataset(args.dataset)
    torch.manual_seed(0)
    model = modalimmune.models.build_model("mlp", dataset.spec, dataset.num_classes)
    train(model, dataset, args.method, epochs=args.epochs, batch_size=32, grad_accum=args.grad_accum, bf16=args.bf16)
    result = modalimmune.evaluate(model, dataset, "test")
    print(f"{args.method}: clean {result['clean_accuracy']:.3f}, mean missing {result['mean_missing_accuracy']:.3f}, "
          f"worst missing {result['worst_missing_accuracy']:.3f}")


if __name__ == "__main__":
    main()
