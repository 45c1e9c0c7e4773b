"""Functional forward of weight-bearing layers with substituted parameters."""
from __future__ import annotations

from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor, nn


def layer_params(module: nn.Module) -> tuple[Tensor, Optional[Tensor]]:
    """The (weight, bias) of a layer, detached (rules treat parameters as constants)."""
    w = module.weight.detach()
    b = getattr(module, "bias", None)
    return w, (b.detach() if isinstance(b, Tensor) else None)


def layer_forward(module: nn.Module, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``module``'s forward computed with ``weight`` and ``bias`` in place of its own parameters.

    Supports ``nn.Linear``, ``nn.Conv1d/2d/3d`` and Hugging Face's ``Conv1D`` (GPT-2); other layers
    must be adapted by a canonizer.
    """
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return module._conv_forward(x, weight, bias)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        size_out = x.size()[:-1] + (module.nf,)
        out = x.reshape(-1, x.size(-1)) @ weight
        if bias is not None:
            out = out + bias
        return out.view(size_out)
    raise TypeError(
        f"no functional forward known for layer type {type(module).__name__}; LRP layer rules support "
        "nn.Linear, nn.Conv1d/2d/3d and transformers' Conv1D. Use the 'epsilon' rule (gradient form, "
        "no re-evaluation) or write a canonizer that exposes the layer as one of these."
    )


def channel_dim(module: nn.Module) -> int:
    """The output (channel) axis of a layer's output: 1 for convolutions, -1 otherwise."""
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1


def layer_vjp(module: nn.Module, x: Tensor) -> Optional[Callable[[Tensor, Tensor], Tensor]]:
    """``(g, weight) -> J_weight^T g``: the input gradient of ``module``'s linear map with ``weight``.

    The transpose of the layer alone (one matrix product or one transposed convolution; no forward
    re-evaluation, the input itself is not needed, only its shape). Written with differentiable ops, so
    a backward pass built from it can be differentiated again. ``None`` for layers it does not know
    (padding modes other than zeros, string paddings, unbatched convolution input): callers then use
    autograd on :func:`layer_forward`.
    """
    if isinstance(module, nn.Linear):
        return lambda g, w: g.matmul(w)
    if isinstance(module, nn.modules.conv._ConvNd):
        n = len(module.kernel_size)
        if (module.transposed or module.padding_mode != "zeros" or isinstance(module.padding, str)
                or x.dim() != n + 2):
            return None
        shape, stride, padding = tuple(x.shape), list(module.stride), list(module.padding)
        dilation, groups = list(module.dilation), module.groups

        transpose = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]

        def conv_vjp(g: Tensor, w: Tensor) -> Tensor:
            # the transposed convolution (the same kernel as the input gradient), with the output padding
            # that gives back the input's size. Not convolution_backward: that takes an input-sized tensor
            # for its shape, and a fresh uninitialised one per call costs up to as much as the convolution
            # itself here (its pages are touched); the input itself is not kept
            out = g.shape[2:]
            extra = [shape[2 + i] - ((out[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (module.kernel_size[i] - 1) + 1)
                     for i in range(n)]
            return transpose(g, w, None, stride, padding, extra, groups, dilation)

        return conv_vjp
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return lambda g, w: g.matmul(w.t())
    return None
