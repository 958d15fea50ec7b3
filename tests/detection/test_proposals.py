"""Region proposals: selective search (OpenCV contrib) and the dependency-free grid, and their cache."""
import builtins
import importlib.util

import pytest
import torch
from torchvision.ops import box_iou

from cnnlab._errors import CnnlabError
from cnnlab.detection import proposals as P
from cnnlab.detection.proposals import ProposalConfig, RegionProposer, grid_proposals, image_key, selective_search

HAS_XIMGPROC = importlib.util.find_spec("cv2") is not None and hasattr(importlib.import_module("cv2"), "ximgproc")
needs_cv2 = pytest.mark.skipif(not HAS_XIMGPROC, reason="opencv-contrib-python-headless (cv2.ximgproc) not installed")


def _drawn_image(height=96, width=128, box=(30, 20, 90, 70)):
    """A textured grey background with one flat red rectangle: selective search must find the rectangle."""
    g = torch.Generator().manual_seed(0)
    image = 0.35 + 0.05 * torch.rand(3, height, width, generator=g)
    x1, y1, x2, y2 = box
    image[:, y1:y2, x1:x2] = torch.tensor([0.85, 0.15, 0.1])[:, None, None]
    return image, torch.tensor([box], dtype=torch.float32)


def _inside(boxes, height, width):
    return bool(((boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= width) & (boxes[:, 3] <= height)
                 & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all())


@pytest.mark.parametrize("size", [(64, 64), (96, 128), (37, 200)])
@pytest.mark.parametrize("max_proposals", [1, 50, 2000])
def test_grid_inside_image_and_bounded(size, max_proposals):
    boxes = grid_proposals(size, max_proposals=max_proposals)
    assert boxes.dtype == torch.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert 1 <= boxes.shape[0] <= max_proposals
    assert _inside(boxes, *size)
    assert torch.unique(boxes, dim=0).shape[0] == boxes.shape[0]  # no duplicates


def test_grid_covers_boxes_of_the_listed_shapes():
    """The docstring's bound: every box of a listed scale and ratio inside the image has a window with IoU >= 0.62."""
    height, width, scales, ratios = 64, 64, (0.25, 0.5), (0.5, 1.0, 2.0)
    boxes = grid_proposals((height, width), scales, ratios, step=0.25, max_proposals=10_000)
    g = torch.Generator().manual_seed(1)
    for s in scales:
        for r in ratios:
            w, h = s * 64 / r**0.5, s * 64 * r**0.5
            x0 = torch.rand(50, generator=g) * (width - w)
            y0 = torch.rand(50, generator=g) * (height - h)
            targets = torch.stack((x0, y0, x0 + w, y0 + h), 1)
            assert box_iou(targets, boxes).max(1).values.min() >= 0.62 - 1e-4


def test_grid_bad_arguments():
    with pytest.raises(CnnlabError, match="positive scales"):
        grid_proposals((32, 32), scales=(0.0,))
    with pytest.raises(CnnlabError, match="step"):
        grid_proposals((32, 32), step=2.0)
    with pytest.raises(CnnlabError, match="height, width"):
        grid_proposals((0, 32))


@needs_cv2
@pytest.mark.parametrize("mode", ["fast", "quality"])
def test_selective_search_finds_a_drawn_rectangle(mode):
    image, box = _drawn_image()
    boxes = selective_search(image, mode=mode, max_proposals=2000)
    assert boxes.dtype == torch.float32 and 1 <= boxes.shape[0] <= 2000
    assert _inside(boxes, 96, 128)
    assert box_iou(box, boxes).max() > 0.7
    few = selective_search(image, mode=mode, max_proposals=3)
    assert few.shape[0] <= 3
    torch.testing.assert_close(few, boxes[: few.shape[0]])  # the first boxes of OpenCV's (seeded) ranking
    torch.testing.assert_close(selective_search(image, mode=mode, seed=3), selective_search(image, mode=mode, seed=3))


@needs_cv2
def test_selective_search_on_a_shrunk_image_maps_boxes_back():
    image, box = _drawn_image(192, 256, (60, 40, 180, 140))
    boxes = selective_search(image, max_side=128)
    assert _inside(boxes, 192, 256)
    assert box_iou(box, boxes).max() > 0.7


def test_missing_cv2_says_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_cv2(name, *args, **kwargs):
        if name == "cv2" or name.startswith("cv2."):
            raise ImportError("No module named 'cv2'")
        return real_import(name, *args, **kwargs)

    real_import_module = importlib.import_module
    monkeypatch.setattr(builtins, "__import__", no_cv2)
    monkeypatch.setattr(P.importlib, "import_module",
                        lambda name, *a: no_cv2(name) if name == "cv2" else real_import_module(name, *a))
    with pytest.raises(CnnlabError, match=r"pip install opencv-contrib-python-headless"):
        selective_search(torch.rand(3, 32, 32))
    # the grid needs nothing, and a proposer of selective search is built without importing cv2
    assert RegionProposer("grid")(torch.rand(3, 32, 32)).shape[0] >= 1
    with pytest.raises(CnnlabError, match="pip install"):
        RegionProposer("selective_search_quality")(torch.rand(3, 32, 32))


def test_opencv_without_contrib_says_what_to_install(monkeypatch):
    class PlainCv2:
        __version__ = "4.9.0"

    real_import_module = importlib.import_module
    monkeypatch.setattr(P.importlib, "import_module",
                        lambda name, *a: PlainCv2() if name == "cv2" else real_import_module(name, *a))
    with pytest.raises(CnnlabError, match="no ximgproc.*opencv-contrib-python-headless"):
        selective_search(torch.rand(3, 32, 32))


def test_proposer_cache_computes_each_image_once(monkeypatch):
    calls = []
    real = P.grid_proposals
    monkeypatch.setattr(P, "grid_proposals", lambda *a, **k: calls.append(1) or real(*a, **k))
    proposer = RegionProposer({"method": "grid", "max_proposals": 100})
    a, b = torch.rand(3, 40, 48), torch.rand(3, 40, 48)
    for _ in range(3):  # three "epochs"
        first, _ = proposer(a), proposer(b)
    assert len(calls) == 2 and proposer.misses == 2 and proposer.hits == 4
    torch.testing.assert_close(first, real((40, 48), max_proposals=100))
    assert image_key(a) != image_key(b) and image_key(a) == image_key(a.clone())
    # a flipped (augmented) copy is another image
    proposer(a.flip(-1))
    assert len(calls) == 3
    # bounded cache: the oldest entry goes
    small = RegionProposer(ProposalConfig(method="grid", cache_size=1))
    small(a), small(b)
    assert list(small.cache) == [image_key(b)]
    # a saved cache is reused
    again = RegionProposer("grid", cache=dict(proposer.cache))
    again(a)
    assert again.hits == 1 and again.misses == 0
    # precompute over a loader's (images, targets) batches, or over plain images
    ahead = RegionProposer("grid")
    ahead.precompute([([a, b], [{}, {}]), [a.flip(-1)]])
    assert ahead.misses == 3 and len(ahead.cache) == 3
    ahead(b)
    assert ahead.hits == 1
    # no cache: computed every time
    uncached = RegionProposer(ProposalConfig(method="grid", cache=False))
    uncached(a), uncached(a)
    assert len(uncached.cache) == 0


def test_proposal_config_parsing():
    assert ProposalConfig.of("grid").method == "grid"
    assert ProposalConfig.of(None).method == "selective_search_fast"
    assert ProposalConfig.of({"method": "grid", "grid_scales": [0.5]}).grid_scales == (0.5,)
    with pytest.raises(CnnlabError, match="unknown proposal method"):
        ProposalConfig.of("edge_boxes")
    with pytest.raises(CnnlabError, match="unknown ProposalConfig fields"):
        ProposalConfig.of({"methd": "grid"})
    with pytest.raises(CnnlabError, match=r"\(3, H, W\)"):
        RegionProposer("grid")(torch.rand(32, 32))
