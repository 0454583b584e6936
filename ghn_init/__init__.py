"""ghn_init: predict weights for any timm architecture with a graph hypernetwork."""

__version__ = "0.4.0"  # before the imports: the prediction cache keys on it

from .batchnorm import calibrate_batchnorm
from .ghn import GHN, GHNConfig, PredictionReport
from .graph import OP_TYPES, ArchGraph, GraphBuildError, build_graph
from .hub import GHNNotFoundError, content_hash, load
from .pretrained import create_model, pretrained_cfg

__all__ = [
    "GHN", "GHNConfig", "GHNNotFoundError", "OP_TYPES", "ArchGraph", "GraphBuildError", "PredictionReport",
    "build_graph", "calibrate_batchnorm", "content_hash", "create_model", "load", "pretrained_cfg",
]
