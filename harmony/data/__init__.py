"""Datasets, non-IID partitions and client-specific test sets, read from local files only."""

from harmony.data.arrays import ImageArrays
from harmony.data.datasets import (
    DATASET_NAMES,
    Dataset,
    DatasetNotFoundError,
    clear_dataset_cache,
    load_dataset,
)
from harmony.data.partition import (
    OODTestSet,
    OutOfClientTestSet,
    dirichlet_partition,
    ood_test_sets,
    out_of_client_test_sets,
    shard_partition,
)

__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "DatasetNotFoundError",
    "ImageArrays",
    "OODTestSet",
    "OutOfClientTestSet",
    "clear_dataset_cache",
    "dirichlet_partition",
    "load_dataset",
    "ood_test_sets",
    "out_of_client_test_sets",
    "shard_partition",
]
