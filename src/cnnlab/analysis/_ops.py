"""Per-operation rules: multiply-accumulates (MACs) and receptive-field propagation.

The counter sees every torch function a forward calls (``F.conv2d``, ``torch.add``,
``Tensor.view`` ...), so functional code inside ``forward`` (residual adds, SE scaling,
``F.adaptive_avg_pool2d``) is seen as well as leaf modules. Each op is looked up here:

* ``MAC_RULES``: ops that multiply-accumulate (conv, transposed conv, linear, matmul,
  attention) and normalisation layers (1 MAC per output element, see ``CONVENTIONS``).
* ``ZERO_MAC``: ops that are known and, by convention, cost no MACs (activations,
  pooling, elementwise arithmetic, reshapes, up-sampling, reductions).
* anything else that returns a floating-point tensor is *uncounted*: the summary lists
  it by name, it is never silently zero.
"""
from __future__ import annotations

import math
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

CONVENTIONS = (
    "MACs = multiply-accumulates of conv, transposed conv, linear, matmul and attention "
    "(bias adds not counted); norm layers (BN/GN/LN/IN) count 1 MAC per output element "
    "(their inference form y = a*x + b); LRN counts `size` MACs per element (kind 'lrn'); activations, "
    "pooling, up-sampling and elementwise add/mul count 0 MACs. FLOPs = 2 x MACs. "
    "Activations = elements of every newly allocated op output (in-place ops and views "
    "allocate nothing) plus the input. Receptive field = size x size of the input window "
    "one output unit depends on (not clipped to the image), stride = its jump in input pixels."
)


def _t(x: object) -> torch.Tensor | None:
    return x if isinstance(x, torch.Tensor) else None


def _arg(args: Sequence, kwargs: dict, i: int, name: str, default: object = None) -> object:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _ntuple(v: object, n: int) -> tuple:
    if isinstance(v, (list, tuple)):
        return tuple(v) if len(v) == n else tuple(v) * n if len(v) == 1 else tuple(v)
    return (v,) * n


# -- MACs ----------------------------------------------------------------------------------
MacRule = Callable[[Sequence, dict, torch.Tensor], int]


def _conv_macs(args: Sequence, kwargs: dict, out: torch.Tensor) -> int:
    weight = _arg(args, kwargs, 1, "weight")
    # weight (C_out, C_in / groups, *k): each output element sums C_in/groups * prod(k) products
    return out.numel() * math.prod(weight.shape[1:])


def _conv_transpose_macs(args: Sequence, kwargs: dict, out: torch.Tensor) -> int:
    inp, weight = args[0], _arg(args, kwargs, 1, "weight")
    # weight (C_in, C_out / groups, *k): every input element scatters into C_out/groups * prod(k) outputs
    return inp.numel() * math.prod(weight.shape[1:])


def _linear_macs(args: Sequence, kwargs: dict, out: torch.Tensor) -> int:
    weight = _arg(args, kwargs, 1, "weight")
    return out.numel() * weight.shape[-1]


def _bilinear_macs(args: Sequence, kwargs: dict, out: torch.Tensor) -> int:
    weight = _arg(args, kwargs, 2, "weight")
    return out.numel() * weight.shape[1] * weight.shape[2]


def _matmul_macs(args: Sequence, kwargs: dict, out: torch.Tensor) -> int:
    a = args[0]
    return out.numel() * (a.shape[-1] if a.dim() >= 1 else 1)


def _addmm_macs(args: Sequence, kwargs: dict, out: torch.Tensor) -> int:
    a = args[1]  # addmm(input, mat1, mat2): out = input + mat1 @ mat2
    return out.numel() * a.shape[-1]


def _einsum_macs(args: Sequence, kwargs: dict, out: torch.Tensor) -> int:
    equation = args[0].replace(" ", "")
    operands = args[1:] if not (len(args) == 2 and isinstance(args[1], (list, tuple))) else args[1]
    if "..." in equation or len(operands) != 2:
        raise NotImplementedError  # -> listed as uncounted
    sizes: dict[str, int] = {}
    for spec, op in zip(equation.split("->")[0].split(","), operands):
        sizes.update(zip(spec, op.shape))
    # naive two-operand contraction: one multiply-add per combination of all indices
    return math.prod(sizes[c] for c in sizes if c in string.ascii_letters)


def _sdpa_macs(args: Sequence, kwargs: dict, out: torch.Tensor) -> int:
    q, k, v = args[0], args[1], args[2]
    batch = math.prod(q.shape[:-2])
    length, source = q.shape[-2], k.shape[-2]
    return batch * length * source * (q.shape[-1] + v.shape[-1])  # Q K^T, then A V


def _mha_macs(args: Sequence, kwargs: dict, out: torch.Tensor) -> int:
    query, key = args[0], args[1]  # (L, N, E) / (S, N, E), or unbatched (L, E)
    length, source, embed = query.shape[0], key.shape[0], query.shape[-1]
    batch = query.shape[1] if query.dim() == 3 else 1
    # q/k/v and output projections, then Q K^T and A V over all heads together
    return batch * (2 * length * embed * embed + 2 * source * embed * embed + 2 * length * source * embed)


def _norm_macs(args: Sequence, kwargs: dict, out: torch.Tensor) -> int:
    return out.numel()


def _lrn_macs(args: Sequence, kwargs: dict, out: torch.Tensor) -> int:
    return out.numel() * int(_arg(args, kwargs, 1, "size"))


MAC_RULES: dict[str, tuple[str, MacRule]] = {
    **{f"conv{d}d": ("conv", _conv_macs) for d in (1, 2, 3)},
    "convolution": ("conv", _conv_macs),
    **{f"conv_transpose{d}d": ("conv", _conv_transpose_macs) for d in (1, 2, 3)},
    "linear": ("linear", _linear_macs),
    "bilinear": ("linear", _bilinear_macs),
    **{name: ("matmul", _matmul_macs) for name in ("matmul", "mm", "bmm", "__matmul__", "__rmatmul__")},
    **{name: ("matmul", _addmm_macs) for name in ("addmm", "baddbmm", "addbmm")},
    "einsum": ("matmul", _einsum_macs),
    "scaled_dot_product_attention": ("matmul", _sdpa_macs),
    **{name: ("norm", _norm_macs) for name in ("batch_norm", "group_norm", "layer_norm", "instance_norm", "rms_norm")},
    "local_response_norm": ("lrn", _lrn_macs),
    "multi_head_attention_forward": ("matmul", _mha_macs),
}

_ACTIVATIONS = {
    "relu", "relu6", "sigmoid", "tanh", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "hardtanh",
    "leaky_relu", "elu", "selu", "celu", "prelu", "rrelu", "softplus", "softsign", "threshold", "glu",
    "softmax", "log_softmax", "softmin", "logsigmoid", "tanhshrink", "hardshrink", "softshrink",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
}
_POOLS = {
    *(f"{kind}_pool{d}d" for kind in ("max", "avg", "lp") for d in (1, 2, 3)),
    *(f"adaptive_{kind}_pool{d}d" for kind in ("max", "avg") for d in (1, 2, 3)),
    *(f"max_pool{d}d_with_indices" for d in (1, 2, 3)),
    *(f"adaptive_max_pool{d}d_with_indices" for d in (1, 2, 3)),
    *(f"fractional_max_pool{d}d" for d in (2, 3)), "max_unpool1d", "max_unpool2d", "max_unpool3d",
}
_ARITHMETIC = {
    "add", "sub", "mul", "div", "true_divide", "floor_divide", "neg", "abs", "exp", "log", "sqrt", "rsqrt",
    "pow", "square", "clamp", "clip", "clamp_min", "clamp_max", "maximum", "minimum", "where", "lerp",
    "addcmul", "addcdiv", "reciprocal", "sign", "erf", "sin", "cos", "masked_fill", "fill", "zero", "copy",
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "__neg__", "__pow__", "__rpow__", "__and__", "__or__",
}
_SHAPE = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "contiguous", "cat", "concat",
    "concatenate", "stack", "chunk", "split", "unbind", "__getitem__", "squeeze", "unsqueeze", "expand",
    "expand_as", "repeat", "narrow", "pad", "clone", "to", "float", "double", "half", "bfloat16", "type",
    "detach", "view_as", "reshape_as", "movedim", "roll", "flip", "index_select", "gather", "select",
    "channel_shuffle", "pixel_shuffle", "pixel_unshuffle", "native_channel_shuffle", "tensor_split", "hstack",
    "vstack", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "new_zeros",
    "new_ones", "new_empty", "new_full", "requires_grad_", "cpu", "cuda",
}
_CREATE_SELECT = {
    "tensor", "as_tensor", "from_numpy", "zeros", "ones", "full", "empty", "arange", "linspace", "eye", "rand",
    "randn", "randint", "randperm", "topk", "sort", "argsort", "nonzero", "unique", "masked_select", 
    "floor", "ceil", "round", "trunc", "frac", "log2", "log10", "log1p", "exp2", "expm1", "isfinite", "isnan",
    "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not", "any", "all", "bincount",
    "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__", "__floordiv__", "__rfloordiv__", "__mod__",
    "__rdiv__", "__div__", "__invert__", "__xor__", "index", "index_put", "scatter", "scatter_add", "masked_scatter",
    "repeat_interleave", "meshgrid", "split_with_sizes", "unsqueeze_copy", 
}
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod", "argmax", "argmin"}
_RESAMPLE = {"interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "grid_sample", "affine_grid"}


def canonical(name: str) -> str:
    """'relu_' -> 'relu', '__iadd__' stays: in-place variants share the rule of their op."""
    if name.endswith("_") and not name.endswith("__") and name[:-1]:
        return name[:-1]
    return name


def op_kind(name: str) -> str | None:
    """'conv', 'linear', 'matmul', 'norm', 'lrn' (MAC ops), 'zero' (known, 0 MACs) or None (uncounted)."""
    name = canonical(name)
    if name in MAC_RULES:
        return MAC_RULES[name][0]
    if any(name in group for group in (_ACTIVATIONS, _POOLS, _ARITHMETIC, _SHAPE, _REDUCE, _RESAMPLE, _CREATE_SELECT)):
        return "zero"
    return None


def count_macs(name: str, args: Sequence, kwargs: dict, out: torch.Tensor) -> int:
    return int(MAC_RULES[canonical(name)][1](args, kwargs, out))


# -- receptive field -----------------------------------------------------------------------
@dataclass(frozen=True)
class Axis:
    """Receptive field along one spatial axis: window ``size``, ``jump`` between neighbouring
    output units and ``start`` (centre of output unit 0), all in input pixels."""

    size: float
    jump: float
    start: float

    def window(self, index: int) -> tuple[float, float]:
        centre = self.start + index * self.jump
        half = (self.size - 1) / 2
        return centre - half, centre + half


@dataclass(frozen=True)
class RF:
    """Receptive field of a tensor: one Axis per trailing spatial dim; ``whole`` marks a
    tensor that depends on the whole extent reached (after flatten or a global reduction)."""

    axes: tuple[Axis, ...]
    whole: bool = False


RF_ATTR = "_cnnlab_rf"


def union(rfs: Sequence[RF]) -> RF:
    """Receptive field of an elementwise combination (residual add, concat): the union of windows."""
    if len(rfs) == 1:
        return rfs[0]
    n = min(len(r.axes) for r in rfs)
    axes = []
    for i in range(n):
        parts = [r.axes[len(r.axes) - n + i] for r in rfs]
        lo = min(a.window(0)[0] for a in parts)
        hi = max(a.window(0)[1] for a in parts)
        axes.append(Axis(hi - lo + 1, max(a.jump for a in parts), (lo + hi) / 2))
    return RF(tuple(axes), any(r.whole for r in rfs))


def collapse(rf: RF, extent: Sequence[int]) -> RF:
    """A global reduction / flatten over ``extent`` output units per axis: one unit sees them all."""
    axes = tuple(
        Axis(a.size + (n - 1) * a.jump, a.jump * n, a.start + (n - 1) * a.jump / 2) for a, n in zip(rf.axes, extent)
    )
    return RF(axes, True)


def _windowed(rf: RF, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[float], dilation: Sequence[int]) -> RF:
    n = len(kernel)
    axes = list(rf.axes)
    for i in range(n):
        a = axes[len(axes) - n + i]
        span = (kernel[i] - 1) * dilation[i]
        axes[len(axes) - n + i] = Axis(a.size + span * a.jump, a.jump * stride[i], a.start + (span / 2 - padding[i]) * a.jump)
    return RF(tuple(axes), rf.whole)


def propagate(name: str, args: Sequence, kwargs: dict, out: torch.Tensor, inputs: Sequence[tuple[torch.Tensor, RF]]) -> RF | None:
    """Receptive field of ``out`` from those of the op's tensor inputs, or None when unknown."""
    name = canonical(name)
    first_t, first = inputs[0]
    spatial = len(first.axes)
    if name in ("conv1d", "conv2d", "conv3d") or name.startswith("conv_transpose"):
        weight = _arg(args, kwargs, 1, "weight")
        kernel = tuple(weight.shape[2:])
        n = len(kernel)
        stride = _ntuple(_arg(args, kwargs, 3, "stride", 1), n)
        dilation = _ntuple(_arg(args, kwargs, 5, "dilation", 1), n)
        pad = _arg(args, kwargs, 4, "padding", 0)
        if pad == "valid":
            pad = 0
        if pad == "same":
            padding = tuple((d * (k - 1)) // 2 for k, d in zip(kernel, dilation))
        else:
            padding = _ntuple(pad, n)
        if name.startswith("conv_transpose"):
            stride = _ntuple(_arg(args, kwargs, 3, "stride", 1), n)
            padding = _ntuple(_arg(args, kwargs, 4, "padding", 0), n)
            dilation = _ntuple(_arg(args, kwargs, 7, "dilation", 1), n)
            axes = list(first.axes)
            for i in range(n):
                a = axes[spatial - n + i]
                k, st, p, d = kernel[i], stride[i], padding[i], dilation[i]
                # output o reads input (o + p - j*d) / s for the taps j where that is an integer:
                # the widest phase sets the size; output 0's taps set the start
                taps = max(sum((r + p - j * d) % st == 0 for j in range(k)) for r in range(st))
                reads0 = [(p - j * d) // st for j in range(k) if (p - j * d) % st == 0] or [p / st]
                axes[spatial - n + i] = Axis(a.size + (taps - 1) * a.jump, a.jump / st,
                                             a.start + (min(reads0) + max(reads0)) / 2 * a.jump)
            return RF(tuple(axes), first.whole)
        return _windowed(first, kernel, stride, padding, dilation)
    if name.startswith("max_unpool"):  # (input, indices, kernel_size, stride, padding, output_size)
        n = int(name[len("max_unpool")])
        kernel = _ntuple(_arg(args, kwargs, 2, "kernel_size"), n)
        stride = _ntuple(_arg(args, kwargs, 3, "stride", None) or kernel, n)
        axes = list(first.axes)
        for i in range(n):  # every output pixel copies (or zeroes) the pooled pixel of its block
            a = axes[spatial - n + i]
            axes[spatial - n + i] = Axis(a.size, a.jump / stride[i], a.start - (stride[i] - 1) / 2 * a.jump / stride[i])
        return RF(tuple(axes), first.whole)
    if name in _POOLS and not name.startswith("adaptive"):
        n = int(name.split("pool")[1][0])
        kernel = _ntuple(_arg(args, kwargs, 1 if not name.startswith("lp") else 2, "kernel_size"), n)
        stride = _arg(args, kwargs, 2 if not name.startswith("lp") else 3, "stride", None) or kernel
        stride = _ntuple(stride, n)
        padding = _ntuple(_arg(args, kwargs, 3, "padding", 0), n) if not name.startswith("lp") else (0,) * n
        dilation = _ntuple(_arg(args, kwargs, 4, "dilation", 1), n) if name.startswith("max") else (1,) * n
        return _windowed(first, kernel, stride, padding, dilation)
    if name.startswith("adaptive"):
        n = int(name.split("pool")[1][0])
        in_size, out_size = first_t.shape[-n:], out.shape[-n:]
        if all(o == 1 for o in out_size):
            return collapse(first, in_size)
        # bins of PyTorch's adaptive pooling: [floor(i*N/O), ceil((i+1)*N/O)); widest bin, mean step
        kernel = tuple(max(-(-(j + 1) * a // b) - (j * a) // b for j in range(b)) for a, b in zip(in_size, out_size))
        axes = list(first.axes)
        for i, (a_n, o_n, k) in enumerate(zip(in_size, out_size, kernel)):
            a = axes[spatial - n + i]
            axes[spatial - n + i] = Axis(a.size + (k - 1) * a.jump, a.jump * a_n / o_n, a.start + (k - 1) / 2 * a.jump)
        return RF(tuple(axes), first.whole)
    if name in _RESAMPLE and name != "affine_grid":
        if out.dim() != first_t.dim():
            return None
        n = min(spatial, out.dim() - 2)
        axes = list(first.axes)
        bilinear = "linear" in str(_arg(args, kwargs, 3, "mode", "nearest")) or name == "upsample_bilinear"
        for i in range(n):
            a = axes[spatial - n + i]
            ratio = first_t.shape[-n + i] / out.shape[-n + i]  # input pixels per output pixel
            jump = a.jump * ratio
            extra = a.jump if bilinear and ratio < 1 else 0  # bilinear reads two neighbours
            axes[spatial - n + i] = Axis(a.size + extra, jump, a.start + (ratio - 1) / 2 * a.jump)
        return RF(tuple(axes), first.whole)
    # shape-preserving along the spatial dims (elementwise ops, activations, norm, cat on channels,
    # channel shuffle's view/transpose): the union of the inputs' windows
    out_spatial = tuple(out.shape[-spatial:]) if out.dim() >= spatial else None
    matches = [out_spatial is not None and tuple(t.shape[-spatial:]) == out_spatial for t, _ in inputs]
    if matches[0]:
        same = [rf for (_, rf), m in zip(inputs, matches) if m]
        others = [rf for (_, rf), m in zip(inputs, matches) if not m]
        rf = union(same)
        if others:  # a (B, C, 1, 1) SE scale multiplied in: every unit now depends on everything it saw
            wide = union([rf, *others])
            rf = RF(tuple(Axis(w.size, a.jump, w.start) for w, a in zip(wide.axes, rf.axes)), True)
        return rf
    if name in _REDUCE or name in ("flatten", "view", "reshape", "linear", "matmul", "mm", "addmm"):
        # the spatial dims were folded away (flatten, global mean, FC on the flattened map)
        if first.whole or first_t.dim() <= spatial:
            return first
        return collapse(first, first_t.shape[-spatial:])
    return None
