"""Command line: ``modalimmune info|train|eval|compare|report`` (also ``python -m modalimmune``)."""

import argparse
import json
import os
import platform
import sys

import torch

from . import _extension, distributed
from .backend import BACKENDS, unavailable_reason
from .checks import fail, integer
from .train.config import SELECTIONS
from .train.trainer import PREEMPTED_EXIT_CODE, NonFiniteError, Preempted


def info_lines():
    """Versions, and for each backend whether it is usable here and, if not, why."""
    module = _extension.load()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda_runtime = torch.version.cuda or "none (CPU build of torch)"
    lines = [
        f"python        {platform.python_version()}",
        f"torch         {torch.__version__} (CUDA {cuda_runtime})",
        f"triton        {triton_version}",
        f"GPU           {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible'}",
    ]
    if module is not None:
        cuda = module.cuda_version
        built_cuda = f"CUDA {cuda // 1000}.{cuda % 1000 // 10}" if cuda else "no CUDA"
        lines.append(f"extension     modalimmune._C, {module.compiler}, OpenMP {module.openmp}, {built_cuda}")
    else:
        lines.append(f"extension     unusable: {_extension.reason()}")
    lines.append("backends:")
    for name in BACKENDS:
        why = unavailable_reason(name)
        lines.append(f"  {name:7s} {'usable' if why is None else 'unusable: ' + why}")
    return lines


def _info(args):
    print("\n".join(info_lines()))
    return 0


def _add_training_options(parser):
    parser.add_argument("--dataset", required=True,
                        help="a packaged dataset (mfeat, avdigits, hapt, reviews, reviews_rating), "
                             "PATH.npz (one array per modality and y) or a memory-mapped dataset folder "
                             "(docs/benchmark.md, \"Memory-mapped folders\")")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--model", default="mlp", help="ready model: mlp or transformer")
    parser.add_argument("--decode", action="store_true", help="give the model reconstruction decoders")
    parser.add_argument("--rec-weight", type=float, default=0.0, help="weight of the reconstruction loss")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--patience", type=int, default=0, help="early-stopping patience in epochs (0: off)")
    parser.add_argument("--select", choices=SELECTIONS, default="robust",
                        help="model selection and early stopping: robust (the mean of the validation figure with "
                             "every modality and over the missing patterns), clean (with every modality), or "
                             "last (the last epoch)")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 on the CPU: the ready models are small)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _training_config(args):
    return dict(epochs=args.epochs, model=args.model, model_options={"decode": True} if args.decode else {},
                rec_weight=args.rec_weight, batch_size=args.batch_size, lr=args.lr, grad_accum=args.grad_accum,
                patience=args.patience, select=args.select, split_seed=args.split_seed, bf16=args.bf16,
                device=args.device, progress=not args.no_progress)


def _set_threads(args):
    if args.threads is not None:
        torch.set_num_threads(integer("--threads", args.threads, 1))
    elif getattr(args, "device", "auto") in ("auto", "cpu") and not torch.cuda.is_available():
        torch.set_num_threads(1)


def _train(args):
    from .data import load_dataset
    from .methods import build_method
    from .models import build_model
    from .train import TrainConfig, Trainer, seed_everything

    _set_threads(args)
    config = TrainConfig(method=args.method, seed=args.seed, checkpoint_every=args.checkpoint_every,
                         max_nonfinite_steps=args.max_nonfinite_steps, **_training_config(args))
    method = build_method(config.method)  # a bad spec fails before the data is read (the Trainer checks it)
    dataset = load_dataset(args.dataset, split_seed=config.split_seed)
    wants_cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    with distributed.process_group("cuda" if wants_cuda else "cpu"):  # under torchrun: join its process group
        seed_everything(config.seed)
        model = build_model(method.model or config.model, dataset.spec, dataset.num_outputs, **config.model_options)
        summary = Trainer(model, dataset, config, out_dir=args.out, overwrite=args.overwrite).fit(resume=args.resume)
        if distributed.is_main():
            print(json.dumps({**summary, "world_size": distributed.world_size()}))
    return 0


def _trained_on(saved, path):
    """Where the dataset of ``model.pt`` (``saved``, read from ``path``) is: the source it records."""
    from .data import DATASETS

    name = saved.get("dataset")
    source = saved.get("dataset_source") or (name if name in DATASETS else None)
    if source is None:
        fail("--dataset", f"the dataset {path} was trained on", "none given, and the checkpoint records only its "
             f"name {name!r} (trained on arrays in memory, or written before model.pt recorded the dataset's path)")
    if source not in DATASETS and not os.path.exists(source):
        raise FileNotFoundError(f"--dataset: {path} was trained on {source}, which is no longer there (moved or "
                                "deleted?); give its new path with --dataset")
    return source


def _eval(args):
    from .data import load_dataset
    from .eval import evaluate
    from .eval.report import write_json
    from .train import checkpoint as ckpt
    from .train import load_model

    _set_threads(args)
    saved = ckpt.load(args.checkpoint, ("config",))
    split_seed = saved["config"].get("split_seed", 0) if args.split_seed is None else args.split_seed
    dataset = load_dataset(args.dataset or _trained_on(saved, args.checkpoint), split_seed=split_seed)
    model, _ = load_model(args.checkpoint, dataset)
    result = evaluate(model, dataset, args.split, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "eval.json"), result)
    metric = result["metric"]
    print(json.dumps({k: result[k] for k in (f"clean_{metric}", f"mean_missing_{metric}", f"worst_missing_{metric}",
                                             "drop_rate_auc", "relative_robustness")}))
    return 0


def _compare(args):
    from .comparison import compare
    from .methods import METHODS, split_methods

    distributed.require_one_process("compare")
    _set_threads(args)
    methods = split_methods(args.methods) if args.methods else sorted(METHODS)
    compare(args.dataset, methods, args.seeds, args.out, oracle=args.oracle, save_models=args.save_models,
            **_training_config(args))
    return 0


def _report(args):
    from .comparison import rebuild_report

    rebuild_report(args.out)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="modalimmune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions and which backends are usable").set_defaults(run=_info)

    train = commands.add_parser("train", help="train one method on one dataset")
    _add_training_options(train)
    train.add_argument("--method", default="erm", help="a method, with options: moddrop[p=0.3]")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--checkpoint-every", type=int, default=0,
                       help="optimizer steps between checkpoints (0: at the end of each epoch)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run OUT holds (without it, or --resume, such a folder is refused)")
    train.add_argument("--max-nonfinite-steps", type=int, default=10,
                       help="stop after this many non-finite steps in a row (each is skipped; 0: never stop)")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="the evaluation protocol on a trained model.pt")
    evaluate.add_argument("--checkpoint", required=True, help="a model.pt written by train")
    evaluate.add_argument("--dataset", default=None,
                          help="default: the dataset model.pt records (a packaged name, or the absolute path of "
                               "the .npz or the memory-mapped folder)")
    evaluate.add_argument("--out", required=True)
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the random drop and noise patterns")
    evaluate.add_argument("--split-seed", type=int, default=None, help="default: the one used in training")
    evaluate.add_argument("--threads", type=int, default=None)
    evaluate.set_defaults(run=_eval)

    comp = commands.add_parser("compare", help="train and evaluate several methods over seeds; write a report "
                                               "(one process: not under torchrun)")
    _add_training_options(comp)
    comp.add_argument("--methods", default=None, help="comma-separated method specs (default: every method)")
    comp.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    comp.add_argument("--save-models", action="store_true", help="keep each run's model.pt")
    comp.add_argument("--oracle", action="store_true",
                      help="also train the per-pattern oracle (the same model on each missing pattern alone) and "
                           "report each method beside it")
    comp.set_defaults(run=_compare)

    report = commands.add_parser("report", help="write a compare folder's report and plots again from its runs")
    report.add_argument("--out", required=True, help="a folder written by compare")
    report.set_defaults(run=_report)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NonFiniteError) as error:
        parser.exit(2, f"modalimmune {args.command}: error: {error}\n")
    except Preempted as stop:  # SIGTERM: the checkpoint is written; the same command with --resume continues
        parser.exit(PREEMPTED_EXIT_CODE, f"modalimmune {args.command}: {stop}\n")


if __name__ == "__main__":
    sys.exit(main())
