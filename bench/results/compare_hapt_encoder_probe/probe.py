"""Is the gyro encoder or the shared fusion/head what keeps gyro-alone below the oracle?
For each method and seed: train as compare does, score gyro alone; then freeze the encoders, re-initialise
fusion + head, train them on gyro alone (erm[keep=gyro]) as the oracle is trained, score gyro alone again."""
import json
import sys

import torch

from modalimmune.comparison import _train
from modalimmune.data import as_data, load_dataset
from modalimmune.eval.protocol import pattern_score

torch.set_num_threads(1)
spec, seeds = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
data = as_data(load_dataset("hapt", split_seed=0))
keep = [data.modalities.index("gyro")]
config = dict(epochs=10, progress=False)
out = {}
for seed in seeds:
    model, _ = _train(data, spec, seed, f"/tmp/exp/probe/{spec}/seed{seed}", config, False)
    fused = pattern_score(model, data, keep, "test")
    for p in model.encoders.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    for m in list(model.fusion) + [model.classifier]:
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    from modalimmune.train import TrainConfig, Trainer
    Trainer(model, data, TrainConfig(**config, method="erm[keep=gyro]", seed=seed),
            out_dir=f"/tmp/exp/probe/{spec}/seed{seed}_probe", checkpoints=False, overwrite=True).fit()
    probed = pattern_score(model, data, keep, "test")
    oracle = json.load(open(f"/tmp/exp/hapt_base/oracle/gyro/seed{seed}/eval.json"))["score"]
    out[seed] = dict(fused=fused, probed=probed, oracle=oracle)
    print(spec, seed, f"fused {fused:.4f} probed {probed:.4f} oracle {oracle:.4f}", flush=True)
json.dump(out, open(f"/tmp/exp/probe/{spec.replace('[','_').replace(']','')}.json", "w"))
