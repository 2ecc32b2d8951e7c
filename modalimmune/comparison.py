"""``compare``: every method trained for every seed on one dataset, evaluated
with the same protocol, aggregated into a report. It sits above ``train`` and
``eval`` (which do not import each other)."""

import json
import os

from . import checks, distributed
from .data import as_data, load_dataset
from .data.missing import missing_patterns
from .eval.metrics import robustness, subset_name
from .eval.protocol import evaluate, pattern_score
from .eval.report import build_report, write_json, write_report
from .methods import build_method, parse_method
from .models import build_model
from .train import TrainConfig, Trainer, seed_everything

REFERENCE_METHOD = "erm"
ORACLE_ALL_UP_TO = 5  # modalities: up to this many, the oracle covers every missing pattern
ORACLE_SAMPLE = 20  # above: this many patterns (every single and leave-one-out one, the rest drawn)


def oracle_patterns(modalities):
    """The missing patterns the oracle trains (positions kept): every one for M <= ORACLE_ALL_UP_TO,
    else the fixed sample of :func:`missing_patterns` (docs/benchmark.md, "The oracle")."""
    m = len(modalities)
    return missing_patterns(m, None if m <= ORACLE_ALL_UP_TO else ORACLE_SAMPLE)


def _train(dataset, spec, seed, run_dir, config, save_models):
    """One run: the model (the ready model the method needs, else ``config.model``) trained with ``spec``."""
    train_config = TrainConfig(**{**config, "method": spec, "seed": seed})
    seed_everything(seed)
    name = build_method(spec).model or train_config.model
    model = build_model(name, dataset.spec, dataset.num_outputs, **train_config.model_options)
    summary = Trainer(model, dataset, train_config, out_dir=run_dir, checkpoints=save_models, overwrite=True).fit()
    return model, summary


def compare(dataset, methods, seeds, out_dir, *, oracle=False, save_models=False, log=print, **config):
    """Trains ``methods`` (specs like ``"moddrop[p=0.3]"``) on ``dataset`` (a name or a path for
    :func:`load_dataset`, or what :func:`modalimmune.data.as_data` takes) with each of ``seeds``
    (a count or a list) and writes ``out_dir/report.{json,md}``, the plots and,
    per run, ``runs/METHOD/seedS/{metrics.jsonl,eval.json}`` (and ``model.pt``
    with ``save_models``). ``oracle``: also train, for each of :func:`oracle_patterns` and seed, the
    same model on that pattern alone (``erm[keep=...]``, in ``oracle/PATTERN/seedS/``), and report each
    method beside it. ``config``: TrainConfig
    fields other than method and seed. Returns the report dict. Every argument and method
    spec is checked before any training or write. One process: under torchrun every rank
    would train every run and write the same files (refused)."""
    distributed.require_one_process("compare")
    if isinstance(dataset, (str, os.PathLike)):
        dataset = load_dataset(dataset, split_seed=config.get("split_seed", 0))
    dataset = as_data(dataset)  # read once for every run
    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f"methods: expected distinct method specs, got {methods!r}")
    for spec in methods:  # unknown names, bad options and options the data cannot serve fail before any training
        build_method(spec).check(dataset.modalities, dataset.task)
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    TrainConfig(**config)  # bad settings fail before any training too
    runs = {}
    for spec in methods:
        runs[spec] = []
        for seed in seeds:
            model, summary = _train(dataset, spec, seed, os.path.join(out_dir, "runs", spec, f"seed{seed}"), config,
                                    save_models)
            result = evaluate(model, dataset, "test", seed=seed)
            result["training"] = summary
            runs[spec].append(result)
            metric = result["metric"]
            log(f"{spec} seed {seed}: clean {metric} {result[f'clean_{metric}']:.4f} "
                f"mean-missing {result[f'mean_missing_{metric}']:.4f} ({summary['seconds']:.1f} s)")
    reference = next((s for s in methods if s == REFERENCE_METHOD), None) or next(
        (s for s in methods if parse_method(s)[0] == REFERENCE_METHOD), None)
    for spec in methods:
        for k, (seed, result) in enumerate(zip(seeds, runs[spec])):
            if reference is not None:
                against, metric = runs[reference][k], result["metric"]
                result.update(robustness(result["drop_rate_curve"]["rates"], result["drop_rate_curve"][metric],
                                         against["drop_rate_curve"][metric], metric))
                for name, curves in result["corruption"].items():
                    for family, curve in curves.items():
                        curve.update(robustness(curve["levels"], curve[metric],
                                                against["corruption"][name][family][metric], metric))
            write_json(os.path.join(out_dir, "runs", spec, f"seed{seed}", "eval.json"), result)
    oracles = _oracle(dataset, seeds, out_dir, config, save_models, log) if oracle else None
    report = build_report(dataset.name, dataset.modalities, seeds, runs, oracles)
    paths = write_report(out_dir, report, runs)
    log("wrote " + ", ".join(paths.values()))
    return report


def _oracle(dataset, seeds, out_dir, config, save_models, log):
    """``{pattern: [test metric per seed]}``: ERM on each oracle pattern alone, scored on that pattern."""
    scores = {}
    for pattern in oracle_patterns(dataset.modalities):
        name = subset_name(dataset.modalities, pattern)
        scores[name] = []
        for seed in seeds:
            run_dir = os.path.join(out_dir, "oracle", name, f"seed{seed}")
            model, summary = _train(dataset, f"erm[keep={name}]", seed, run_dir, config, save_models)
            score = pattern_score(model, dataset, pattern, "test")
            write_json(os.path.join(run_dir, "eval.json"), {"pattern": name, "seed": seed, "score": score,
                                                            "training": summary})
            scores[name].append(score)
            log(f"oracle {name} seed {seed}: {score:.4f} ({summary['seconds']:.1f} s)")
    return scores


def _read_run(run_dir, what):
    """A run's eval.json; a missing one fails naming ``out`` and the file."""
    path = os.path.join(run_dir, "eval.json")
    if not os.path.isfile(path):
        checks.fail("out", f"the evaluation of every {what} the report lists", f"no {path}", FileNotFoundError)
    with open(path) as file:
        return json.load(file)


def rebuild_report(out_dir, log=print):
    """Writes ``out_dir``'s report.json, report.md and plots again from its runs (``runs/METHOD/seedS/eval.json``,
    the methods and seeds its report.json lists), with this version's report; returns the report."""
    path = os.path.join(out_dir, "report.json")
    if not os.path.isfile(path):
        checks.fail("out", "a folder written by compare (with report.json)", repr(os.fspath(out_dir)),
                    FileNotFoundError)
    with open(path) as file:
        previous = json.load(file)
    runs = {}
    for method in previous["methods"]:
        runs[method] = []
        for seed in previous["seeds"]:
            runs[method].append(_read_run(os.path.join(out_dir, "runs", method, f"seed{seed}"), "run"))
    oracles = None
    if previous.get("oracle"):
        oracles = {}
        for pattern in previous["oracle"]["patterns"]:
            oracles[pattern] = []
            for seed in previous["seeds"]:
                oracles[pattern].append(_read_run(os.path.join(out_dir, "oracle", pattern, f"seed{seed}"),
                                                  "oracle run")["score"])
    report = build_report(previous["dataset"], previous["modalities"], previous["seeds"], runs, oracles)
    paths = write_report(out_dir, report, runs)
    log("wrote " + ", ".join(paths.values()))
    return report
