"""The input size predicted folders are traced at and written with (timm builds fixed-size models from it)."""

import logging

import pytest

from ghn_init.export import create_meta_model, input_size_for


@pytest.mark.parametrize(("name", "size"), [
    ("resnet18", (3, 32, 32)),                   # runs at the GHN's training size
    ("crossvit_9_240", (3, 240, 240)),           # fixed-size; its patch embeddings are a list
    ("coat_lite_tiny", (3, 224, 224)),           # fixed-size, no top-level patch_embed
])
def test_input_size_is_the_ghns_or_the_fixed_models_own(default_ghn, name, size):
    model, _ = create_meta_model(name, num_classes=10)
    assert input_size_for(model, default_ghn, None) == size


def test_models_that_cannot_run_at_the_ghns_size_use_their_own(default_ghn, caplog):
    model, _ = create_meta_model("inception_v3", num_classes=10)
    with caplog.at_level(logging.WARNING, logger="ghn_init.export"):
        assert input_size_for(model, default_ghn, None) == (3, 299, 299)
    assert "inception_v3 does not run at the GHN's 32x32 inputs" in caplog.text
    assert input_size_for(model, default_ghn, 96) == (3, 96, 96)  # an explicit size is kept
