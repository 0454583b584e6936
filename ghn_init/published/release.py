"""What has been published: the GHN-2/GHN-3 files, where they live, what they were trained on, and their card.

Facts here come from the authors' repositories (``SamsungSAILMontreal/ghn3`` README, LICENSE and
``ghn3_results.json``; ``facebookresearch/ppuda`` README and ``ppuda/config.py``). Numbers the
authors reported are marked as theirs wherever they are shown.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["GHN3_REPO", "PUBLISHED_GHNS", "AUTHORS_RESULTS", "PublishedRelease", "data_config_for", "published_card"]

GHN3_REPO = "SamsungSAILMontreal/ghn3"
GHN3_PAPER = ("Knyazev, Hwang, Lacoste-Julien. Can We Scale Transformers to Predict Parameters of Diverse ImageNet "
              "Models? ICML 2023", "https://arxiv.org/abs/2303.04143")
GHN2_PAPER = ("Knyazev, Drozdzal, Taylor, Romero-Soriano. Parameter Prediction for Unseen Deep Architectures. "
              "NeurIPS 2021", "https://arxiv.org/abs/2110.13100")
_IMAGENET = {"dataset": "imagenet-1k", "num_classes": 1000, "input_size": [3, 224, 224],
             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bilinear",
             "crop_pct": 0.875}
_CIFAR10 = {"dataset": "cifar10", "num_classes": 10, "input_size": [3, 32, 32],
            "mean": [0.49139968, 0.48215827, 0.44653124], "std": [0.24703233, 0.24348505, 0.26158768],
            "interpolation": "bilinear", "crop_pct": 1.0}


@dataclasses.dataclass(frozen=True)
class PublishedRelease:
    """One published GHN file and the facts a card needs about it."""

    short_name: str
    title: str
    repo_id: str
    filename: str
    family: str          # "ghn2" or "ghn3"
    paper: tuple[str, str]
    license: str
    notes: str = ""


#: Short names accepted by ``ghn_init.load``: the Hub files of the GHN-3 repository.
PUBLISHED_GHNS: dict[str, PublishedRelease] = {
    r.short_name: r for r in (
        PublishedRelease("ghn3-t", "GHN-3-T/m8", GHN3_REPO, "ghn3tm8.pt", "ghn3", GHN3_PAPER, "mit",
                         "the smallest GHN-3 (about 27 MB, 6.9M parameters)"),
        PublishedRelease("ghn3-s", "GHN-3-S/m8", GHN3_REPO, "ghn3sm8.pt", "ghn3", GHN3_PAPER, "mit"),
        PublishedRelease("ghn3-l", "GHN-3-L/m8", GHN3_REPO, "ghn3lm8.pt", "ghn3", GHN3_PAPER, "mit"),
        PublishedRelease("ghn3-xl", "GHN-3-XL/m16", GHN3_REPO, "ghn3xlm16.pt", "ghn3", GHN3_PAPER, "mit",
                         "the best GHN-3 in the paper (about 2.5 GB)"),
        PublishedRelease("ghn2", "GHN-2 (ImageNet)", GHN3_REPO, "ghn2.pt", "ghn2", GHN2_PAPER, "mit",
                         "GHN-2 weights as the GHN-3 code base evaluates them"),
    )
}

#: ImageNet top-1 (%) reported by the GHN-3 authors (``ghn3_results.json`` of SamsungSAILMontreal/ghn3):
#: predicted weights with no training, and after 1 epoch of SGD from GHN-3-XL init or from random init.
AUTHORS_RESULTS: dict[str, dict[str, float]] = {
    "resnet50": {"ghn3-t": 10.442, "ghn3-xl": 19.996, "ghn2": 1.080, "ghn3-xl-sgd1ep": 43.69, "random-sgd1ep": 18.19},
    "resnet18": {"ghn3-t": 0.354, "ghn3-xl": 2.210, "ghn2": 0.308, "ghn3-xl-sgd1ep": 41.63, "random-sgd1ep": 22.39},
    "efficientnet_b0": {"ghn3-t": 0.114, "ghn3-xl": 0.124, "ghn2": 0.136, "ghn3-xl-sgd1ep": 22.83,
                        "random-sgd1ep": 24.64},
    "mobilenet_v3_large": {"ghn3-t": 0.160, "ghn3-xl": 0.136, "ghn2": 0.096, "ghn3-xl-sgd1ep": 18.39,
                           "random-sgd1ep": 23.93},
    "swin_t": {"ghn3-t": 0.120, "ghn3-xl": 0.100, "ghn2": 0.092, "ghn3-xl-sgd1ep": 19.20, "random-sgd1ep": 10.25},
    "vit_b_16": {"ghn3-t": 0.156, "ghn3-xl": 0.116, "ghn2": 0.100, "ghn3-xl-sgd1ep": 8.50, "random-sgd1ep": 11.06},
}


def data_config_for(num_classes: int) -> dict[str, Any]:
    """The data a published GHN was trained on, from its class count: ImageNet (1,000) or CIFAR-10 (10)."""
    return dict(_IMAGENET if num_classes >= 1000 else _CIFAR10)


def published_card(meta: dict[str, Any], network_config: dict[str, Any], code: str) -> str:
    """A Hub model card for a converted published GHN: provenance first, then use and the authors' results."""
    source = meta["source"]
    data = meta["data"]
    title = meta.get("title", meta["name"])
    paper_title, paper_url = meta["paper"]
    repo_line = (f"the Hub repo [`{source['repo_id']}`](https://huggingface.co/{source['repo_id']}), file "
                 f"`{source['filename']}`" if source.get("repo_id") else f"the file `{source['filename']}`")
    lines = [
        "---", "library_name: ghn-init", f"license: {meta.get('license', 'other')}", "tags:", "- graph-hypernetwork",
        "- parameter-prediction", f"datasets:\n- {data['dataset']}", "---", "",
        f"# {title}, converted for ghn-init", "",
        f"A graph hypernetwork published by its authors ({paper_title}, {paper_url}), converted to safetensors "
        "+ JSON by `ghn-init convert`. It predicts every weight of a network from its computational graph.", "",
        "## Provenance", "",
        f"- Original: {repo_line}, sha256 `{source['sha256']}` ({source['container']} format).",
        f"- Converted by ghn-init {meta.get('ghn_init', '')}: the tensors are bit-identical to the original file "
        "and predict bit-identical weights; loading needs no pickle.",
        f"- Trained by the authors on {data['dataset']} at {data['input_size'][1]}x{data['input_size'][2]} pixels, "
        f"{network_config['num_classes']} classes.",
        f"- Semantics: the `{code}` code base (graph builder, decoder crops and normalization follow it).",
        f"- License: {meta.get('license', 'see the original repository')} (the authors' code and weights).", "",
        "## Use", "", "```bash", "pip install ghn-init", "```", "", "```python", "import ghn_init, timm",
        f'ghn = ghn_init.load("{meta.get("load_ref", "path/to/this/folder")}")',
        'model = ghn_init.create_model("resnet50", ghn=ghn)',
        "```", "",
        "Not predicted (kept at the architecture's own init and reported by `ghn.apply_`): layer scales, "
        "relative-position bias tables and class tokens, as in the authors' code.", "",
        "## Results reported by the authors", "",
        "ImageNet top-1 (%) from `ghn3_results.json` in SamsungSAILMontreal/ghn3 (their numbers, not re-measured "
        "here): predicted weights before training, and after one epoch of SGD from GHN-3-XL or from random init.", "",
        "| torchvision model | GHN-3-T | GHN-3-XL | GHN-2 | 1 epoch from GHN-3-XL | 1 epoch from random |",
        "|---|---|---|---|---|---|",
    ]
    for model, r in AUTHORS_RESULTS.items():
        lines.append(f"| {model} | {r['ghn3-t']:.1f} | {r['ghn3-xl']:.1f} | {r['ghn2']:.1f} | "
                     f"{r['ghn3-xl-sgd1ep']:.1f} | {r['random-sgd1ep']:.1f} |")
    lines += ["", f"- GHN config (as the authors' loader infers it): `{network_config}`.", ""]
    if meta.get("notes"):
        lines += [f"Note: {meta['notes']}.", ""]
    return "\n".join(lines)
