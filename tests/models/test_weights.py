"""load_weights and create_model(weights=...): files, layouts, errors, offline downloads."""
from __future__ import annotations

import pytest
import torch

import cnnlab
from cnnlab import CnnlabError
from cnnlab.models import weights as weights_mod


def _model():
    torch.manual_seed(1)
    return cnnlab.create_model("simple_cnn_bn")


def test_roundtrip_safetensors_and_torch_file(tmp_path):
    from safetensors.torch import save_file

    src = _model()
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        dst = cnnlab.create_model("simple_cnn_bn")
        result = cnnlab.load_weights(dst, tmp_path / f)
        assert result.ok and result.layout == "cnnlab"
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v)


def test_ddp_prefix_is_stripped():
    src = _model()
    dst = cnnlab.create_model("simple_cnn_bn")
    assert cnnlab.load_weights(dst, {f"module.{k}": v for k, v in src.state_dict().items()}).ok


def test_missing_and_unexpected_keys_are_named():
    sd = _model().state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["fc.bias"]
    with pytest.raises(CnnlabError, match=r"missing \(1\): fc.bias(.|\n)*unexpected \(1\): extra.weight"):
        cnnlab.load_weights(cnnlab.create_model("simple_cnn_bn"), sd)
    result = cnnlab.load_weights(cnnlab.create_model("simple_cnn_bn"), sd, strict=False)
    assert result.missing == ["fc.bias"] and result.unexpected == ["extra.weight"]


def test_shape_mismatch_named_and_skipped_when_not_strict():
    sd = _model().state_dict()
    dst = cnnlab.create_model("simple_cnn_bn", num_classes=3)
    with pytest.raises(CnnlabError, match="fc.weight: file"):
        cnnlab.load_weights(dst, sd)
    result = cnnlab.load_weights(dst, sd, strict=False)
    assert sorted(m.split(":")[0] for m in result.mismatched) == ["fc.bias", "fc.weight"]
    assert torch.equal(dst.state_dict()["stages.0.0.conv.weight"], sd["stages.0.0.conv.weight"])


class NotTensors:
    """A pickled class: weights_only loading must refuse it."""


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"state_dict": NotTensors()}, tmp_path / "evil.pth")
    with pytest.raises(CnnlabError, match="weights_only"):
        cnnlab.load_weights(_model(), tmp_path / "evil.pth")


def test_corrupt_and_missing_files(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CnnlabError, match="not a readable safetensors"):
        cnnlab.load_weights(_model(), tmp_path / "bad.safetensors")
    with pytest.raises(CnnlabError, match="not found"):
        cnnlab.load_weights(_model(), tmp_path / "nope.pth")


@pytest.mark.parametrize("content", [b"hello, these are not weights\n", b'{"fc.weight": [1, 2]}', b""])
def test_a_file_of_another_format_says_what_is_expected(tmp_path, content):
    # torch.load(weights_only=True) of a text file raised a bare "KeyError: 101" (101 = ord("e"))
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(CnnlabError, match=r"neither a safetensors nor a torch file.*safetensors file or a torch file"
                                          r".*weights_only=True") as err:
        cnnlab.load_weights(_model(), path)
    assert "KeyError" not in str(err.value)


def test_safetensors_content_is_read_whatever_the_suffix(tmp_path):
    from safetensors.torch import save_file

    model = _model()
    save_file(model.state_dict(), str(tmp_path / "weights.bin"))
    assert cnnlab.load_weights(_model(), tmp_path / "weights.bin").ok


def test_weights_path_in_create_model(tmp_path):
    src = _model()
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = cnnlab.create_model("simple_cnn_bn", weights=str(tmp_path / "w.pt"))
    assert torch.equal(dst.fc.weight, src.fc.weight)


def test_unknown_weights_source():
    with pytest.raises(CnnlabError, match="expected one of torchvision, timm or a path"):
        cnnlab.create_model("simple_cnn", weights="imagenet")


def test_no_pretrained_for_model():
    with pytest.raises(CnnlabError, match="no 'torchvision' pretrained weights"):
        cnnlab.create_model("simple_cnn", weights="torchvision")


def test_offline_download_fails_clearly(monkeypatch):
    """A download that cannot reach the network ends in a message that says what to do."""
    import urllib.error

    from cnnlab.models.registry import Family, ModelInfo

    info = ModelInfo(name="fake", family=Family("Fake", "paper", 2020), builder=lambda **kw: None,
                     pretrained={"torchvision": "resnet18"})

    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(CnnlabError, match="could not download torchvision weights 'resnet18'.*network access.*weights='/path/to/file'"):
        weights_mod.download_pretrained(info, "torchvision")


def test_rgb_weights_adapt_to_other_input_channels():
    """Pretrained RGB filters load into a 1- or 5-channel model; a grey image gives the same response."""
    torch.manual_seed(0)
    rgb = cnnlab.create_model("simple_cnn_bn", in_channels=3).eval()
    grey = cnnlab.create_model("simple_cnn_bn", in_channels=1).eval()
    result = cnnlab.load_weights(grey, rgb.state_dict())
    assert result.ok and result.adapted == ["stages.0.0.conv.weight"]
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(grey(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-5)
    five = cnnlab.create_model("simple_cnn_bn", in_channels=5).eval()
    cnnlab.load_weights(five, rgb.state_dict())
    w_rgb, w_five = rgb.stages[0][0].conv.weight, five.stages[0][0].conv.weight
    assert torch.allclose(w_five[:, :3], w_rgb * 3 / 5) and torch.allclose(w_five[:, 3:], w_rgb[:, :2] * 3 / 5)


def test_pretrained_torchvision_path_converts_and_replaces_head(monkeypatch):
    """weights='torchvision' fetches through torchvision's own mechanism, converts, loads; a new head
    is fitted for num_classes != 1000. The download is replaced by a random torchvision model."""
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    asked = []

    def fake_get_state_dict(self, *args, **kwargs):
        asked.append(str(self))
        return reference.state_dict()

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fake_get_state_dict)
    model = cnnlab.create_model("resnet18", weights="torchvision").eval()
    assert asked == ["ResNet18_Weights.IMAGENET1K_V1"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5)
    small = cnnlab.create_model("resnet18", weights="torchvision", num_classes=10).eval()
    assert small.num_classes == 10 and small(x).shape == (1, 10)
    with torch.no_grad():  # the backbone is the pretrained one
        assert torch.allclose(small.forward_features(x), model.forward_features(x), atol=1e-5)
