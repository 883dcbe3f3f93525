"""Image+caption sources -> webdataset shards, and the one reader every training stage uses."""

from latentdiff.data.captions import class_prompt
from latentdiff.data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from latentdiff.data.reader import SkipCounter, make_loader, read_info, resolve_shards
from latentdiff.data.shards import SPLITS, Sample, write_info, write_split

__all__ = [
    "FASHION_MNIST_CLASSES",
    "SPLITS",
    "Sample",
    "SkipCounter",
    "class_prompt",
    "make_loader",
    "read_info",
    "resolve_shards",
    "write_info",
    "write_split",
]
