"""Datasets and the partitioners that split them among clients."""

from fedpeft.data.local import DataColumns, is_dataset_file, load_local_dataset
from fedpeft.data.partition import available_partitioners, label_histogram, partition_indices
from fedpeft.data.registry import available_datasets, load_dataset, register_dataset
from fedpeft.data.rotten_tomatoes import load_rotten_tomatoes
from fedpeft.data.types import TextClassificationData

__all__ = [
    "DataColumns",
    "TextClassificationData",
    "available_datasets",
    "available_partitioners",
    "is_dataset_file",
    "label_histogram",
    "load_dataset",
    "load_local_dataset",
    "load_rotten_tomatoes",
    "partition_indices",
    "register_dataset",
]
