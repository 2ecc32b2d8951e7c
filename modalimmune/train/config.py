"""TrainConfig: every training setting, checked when it is made."""

import dataclasses
import math
from dataclasses import dataclass, field


def _int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"config.{name}: expected an int >= {low}, got {value!r}")


def _float(name, value, low, high=math.inf, low_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or value > high or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"config.{name}: expected a number in {bounds}, got {value!r}")


# Model selection and early stopping (docs/method_training.md, "Model selection"): "robust" on the
# mean of the validation figure with every modality and its mean over the missing patterns (every
# one for M <= 6, a fixed sample of VAL_PATTERNS above); "clean" on the first alone (which saturates
# early on easy data and then keeps an early epoch); "last" keeps the last epoch. A tie keeps the
# later epoch.
SELECTIONS = ("robust", "clean", "last")
VAL_PATTERNS = 62


@dataclass
class TrainConfig:
    """``method`` is a method name with optional options, ``"moddrop[p=0.3]"``
    (see :func:`modalimmune.methods.parse_method`)."""

    method: str = "erm"
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-2
    warmup_fraction: float = 0.05      # of all optimizer steps, then cosine decay to 0
    grad_accum: int = 1                # micro-batches per optimizer step
    max_grad_norm: float = 1.0         # 0: no clipping
    patience: int = 0                  # epochs without a better selection score before stopping; 0: never
    select: str = "robust"             # what "better" means (see SELECTIONS)
    seed: int = 0
    split_seed: int = 0
    bf16: str = "auto"                 # "auto" (CUDA with bf16 support), "on", "off"
    device: str = "auto"
    checkpoint_every: int = 0          # optimizer steps between checkpoints; 0: at the end of each epoch
    log_every: int = 10                # optimizer steps between JSONL step records
    progress: bool = True              # tqdm bar (also off when stderr is not a terminal)
    rec_weight: float = 0.0            # weight of the reconstruction loss of models that decode
    max_nonfinite_steps: int = 10      # non-finite steps in a row (each skipped) before training stops; 0: never
    model: str = "mlp"
    model_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"config.method: expected a method name, got {self.method!r}")
        for name in ("epochs", "batch_size", "grad_accum", "log_every"):
            _int(name, getattr(self, name), 1)
        for name in ("patience", "seed", "split_seed", "checkpoint_every", "max_nonfinite_steps"):
            _int(name, getattr(self, name), 0)
        _float("lr", self.lr, 0, low_open=True)
        _float("weight_decay", self.weight_decay, 0)
        _float("warmup_fraction", self.warmup_fraction, 0, 1)
        _float("max_grad_norm", self.max_grad_norm, 0)
        _float("rec_weight", self.rec_weight, 0)
        if self.select not in SELECTIONS:
            raise ValueError(f"config.select: expected one of {', '.join(map(repr, SELECTIONS))}, got {self.select!r}")
        if self.bf16 not in ("auto", "on", "off"):
            raise ValueError(f"config.bf16: expected 'auto', 'on' or 'off', got {self.bf16!r}")
        if not isinstance(self.progress, bool):
            raise ValueError(f"config.progress: expected True or False, got {self.progress!r}")
        if not isinstance(self.device, str):
            raise ValueError(f"config.device: expected a device name such as 'cpu' or 'cuda', got {self.device!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"config.model: expected a model name, got {self.model!r}")
        if not isinstance(self.model_options, dict):
            raise ValueError(f"config.model_options: expected a dict, got {type(self.model_options).__name__}")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        if not isinstance(values, dict):
            raise ValueError(f"config: expected a dict of fields, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"config: unknown fields {', '.join(sorted(unknown))}")
        return cls(**values)
