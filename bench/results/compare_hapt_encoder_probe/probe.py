"""Is the gyro encoder or the shared fusion/head what keeps gyro-alone below the oracle?
For each method and seed: train as compare does, score gyro alone; then freeze the encoders, re-initialise
fusion + head, train them on gyro alone (erm[keep=gyro]) as the oracle is trained, score gyro alone again.

    python probe.py SPEC SEEDS ORACLE OUT

SEEDS: comma-separated; ORACLE: a ``compare --oracle`` folder of hapt with these seeds (its
oracle/gyro/seedS/eval.json is read); OUT: where the runs' logs go. One line per seed on stdout."""
import json
import os
import sys

import torch

from modalimmune.comparison import _train
from modalimmune.data import as_data, load_dataset
from modalimmune.eval.protocol import pattern_score
from modalimmune.train import TrainConfig, Trainer

torch.set_num_threads(1)
spec, seeds, oracle_dir, out_dir = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], sys.argv[3], sys.argv[4]
data = as_data(load_dataset("hapt", split_seed=0))
keep = [data.modalities.index("gyro")]
config = dict(epochs=10, progress=False)
for seed in seeds:
    run_dir = os.path.join(out_dir, spec, f"seed{seed}")
    model, _ = _train(data, spec, seed, run_dir, config, False)
    fused = pattern_score(model, data, keep, "test")
    for p in model.encoders.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    for m in list(model.fusion) + [model.classifier]:
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    Trainer(model, data, TrainConfig(**config, method="erm[keep=gyro]", seed=seed),
            out_dir=run_dir + "_probe", checkpoints=False, overwrite=True).fit()
    probed = pattern_score(model, data, keep, "test")
    with open(os.path.join(oracle_dir, "oracle", "gyro", f"seed{seed}", "eval.json")) as file:
        oracle = json.load(file)["score"]
    print(spec, seed, f"fused {fused:.4f} probed {probed:.4f} oracle {oracle:.4f}", flush=True)
