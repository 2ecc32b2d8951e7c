"""Datasets: packaged real data (mfeat, avdigits), .npz files and user tensors."""

from .dataset import SPLITS, Batch, ModalitySpec, MultimodalDataset, stratified_split
from .sources import DATASETS, load_avdigits, load_dataset, load_mfeat

__all__ = ["SPLITS", "Batch", "ModalitySpec", "MultimodalDataset", "stratified_split", "DATASETS",
           "load_avdigits", "load_dataset", "load_mfeat"]
