"""Datasets: packaged real data (mfeat, avdigits, hapt, reviews), .npz files and user tensors."""

from .dataset import SPLITS, TASKS, Batch, ModalitySpec, MultimodalDataset, stratified_split
from .hapt import load_hapt
from .reviews import load_reviews
from .sources import DATASETS, load_avdigits, load_dataset, load_mfeat

__all__ = ["SPLITS", "TASKS", "Batch", "ModalitySpec", "MultimodalDataset", "stratified_split", "DATASETS",
           "load_avdigits", "load_dataset", "load_hapt", "load_mfeat", "load_reviews"]
