"""Weight sharing as in Deep Compression (Han et al. 2016): per-layer k-means, codebook fine-tuning, Huffman.

Each chosen layer's weights are clustered into ``k = 2**bits`` centroids by 1-D k-means started from the
linear initialisation (``k`` centroids evenly spaced over ``[min W, max W]``, which Han et al. §3.2 found
best: it keeps the rare large weights). Each weight is then stored as a ``bits``-bit index into a float
codebook. The layer's ``weight`` becomes ``codebook[indices]`` through ``torch.nn.utils.parametrize``, so
autograd gives the codebook fine-tuning of §3.3 exactly: the gradient of centroid ``c`` is the sum of
the gradients of the weights assigned to it, ``dL/dC_c = sum_{i: I_i = c} dL/dW_i``.

Combined with pruning (the pipeline of the paper), weights that are already 0 are not clustered and stay 0
(a ``mask`` buffer). Storage follows the paper's sparse format: the nonzero weights in order, each with the
distance to the previous one in ``index_bits`` bits (8 for conv, 5 for fully connected layers); a gap
beyond ``2**index_bits - 1`` costs a filler zero entry. Huffman coding (§4) then codes the weight indices
and the distances by their frequencies.

State dict keys of a shared layer: ``<layer>.parametrizations.weight.original`` (the codebook, float) and
``<layer>.parametrizations.weight.0.indices`` (uint8; ``.mask`` when pruned). ``unshare(model)`` turns them
back into plain ``weight`` tensors (holding the shared values).
"""
from __future__ import annotations

import copy
import heapq
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from cnnlab._errors import CnnlabError, did_you_mean

# ----------------------------------------------------------------------------------------- k-means


def linear_init(values: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` centroids evenly spaced over ``[min, max]`` of ``values`` (Han et al.'s linear initialisation)."""
    return torch.linspace(values.min().item(), values.max().item(), k, dtype=values.dtype)


def kmeans_1d(values: torch.Tensor, k: int, *, max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of a 1-D tensor from the linear initialisation; returns ``(centroids, assignment)``.

    Written by hand because one dimension allows far faster rounds than a general k-means (scikit-learn's
    computes n x k distances per round, in float64): the values are sorted once, each cluster is then a
    contiguous run of them between the midpoints of neighbouring centroids (a ``searchsorted`` of the k-1
    midpoints), and its mean comes from prefix sums, so a round costs O(k log n), not O(n k). A value on a
    midpoint joins the lower cluster; empty clusters keep their centroid. Stops when no boundary moves
    (no assignment changes) or after ``max_iter`` rounds; the assignment is that of the final centroids.
    """
    values = values.detach().flatten().float().cpu()
    if values.numel() == 0:
        raise CnnlabError("k-means needs at least one value to cluster")
    ordered = values.sort().values
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), ordered.double().cumsum(0)])  # float64: exact enough
    n = torch.tensor([ordered.numel()])
    centroids = linear_init(values, k)
    bounds = None
    for _ in range(max_iter):
        # cluster j holds the sorted values in (mid[j-1], mid[j]]: ends[j] values are <= mid[j]
        ends = torch.cat([torch.searchsorted(ordered, (centroids[1:] + centroids[:-1]) / 2, right=True), n])
        if bounds is not None and torch.equal(ends, bounds):
            break
        bounds = ends
        starts = torch.cat([torch.zeros(1, dtype=ends.dtype), ends[:-1]])
        counts = ends - starts
        means = (prefix[ends] - prefix[starts]) / counts.clamp(min=1)
        # means of consecutive runs are sorted; an empty cluster's kept centroid might not be: keep them sorted
        centroids = torch.where(counts > 0, means.to(centroids.dtype), centroids).sort().values
    assignment = torch.bucketize(values, (centroids[1:] + centroids[:-1]) / 2)
    return centroids, assignment


# ----------------------------------------------------------------------------------------- the layer


class CodebookWeight(nn.Module):
    """Parametrization ``weight = codebook[indices]`` (zeros where ``mask`` is False).

    Args:
        shape: the weight's shape.
        bits: index width, 1..8 (``2**bits`` centroids, indices stored as uint8).
        keep_zeros: weights equal to 0 (pruned) are not clustered and stay 0.
        max_iter: k-means rounds at most.
        index_bits: bits of a relative index in the sparse format (storage accounting only).
    """

    def __init__(self, shape: torch.Size, *, bits: int, keep_zeros: bool = True, max_iter: int = 100,
                 index_bits: int = 8) -> None:
        super().__init__()
        self.bits, self.keep_zeros, self.max_iter, self.index_bits = bits, keep_zeros, max_iter, index_bits
        self.register_buffer("indices", torch.zeros(shape, dtype=torch.uint8))
        self.register_buffer("mask", None)

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        # uint8 would index as a boolean mask: long indices; index's backward sums the gradients per centroid
        weight = codebook[self.indices.long()]
        return weight if self.mask is None else weight * self.mask

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """Cluster ``weight``: sets ``indices`` (and ``mask``), returns the codebook (the stored parameter)."""
        nonzero = weight != 0
        self.mask = nonzero.clone() if self.keep_zeros and not bool(nonzero.all()) else None
        values = weight[nonzero] if self.mask is not None else weight.flatten()
        if values.numel() == 0:  # a fully pruned layer: one centroid, never used
            values = torch.zeros(1, dtype=weight.dtype, device=weight.device)
        centroids, assignment = kmeans_1d(values.cpu(), 2 ** self.bits, max_iter=self.max_iter)
        indices = torch.zeros(weight.shape, dtype=torch.uint8)
        if self.mask is not None:
            indices[nonzero.cpu()] = assignment.to(torch.uint8)
        elif weight.numel():
            indices = assignment.to(torch.uint8).view(weight.shape)
        self.indices = indices.to(weight.device)
        return centroids.to(weight.device, weight.dtype)


@dataclass(frozen=True)
class SharingConfig:
    """Bits per layer kind and the sparse format (defaults: the paper's AlexNet settings).

    Args:
        conv_bits, linear_bits: index bits of conv and fully connected layers (5 and 4 in Han et al.).
        conv_index_bits, linear_index_bits: bits of the relative position of each nonzero weight in the
            sparse format (8 for conv, 5 for fully connected layers in the paper).
        keep_zeros: pruned (zero) weights are kept at 0 and not clustered.
        max_iter: k-means rounds at most.
    """

    conv_bits: int = 5
    linear_bits: int = 4
    conv_index_bits: int = 8
    linear_index_bits: int = 5
    keep_zeros: bool = True
    max_iter: int = 100

    def __post_init__(self) -> None:
        for name in ("conv_bits", "linear_bits"):
            _check_bits(getattr(self, name), name)
        for name in ("conv_index_bits", "linear_index_bits"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 32:
                raise CnnlabError(f"{name} must be an integer in 1..32 (bits of a relative index), got {value!r}")
        if self.max_iter < 1:
            raise CnnlabError(f"max_iter must be at least 1, got {self.max_iter}")


def _check_bits(bits: object, name: str = "bits") -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise CnnlabError(f"{name} must be an integer in 1..8 (2..256 shared weights, indices stored as uint8), "
                          f"got {bits!r}")


def _is_weight_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and isinstance(
        getattr(module, "weight", None), torch.Tensor)


def is_shared(module: nn.Module) -> bool:
    """Whether ``module``'s weight is a :class:`CodebookWeight` parametrization."""
    return parametrize.is_parametrized(module, "weight") and isinstance(
        module.parametrizations.weight[0], CodebookWeight)


def share_weights(model: nn.Module, *, bits: int | None = None, layers: Sequence[str] | None = None,
                  config: SharingConfig = SharingConfig()) -> nn.Module:
    """A copy of ``model`` whose conv and linear weights are shared through per-layer codebooks.

    Args:
        bits: index bits for every chosen layer (overrides ``config.conv_bits``/``linear_bits``).
        layers: ``named_modules`` names of the conv/linear layers to share (default: all of them).
        config: a :class:`SharingConfig`.

    Train the copy (``cnnlab.engine.train(config, model=shared)``) to fine-tune the codebooks: the
    optimizer sees each codebook as a parameter; biases and BatchNorm train as usual.
    """
    if bits is not None:
        _check_bits(bits)
    candidates = [n for n, m in model.named_modules() if _is_weight_layer(m) and not is_shared(m)]
    if layers is None:
        chosen = candidates
    else:
        if isinstance(layers, str):
            raise CnnlabError(f"layers takes a list of layer names, got the string {layers!r}; write [{layers!r}]")
        chosen = list(layers)
        for name in chosen:
            if name not in candidates:
                raise CnnlabError(f"share_weights(layers=...): {name!r} is not an unshared conv/linear layer of the "
                                  f"model{did_you_mean(name, candidates)}")
    if not chosen:
        raise CnnlabError("share_weights: the model has no conv or linear layer to share")
    shared = copy.deepcopy(model)
    for name in chosen:
        layer = shared.get_submodule(name)
        linear = isinstance(layer, nn.Linear)
        layer_bits = bits if bits is not None else (config.linear_bits if linear else config.conv_bits)
        param = CodebookWeight(layer.weight.shape, bits=layer_bits, keep_zeros=config.keep_zeros,
                               max_iter=config.max_iter,
                               index_bits=config.linear_index_bits if linear else config.conv_index_bits)
        # unsafe: the stored tensor (the codebook, (k,)) has not the weight's shape
        parametrize.register_parametrization(layer, "weight", param.to(layer.weight.device), unsafe=True)
    return shared


def unshare(model: nn.Module) -> nn.Module:
    """``model`` (in place) with each shared weight turned back into a plain parameter of its shared values."""
    for module in model.modules():
        if is_shared(module):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


# ----------------------------------------------------------------------------------------- Huffman


def huffman_code_lengths(frequencies: dict[object, int]) -> dict[object, int]:
    """Optimal prefix-code length of each symbol (Huffman's algorithm on a heap); one symbol gets 1 bit.

    Ties are broken by insertion order, so the lengths are deterministic.
    """
    counts = {s: f for s, f in frequencies.items() if f > 0}
    if not counts:
        return {}
    if len(counts) == 1:
        return {next(iter(counts)): 1}
    heap = [(f, i, [s]) for i, (s, f) in enumerate(counts.items())]
    heapq.heapify(heap)
    lengths = dict.fromkeys(counts, 0)
    order = len(heap)
    while len(heap) > 1:
        f1, _, group1 = heapq.heappop(heap)
        f2, _, group2 = heapq.heappop(heap)
        for s in group1 + group2:  # every symbol under the merged node sits one level deeper
            lengths[s] += 1
        heapq.heappush(heap, (f1 + f2, order, group1 + group2))
        order += 1
    return lengths


def canonical_codes(lengths: dict[object, int]) -> dict[object, str]:
    """The canonical prefix code for the given lengths (what a decoder rebuilds from the lengths alone)."""
    codes: dict[object, str] = {}
    code, previous = 0, 0
    for symbol, length in sorted(lengths.items(), key=lambda item: (item[1], repr(item[0]))):
        code <<= length - previous
        codes[symbol] = format(code, f"0{length}b")
        code, previous = code + 1, length
    return codes


def huffman_encode(symbols: Iterable[object]) -> tuple[str, dict[object, str]]:
    """``symbols`` Huffman-coded: the bit string and the code table."""
    symbols = list(symbols)
    codes = canonical_codes(huffman_code_lengths(Counter(symbols)))
    return "".join(codes[s] for s in symbols), codes


def huffman_decode(bits: str, codes: dict[object, str]) -> list[object]:
    """Inverse of :func:`huffman_encode`."""
    table = {c: s for s, c in codes.items()}
    out, current = [], ""
    for b in bits:
        current += b
        if current in table:
            out.append(table[current])
            current = ""
    if current:
        raise CnnlabError(f"Huffman bit string ends inside a code word ({current!r} left over)")
    return out


def huffman_bits(symbols: torch.Tensor | Iterable[int]) -> int:
    """Exact length in bits of ``symbols`` Huffman-coded (the code table not included)."""
    values = symbols.flatten().long() if isinstance(symbols, torch.Tensor) else torch.as_tensor(list(symbols)).long()
    if values.numel() == 0:
        return 0
    uniques, counts = torch.unique(values, return_counts=True)
    lengths = huffman_code_lengths(dict(zip(uniques.tolist(), counts.tolist())))
    return sum(lengths[s] * c for s, c in zip(uniques.tolist(), counts.tolist()))


# ----------------------------------------------------------------------------------------- storage


def sparse_entries(mask: torch.Tensor, index_bits: int) -> tuple[torch.Tensor, int]:
    """The relative indices of the nonzeros (row-major) in the paper's sparse format, and the filler count.

    Each stored entry holds its distance to the previous entry (the first: to position -1), at most
    ``2**index_bits - 1``; a longer gap is bridged by filler zero entries, each advancing by that maximum.
    Returns the distance of every stored entry (fillers included) and the number of fillers.
    """
    positions = torch.nonzero(mask.flatten().cpu()).flatten()
    gaps = torch.diff(positions, prepend=torch.tensor([-1]))
    limit = 2 ** index_bits - 1
    fillers_each = torch.div(gaps - 1, limit, rounding_mode="floor")  # a filler per `limit` positions skipped
    fillers = int(fillers_each.sum())
    if fillers == 0:
        return gaps, 0
    counts = fillers_each + 1  # the fillers, then the entry itself with what is left of the gap
    out = torch.full((int(counts.sum()),), limit, dtype=gaps.dtype)
    out[torch.cumsum(counts, 0) - 1] = gaps - fillers_each * limit
    return out, fillers


@dataclass
class LayerStorage:
    """The storage of one layer's weights at each stage of Deep Compression, in bits.

    Args:
        name: the layer's name; weights, nonzero: its weight count and nonzeros; bits: index bits.
        original: 32 bits per weight.
        pruned: sparse format of the nonzeros (32-bit value + relative index each, fillers included),
            or ``original`` when the layer has no zero.
        shared: codebook (32 bits per centroid) + a ``bits``-bit index per stored weight (+ relative indices).
        huffman: codebook + Huffman-coded indices (+ Huffman-coded relative indices) + the code tables
            (8 bits per code length).
    """

    name: str
    weights: int
    nonzero: int
    bits: int
    original: int
    pruned: int
    shared: int
    huffman: int

    @property
    def ratio(self) -> float:
        return self.original / self.huffman


@dataclass
class CompressionReport:
    """Per-layer and total storage of a weight-shared model (Deep Compression's Table 1 columns).

    Args:
        layers: one :class:`LayerStorage` per shared layer.
        other_bits: every other parameter at 32 bits (biases, BatchNorm, unshared layers).
    """

    layers: list[LayerStorage] = field(default_factory=list)
    other_bits: int = 0

    def total(self, stage: str) -> int:
        """Bits of the shared layers' weights at ``stage`` (original, pruned, shared, huffman)."""
        return sum(getattr(layer, stage) for layer in self.layers)

    @property
    def ratio(self) -> float:
        """Original / Huffman-coded storage of the shared layers' weights."""
        return self.total("original") / self.total("huffman")

    @property
    def model_ratio(self) -> float:
        """The same for the whole model's parameters (the other parameters stay 32-bit)."""
        return (self.total("original") + self.other_bits) / (self.total("huffman") + self.other_bits)

    def table(self) -> str:
        """A Markdown table (KiB per stage)."""
        kib = 8 * 1024
        rows = ["| layer | weights | nonzero | bits | original KiB | pruned KiB | shared KiB | Huffman KiB | ratio |",
                "|---|---|---|---|---|---|---|---|---|"]
        for s in self.layers:
            rows.append(f"| {s.name} | {s.weights:,} | {s.nonzero:,} | {s.bits} | {s.original / kib:.1f} | "
                        f"{s.pruned / kib:.1f} | {s.shared / kib:.1f} | {s.huffman / kib:.1f} | {s.ratio:.1f}x |")
        t = {stage: self.total(stage) / kib for stage in ("original", "pruned", "shared", "huffman")}
        rows.append(f"| **total** | {sum(s.weights for s in self.layers):,} | {sum(s.nonzero for s in self.layers):,} |"
                    f" | {t['original']:.1f} | {t['pruned']:.1f} | {t['shared']:.1f} | {t['huffman']:.1f} | "
                    f"{self.ratio:.1f}x |")
        rows.append(f"| whole model (other parameters fp32: {self.other_bits / kib:.1f} KiB) | | | | | | | | "
                    f"{self.model_ratio:.1f}x |")
        return "\n".join(rows)


def layer_storage(name: str, module: nn.Module) -> LayerStorage:
    """The storage of one shared layer (see :class:`LayerStorage`)."""
    param: CodebookWeight = module.parametrizations.weight[0]
    k = module.parametrizations.weight.original.numel()
    index_bits = param.index_bits
    n = param.indices.numel()
    codebook = 32 * k
    if param.mask is None:
        nonzero = n
        pruned = 32 * n
        shared = codebook + param.bits * n
        codes = param.indices.flatten().long()
        huffman = codebook + huffman_bits(codes) + 8 * len(torch.unique(codes))
    else:
        nonzero = int(param.mask.sum())
        gaps, fillers = sparse_entries(param.mask, index_bits)
        entries = nonzero + fillers
        pruned = entries * (32 + index_bits)
        shared = codebook + entries * (param.bits + index_bits)
        # a filler stores the value 0: one more symbol (k) in the weight alphabet
        codes = torch.cat([param.indices[param.mask].long(), torch.full((fillers,), k)])
        huffman = (codebook + huffman_bits(codes) + huffman_bits(gaps)
                   + 8 * (len(torch.unique(codes)) + len(torch.unique(gaps))))
    return LayerStorage(name, n, nonzero, param.bits, 32 * n, pruned, shared, huffman)


def compression_report(model: nn.Module) -> CompressionReport:
    """Storage of ``model``'s shared layers at each stage (original, pruned, shared, Huffman) and in total."""
    report = CompressionReport()
    counted: set[int] = set()
    for name, module in model.named_modules():
        if is_shared(module):
            report.layers.append(layer_storage(name, module))
            counted.add(id(module.parametrizations.weight.original))
    if not report.layers:
        raise CnnlabError("compression_report: the model has no shared layer; call share_weights(model) first")
    report.other_bits = 32 * sum(p.numel() for p in model.parameters() if id(p) not in counted)
    return report
