"""ghn_init: predict weights for any timm architecture with a graph hypernetwork."""

from .ghn import GHN, GHNConfig, PredictionReport
from .graph import OP_TYPES, ArchGraph, GraphBuildError, build_graph
from .hub import GHNNotFoundError, content_hash, load
from .pretrained import create_model, pretrained_cfg

__version__ = "0.2.0"

__all__ = [
    "GHN", "GHNConfig", "GHNNotFoundError", "OP_TYPES", "ArchGraph", "GraphBuildError", "PredictionReport",
    "build_graph", "content_hash", "create_model", "load", "pretrained_cfg",
]
