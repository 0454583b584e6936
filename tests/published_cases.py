"""The reference fixtures' cases for the published GHNs: how each target model was built, and the tensor check.

Shared by the graph, network and end-to-end tests so that all three replay exactly the same cases.
"""

from __future__ import annotations

import math

import timm
import torch
import torchvision
from torch import nn

RTOL = 1e-4

# Every case the authors' code ran without error (``status: ok``) among the published fixture models.
_GHN3_CASES = [("torchvision", m) for m in ("resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0",
                                             "convnext_tiny", "vit_b_16")]
_GHN3_CASES += [("timm", "resnet50"), ("timm", "swin_tiny_patch4_window7_224")]
_PPUDA_CASES = [("torchvision", m) for m in ("resnet18", "resnet50", "mobilenet_v3_small", "convnext_tiny")]
CASES = ([("ghn3-tm8-random", *c) for c in _GHN3_CASES]
         + [("ghn2-imagenet-random.ghn3code", *c) for c in _GHN3_CASES]
         + [("ghn2-imagenet-random", *c) for c in [*_PPUDA_CASES, ("timm", "resnet50")]]
         + [("ghn2-cifar10-random", *c) for c in _PPUDA_CASES])

# run -> (checkpoint file, code, graph builder key in graphs/*.json, classes)
RUNS = {
    "ghn3-tm8-random": ("ghn3-tm8-random.joblib", "ghn3", "ghn3", 1000),
    "ghn2-imagenet-random.ghn3code": ("ghn2-imagenet-random.pt", "ghn3", "ghn3", 1000),
    "ghn2-imagenet-random": ("ghn2-imagenet-random.pt", "ppuda", "ppuda-imagenet", 1000),
    "ghn2-cifar10-random": ("ghn2-cifar10-random.pt", "ppuda", "ppuda-cifar10", 10),
}


def adjust_for_cifar(model: nn.Module) -> nn.Module:
    """What ppuda's ``adjust_net`` does to the fixtures' torchvision models for 32x32 inputs: a ResNet's
    stem becomes the centre 3x3 of its 7x7 conv at stride 1 without max-pool; MobileNet's first
    blocks and ConvNeXt's stem lose their stride (no parameter changes)."""
    model.expected_input_sz = 32
    if isinstance(model, torchvision.models.ResNet):
        conv = model.conv1
        conv.weight = nn.Parameter(conv.weight.data[:, :, 2:-2, 2:-2])
        conv.kernel_size, conv.padding, conv.stride = (3, 3), (1, 1), (1, 1)
        model.maxpool = nn.Identity()
    elif isinstance(model, torchvision.models.MobileNetV3):
        for module in model.features[:5].modules():
            if isinstance(module, nn.Conv2d):
                module.stride = (1, 1)
    elif isinstance(model, torchvision.models.ConvNeXt):
        model.features[0][0].stride = (1, 1)
    else:
        raise NotImplementedError(type(model).__name__)
    return model


def fixture_model(source: str, name: str, num_classes: int, cifar: bool, device: str = "cpu") -> nn.Module:
    """The target model as the fixture generator built it: ``torch.manual_seed(0)``, then the constructor."""
    torch.manual_seed(0)
    if source == "timm":
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, device=device)
    else:
        with torch.device(device):
            model = getattr(torchvision.models, name)(num_classes=num_classes)
    return adjust_for_cifar(model) if cifar else model


def _close(value: float, reference: float, scale: float) -> bool:
    return abs(value - reference) <= RTOL * max(abs(reference), scale)


def check_tensor(name: str, tensor: torch.Tensor, ref: dict) -> None:
    """Statistics and the sampled values within relative 1e-4. A signed sum can cancel, so it is judged
    against the sum of magnitudes, and each value against the tensor's RMS as well as itself."""
    assert list(tensor.shape) == ref["shape"], name
    w = tensor.double().flatten()
    rms = math.sqrt(ref["sum_sq"] / ref["numel"])
    assert _close(w.sum().item(), ref["sum"], ref["sum_abs"]), (name, "sum", w.sum().item(), ref["sum"])
    assert _close(w.square().sum().item(), ref["sum_sq"], 0.0), (name, "sum_sq")
    assert _close(w.abs().sum().item(), ref["sum_abs"], 0.0), (name, "sum_abs")
    values = w[ref["positions"]].tolist()
    bad = [(p, v, r) for p, v, r in zip(ref["positions"], values, ref["values"]) if not _close(v, r, rms)]
    assert not bad, (name, bad[:3])


def check_prediction(state: dict[str, torch.Tensor], ref: dict) -> None:
    """Every tensor the authors' code predicted, as it predicted it (ghn3's random class-token row aside)."""
    for entry in ref["predicted"]:
        tensor = state[entry["name"]]
        if "random_part" in entry:  # ghn3's class-token row comes from the RNG; the rest must match
            assert list(tensor.shape) == entry["shape"]
            tensor, entry = tensor[:, 1:, :], entry["random_part"]["deterministic_part"]
        check_tensor(entry["name"], tensor, entry)
