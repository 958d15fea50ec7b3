"""Fine-tuning a segmenter with an auxiliary head to another class count: model.weights=FILE loads everything but the
class-dependent layers (the main classifier and the auxiliary one), which keep their fresh initialisation."""
from __future__ import annotations

import pytest
import torch

import cnnlab
from cnnlab._errors import CnnlabError
from cnnlab.engine.tasks._model import load_model_weights


@pytest.mark.parametrize("name", ["deeplabv3", "fcn", "pspnet"])
def test_aux_models_load_weights_of_another_class_count(name, tmp_path):
    from safetensors.torch import save_file

    if name not in cnnlab.list_models(task="segmentation"):
        pytest.skip(f"no {name} registered")
    torch.manual_seed(0)
    source = cnnlab.create_model(name, backbone="resnet18", num_classes=5, aux_loss=True).state_dict()
    save_file({k: v.contiguous() for k, v in source.items()}, tmp_path / "w.safetensors")
    torch.manual_seed(1)
    target = cnnlab.create_model(name, backbone="resnet18", num_classes=3, aux_loss=True)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    load_model_weights(target, tmp_path / "w.safetensors", name, default_head="fc")
    loaded = target.state_dict()
    changed = {k for k in source if source[k].shape != loaded[k].shape}
    assert any(k.startswith("aux_head.") for k in changed) and any(k.startswith("head.") for k in changed)
    for key, value in loaded.items():
        torch.testing.assert_close(value, fresh[key] if key in changed else source[key], rtol=0, atol=0)


def test_a_mismatch_outside_the_heads_is_still_refused(tmp_path):
    from safetensors.torch import save_file

    if "deeplabv3" not in cnnlab.list_models(task="segmentation"):
        pytest.skip("no deeplabv3 registered")
    source = cnnlab.create_model("deeplabv3", backbone="resnet18", num_classes=3, aux_loss=True).state_dict()
    key = next(k for k in source if k.startswith("encoder.") and k.endswith("weight") and source[k].ndim == 4)
    source[key] = torch.zeros(1, *source[key].shape[1:])
    save_file({k: v.contiguous() for k, v in source.items()}, tmp_path / "w.safetensors")
    target = cnnlab.create_model("deeplabv3", backbone="resnet18", num_classes=3, aux_loss=True)
    with pytest.raises(CnnlabError, match="does not fit"):
        load_model_weights(target, tmp_path / "w.safetensors", "deeplabv3", default_head="fc")
