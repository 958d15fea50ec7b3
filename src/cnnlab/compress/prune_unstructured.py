"""Unstructured magnitude pruning (layer-wise or global), made permanent, and an honest sparsity report.

``torch.nn.utils.prune`` zeroes the smallest-|w| weights through a mask (``weight_orig * weight_mask``);
:func:`make_permanent` folds the mask in (``prune.remove``), so the state_dict holds plain ``weight``
tensors with zeros in them and loads into an unpruned model of the same architecture. The zeros do not
make dense storage or dense kernels any smaller or faster: :class:`SparsityReport` gives the dense bytes
beside what two sparse formats would take.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from cnnlab._errors import CnnlabError, did_you_mean

PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)  # the layers whose weights are pruned (not norms, not biases)
SCOPES = ("layer", "global")
INDEX_BYTES = 4  # int32 column indices and row pointers of CSR


def check_amount(amount: float, what: str = "pruning amount") -> float:
    """``amount`` as a float in [0, 1) (the fraction removed), else a CnnlabError naming it."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount) \
            or not 0 <= amount < 1:
        raise CnnlabError(f"{what} must be a fraction in [0, 1) (0.5 removes half), got {amount!r}")
    return float(amount)


def select_layers(model: nn.Module, layers: Sequence[str] | None = None,
                  ignored: Sequence[str] = ()) -> dict[str, nn.Module]:
    """The conv/linear modules to prune, by name: ``layers`` (default: all of them) minus ``ignored``.

    A name may be a container (``layer4``): every conv/linear inside it is meant.
    """
    named = dict(model.named_modules())
    prunable = {n: m for n, m in named.items() if isinstance(m, PRUNABLE) and n}

    def expand(names: Sequence[str], flag: str) -> set[str]:
        out: set[str] = set()
        for name in names:
            if name not in named or not name:
                raise CnnlabError(f"{flag} names {name!r}, which is not a layer of {type(model).__name__}"
                                  f"{did_you_mean(name, [n for n in named if n])}; expected module names as in "
                                  "model.named_modules() (e.g. layer1.0.conv1)")
            inside = {n for n in prunable if n == name or n.startswith(name + ".")}
            if not inside:
                raise CnnlabError(f"{flag} names {name!r} ({type(named[name]).__name__}), which holds no conv or "
                                  "linear layer; only those are pruned")
            out |= inside
        return out

    chosen = expand(layers, "layers") if layers is not None else set(prunable)
    chosen -= expand(ignored, "ignored")
    if not chosen:
        raise CnnlabError(f"no conv or linear layer left to prune in {type(model).__name__} "
                          f"(layers={list(layers) if layers is not None else 'all'}, ignored={list(ignored)})")
    return {n: m for n, m in prunable.items() if n in chosen}  # model order


def prune_unstructured(model: nn.Module, amount: float, *, scope: str = "layer", layers: Sequence[str] | None = None,
                       ignored: Sequence[str] = (), permanent: bool = True) -> SparsityReport:
    """Zero the ``amount`` fraction of smallest-|w| weights of the chosen conv/linear layers, in place.

    ``scope="layer"``: each layer loses ``amount`` of its own weights (``l1_unstructured``);
    ``scope="global"``: one magnitude threshold over all chosen layers (``global_unstructured``), so
    layers with small weights lose more. Weights already zero count as the smallest, so calling this
    again with a larger amount prunes on top of the earlier pruning (the schedule of :func:`prune`).
    ``permanent=False`` leaves the masks on (for fine-tuning with the zeros held); call
    :func:`make_permanent` afterwards. Biases are not pruned.
    """
    amount = check_amount(amount)
    if scope not in SCOPES:
        raise CnnlabError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    chosen = select_layers(model, layers, ignored)
    make_permanent(model)  # masks of an earlier call: fold them in, their zeros are the smallest weights now
    for module in chosen.values():  # torch's pruning views the weight flat: channels_last weights are copied
        if not module.weight.is_contiguous():
            module.weight.data = module.weight.data.contiguous()
    if scope == "layer":
        for module in chosen.values():
            torch_prune.l1_unstructured(module, "weight", amount=amount)
    else:
        torch_prune.global_unstructured([(m, "weight") for m in chosen.values()],
                                        pruning_method=torch_prune.L1Unstructured, amount=amount)
    if permanent:
        make_permanent(model)
    return sparsity_report(model, list(chosen))


def make_permanent(model: nn.Module) -> int:
    """Fold every ``torch.nn.utils.prune`` mask into its weight (``prune.remove``); returns how many were folded."""
    folded = 0
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                torch_prune.remove(module, hook._tensor_name)
                folded += 1
    return folded


@dataclass
class LayerSparsity:
    """One layer's weight: elements, non-zeros and bytes dense vs sparse (fp32 values, int32 indices).

    Args:
        csr_bytes: values + column indices of the non-zeros + row pointers, the weight seen as
            (out_channels, fan_in); bitmask_bytes: one bit per element + the non-zero values.
    """

    name: str
    numel: int
    nonzeros: int
    dense_bytes: int
    csr_bytes: int
    bitmask_bytes: int

    @property
    def sparsity(self) -> float:
        return 1 - self.nonzeros / self.numel if self.numel else 0.0


def layer_sparsity(name: str, weight: torch.Tensor) -> LayerSparsity:
    w = weight.detach()
    nnz = int(torch.count_nonzero(w))
    size = w.element_size()
    rows = w.shape[0] if w.dim() > 1 else 1
    return LayerSparsity(name, w.numel(), nnz, w.numel() * size, nnz * (size + INDEX_BYTES) + (rows + 1) * INDEX_BYTES,
                         math.ceil(w.numel() / 8) + nnz * size)


@dataclass
class SparsityReport:
    """Sparsity of the pruned layers and the size of the whole model, dense and sparse-aware.

    Args:
        layers: one row per pruned layer; other_bytes: every other parameter and buffer, dense
            (biases, norms, unpruned layers), counted in both totals.
    """

    layers: list[LayerSparsity]
    other_bytes: int = 0
    other_params: int = 0
    notes: list[str] = field(default_factory=lambda: [
        "dense bytes: the state_dict as saved (zeros take as much room as any weight; dense kernels run as fast)",
        "csr: fp32 values + int32 column index per non-zero + int32 row pointers, weight as (out, fan_in)",
        "bitmask: 1 bit per element + fp32 values of the non-zeros"])

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.layers)

    @property
    def nonzeros(self) -> int:
        return sum(r.nonzeros for r in self.layers)

    @property
    def sparsity(self) -> float:
        """Over the pruned layers' weights (what the amount was applied to)."""
        return 1 - self.nonzeros / self.numel if self.numel else 0.0

    @property
    def model_sparsity(self) -> float:
        """Zeros of the pruned weights over all parameters of the model."""
        total = self.numel + self.other_params
        return (self.numel - self.nonzeros) / total if total else 0.0

    def total_bytes(self, kind: str = "dense") -> int:
        return self.other_bytes + sum(getattr(r, f"{kind}_bytes") for r in self.layers)

    def to_dict(self) -> dict:
        return {"sparsity": self.sparsity, "model_sparsity": self.model_sparsity, "numel": self.numel,
                "nonzeros": self.nonzeros, "dense_bytes": self.total_bytes("dense"),
                "csr_bytes": self.total_bytes("csr"), "bitmask_bytes": self.total_bytes("bitmask"),
                "notes": self.notes,
                "layers": [dict(vars(r), sparsity=r.sparsity) for r in self.layers]}

    def table(self, max_rows: int | None = 30) -> str:
        rows = self.layers if max_rows is None or len(self.layers) <= max_rows else self.layers[:max_rows]
        width = max([len("layer"), *(len(r.name) for r in rows)])
        lines = [f"{'layer':<{width}} {'weights':>10} {'non-zero':>10} {'sparsity':>8} {'dense KB':>9} "
                 f"{'csr KB':>9} {'bitmask KB':>10}"]
        for r in rows:
            lines.append(f"{r.name:<{width}} {r.numel:>10,} {r.nonzeros:>10,} {r.sparsity:>8.1%} "
                         f"{r.dense_bytes / 1e3:>9.1f} {r.csr_bytes / 1e3:>9.1f} {r.bitmask_bytes / 1e3:>10.1f}")
        if len(rows) < len(self.layers):
            lines.append(f"... {len(self.layers) - len(rows)} more layers")
        lines.append(f"{'pruned layers':<{width}} {self.numel:>10,} {self.nonzeros:>10,} {self.sparsity:>8.1%}")
        lines.append(f"whole model: {self.model_sparsity:.1%} of all parameters are zero; size dense "
                     f"{self.total_bytes('dense') / 1e6:.3f} MB (unchanged by pruning), CSR "
                     f"{self.total_bytes('csr') / 1e6:.3f} MB, bitmask {self.total_bytes('bitmask') / 1e6:.3f} MB")
        return "\n".join(lines + [f"  {n}" for n in self.notes])


def sparsity_report(model: nn.Module, layers: Sequence[str] | None = None) -> SparsityReport:
    """The sparsity of ``layers`` (default: every conv/linear) and the model's size, dense and sparse-aware."""
    chosen = select_layers(model, layers)
    rows = [layer_sparsity(n, m.weight) for n, m in chosen.items()]
    counted = {id(t) for m in chosen.values() for t in (m.weight, getattr(m, "weight_orig", None),
                                                        getattr(m, "weight_mask", None)) if t is not None}
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in counted}
    params = {id(p) for p in model.parameters()}
    return SparsityReport(rows, sum(t.numel() * t.element_size() for t in tensors.values()),
                          sum(t.numel() for k, t in tensors.items() if k in params))
