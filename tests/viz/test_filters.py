"""The notes' line filters and their feature maps, sample images, learned first-layer filters."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.data.samples import load_image_or_sample, sample_images
from cnnlab.models import create_model
from cnnlab.viz import apply_filters, first_layer_filters, line_filters, plot_filter_responses, plot_first_layer_filters


@pytest.fixture(scope="module")
def samples():
    return sample_images()


def test_sample_images_are_the_sklearn_photos(samples):
    from sklearn.datasets import load_sample_image

    assert sorted(samples) == ["china", "flower"]
    for name, image in samples.items():
        assert image.dtype == torch.uint8 and image.shape == (3, 427, 640)
        assert np.array_equal(image.permute(1, 2, 0).numpy(), load_sample_image(f"{name}.jpg"))


def test_sample_spec_converts_and_resizes_and_names_unknown_samples():
    grey = load_image_or_sample("sample:flower", channels=1, size=(32, 48))
    assert grey.shape == (1, 32, 48) and grey.dtype == torch.uint8
    assert load_image_or_sample("sample:china.jpg").shape == (3, 427, 640)
    with pytest.raises(CnnlabError, match="unknown sample image 'chin'.*did you mean china"):
        load_image_or_sample("sample:chin")


def test_line_filters_are_the_notes_numpy_filters():
    channels = 3
    filters = np.zeros(shape=(7, 7, channels, 2), dtype=np.float32)  # the notes, verbatim
    filters[:, 3, :, 0] = 1
    filters[3, :, :, 1] = 1
    ours = line_filters(7, channels)
    assert ours.shape == (2, 3, 7, 7)
    assert np.array_equal(ours.numpy(), filters.transpose(3, 2, 0, 1))  # TF (H, W, Cin, Cout) -> torch (Cout, Cin, H, W)


def test_vertical_filter_response_is_the_hand_sum_over_the_column(samples):
    image = samples["china"]
    maps = apply_filters(image, line_filters())  # (1, 2, H, W)
    assert maps.shape == (1, 2, 427, 640)
    x = image.double() / 255
    for r, c in [(100, 200), (0, 0), (426, 639), (3, 5), (250, 320)]:
        rows = slice(max(r - 3, 0), r + 4)  # 'same' zero padding: rows outside the image add nothing
        vertical = x[:, rows, c].sum().item()  # the 7-pixel column through (r, c) x 3 channels
        horizontal = x[:, r, max(c - 3, 0):c + 4].sum().item()
        assert maps[0, 0, r, c].item() == pytest.approx(vertical, abs=1e-4)
        assert maps[0, 1, r, c].item() == pytest.approx(horizontal, abs=1e-4)


def test_filter_maps_match_scipy_correlate(samples):
    signal = pytest.importorskip("scipy.signal")
    image = samples["flower"][:, ::4, ::4].contiguous()  # quarter size keeps it fast
    filters = line_filters()
    x = image.double().numpy() / 255
    maps = apply_filters(image, filters)[0].double().numpy()
    for f in range(2):
        expected = sum(signal.correlate2d(x[c], filters[f, c].double().numpy(), mode="same") for c in range(3))
        assert np.abs(maps[f] - expected).max() < 1e-4


def test_vertical_stripes_light_up_the_vertical_filter_only():
    image = torch.zeros(3, 32, 32)
    image[:, :, 16] = 1.0  # one vertical line, one pixel wide
    maps = apply_filters(image, line_filters())[0]
    assert maps[0, 10, 16] == 21  # 7 pixels x 3 channels, all on the line
    assert maps[1, 10, 16] == 3  # the horizontal filter crosses the line in one pixel per channel
    assert maps[0].max() == 21 and maps[1].max() == 3
    transposed = apply_filters(image.transpose(1, 2), line_filters())[0]
    assert transposed[1].max() == 21 and transposed[0].max() == 3


def test_apply_filters_names_a_channel_mismatch():
    with pytest.raises(CnnlabError, match="3 input channels, the images have 1"):
        apply_filters(torch.zeros(1, 1, 8, 8), line_filters())


def test_filter_figure_and_first_layer_filters(tmp_path, samples):
    images = [samples["china"][:, ::8, ::8], samples["flower"][:, ::8, ::8]]
    maps = [apply_filters(i, line_filters())[0] for i in images]
    path = plot_filter_responses(tmp_path / "f.png", images, maps, ["china", "flower"], filters=line_filters())
    assert path.read_bytes()[:4] == b"\x89PNG"
    model = create_model("lenet5")
    weights = first_layer_filters(model)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert torch.equal(weights, first.weight.detach())
    assert plot_first_layer_filters(tmp_path / "k.png", model, "lenet5").stat().st_size > 1000
    with pytest.raises(CnnlabError, match="no Conv2d"):
        first_layer_filters(nn.Linear(2, 2))


def test_missing_scikit_learn_names_the_extra(monkeypatch):
    import sys

    from cnnlab.data import samples as S

    S._load_samples.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes `from sklearn.datasets import ...` fail
    try:
        with pytest.raises(CnnlabError, match=r"pip install cnnlab\[data\]"):
            sample_images()
    finally:
        S._load_samples.cache_clear()
