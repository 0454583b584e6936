"""Checks against the real published GHN-3 files, for users who can reach the Hub.

Skipped offline (CI sets ``HF_HUB_OFFLINE=1``); run with ``HF_HUB_OFFLINE=0 pytest -m network``.
The reference values are the authors' parameter norms of predicted torchvision models
(``published-norms.json`` in the reference fixtures, from ``ghn3_results.json``), computed as their
``norm_check`` does: the L2 norm over every parameter tensor after prediction.
"""

import json

import pytest
import torch

import ghn_init

pytestmark = [pytest.mark.network, pytest.mark.fixtures]

_NORM_KEYS = {"ghn3-t": "ghn3-t-paramnorm", "ghn3-xl": "ghn3-paramnorm", "ghn2": "ghn2-paramnorm"}


@pytest.mark.parametrize("short_name", ["ghn3-t", "ghn2"])
@pytest.mark.parametrize("model_name", ["resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0",
                                        "regnet_y_400mf", "convnext_tiny", "swin_t", "vit_b_16"])
def test_parameter_norms_match_the_authors(reference_fixtures, short_name, model_name):
    import torchvision

    published = json.loads((reference_fixtures / "published-norms.json").read_text())["values"]
    ghn = ghn_init.load(short_name)
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)()
    ghn.apply_(model)
    total = torch.norm(torch.stack([p.norm() for p in model.parameters()]), 2).item()
    # the authors' own check accepts 1e-2; tensors they do not predict keep a random init, hence a looser bound there
    assert total == pytest.approx(published[model_name][_NORM_KEYS[short_name]], abs=1e-2, rel=1e-3)
