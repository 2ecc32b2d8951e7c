"""Datasets: packaged real data (mfeat, avdigits, hapt, reviews), .npz files, user tensors, a user's torch
Datasets and streams of dict samples, and memory-mapped folders -- all behind one interface, MultimodalData."""

from .base import SPLITS, TASKS, Batch, ModalitySpec, MultimodalData
from .collate import collate
from .dataset import MultimodalDataset, stratified_split
from .hapt import load_hapt
from .memmap import MemmapDataset, save_memmap_dataset
from .reviews import load_reviews
from .sources import DATASETS, load_avdigits, load_dataset, load_mfeat
from .user import SampleDataset, SampleStream, as_data

__all__ = ["SPLITS", "TASKS", "Batch", "ModalitySpec", "MultimodalData", "MultimodalDataset", "SampleDataset",
           "SampleStream", "MemmapDataset", "as_data", "collate", "save_memmap_dataset", "stratified_split",
           "DATASETS", "load_avdigits", "load_dataset", "load_hapt", "load_mfeat", "load_reviews"]
