"""ghn_init: predict weights for any timm architecture with a graph hypernetwork."""

__version__ = "0.4.0"  # before the imports: the prediction cache keys on it

from . import timm_hook
from .batchnorm import calibrate_batchnorm
from .ghn import GHN, GHNConfig, PredictionReport
from .graph import OP_TYPES, ArchGraph, GraphBuildError, build_graph
from .hub import GHNNotFoundError, content_hash, load
from .pretrained import create_model, pretrained_cfg
from .timm_hook import TimmHookError

# timm.create_model(name, pretrained_cfg=ghn_init), or pretrained_cfg=a GHN: see ghn_init.timm_hook.
timm_hook.register()
__getattr__ = timm_hook.missing_module_attribute  # PEP 562: says what to call when timm reads it as a cfg

__all__ = [
    "GHN", "GHNConfig", "GHNNotFoundError", "OP_TYPES", "ArchGraph", "GraphBuildError", "PredictionReport",
    "TimmHookError", "build_graph", "calibrate_batchnorm", "content_hash", "create_model", "load", "pretrained_cfg",
]
