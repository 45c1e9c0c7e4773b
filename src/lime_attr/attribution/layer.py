"""``LayerLRP``: LRP relevance of any layer's output (or input), as a Captum layer attribution.

Captum's ``LayerGradientXActivation`` computes ``activation * d output / d activation`` for one layer.
Run inside an :class:`~lime_attr.LRPScope`, the gradient is the rule-modified one, so the product is
the LRP relevance of that layer (gradient form: ``R = a * g_LRP``; Achtibat et al., 2024). Subclassing
it keeps every Captum contract -- ``target`` formats, ``additional_forward_args``,
``attribute_to_layer_input``, layer lists -- and makes the class acceptable wherever Captum expects a
``LayerGradientXActivation``, in particular ``captum.attr.LLMGradientAttribution``::

    llm_attr = LLMGradientAttribution(LayerLRP(model, model.get_input_embeddings()), tokenizer)
    res = llm_attr.attribute(TextTokenInput(prompt, tokenizer), target="answer")

``LLMGradientAttribution`` swaps ``forward_func`` for a function that runs the model and returns the
target token's *log-probability*. The ``log_softmax`` it applies lies outside the model's forward, so
it is differentiated plainly: the relevance explains ``log p_t = z_t - logsumexp(z)``, i.e. (the
modified backward pass being linear in its seed) ``R(z_t) - sum_j p_j R(z_j)`` -- the target logit's
relevance contrasted against the probability-weighted relevance of all logits. Use :class:`LRP` with
an int target to explain the logit ``z_t`` itself.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

from captum.attr import LayerGradientXActivation
from torch import nn

from ..composites import Composite
from ..model_checks import check_autograd_mode, forward_error
from ..scope import LRPScope
from ._forward import is_hf_model
from .lrp import normalize_target

__all__ = ["LayerLRP"]


class LayerLRP(LayerGradientXActivation):
    r"""LRP relevance of ``layer``: its activation times the rule-modified gradient.

    Parameters
    ----------
    model : nn.Module
        The model whose modules receive the rules (a Hugging Face model or any torch module). It is
        also the ``forward_func`` unless ``forward_func`` is given.
    layer : nn.Module or list of nn.Module
        The layer(s) whose output (or input, with ``attribute_to_layer_input=True``) is explained:
        the input embeddings, a decoder layer (hidden states), an attention or MLP block...
    composite : str or Composite
        Default ``"attnlrp"``.
    canonizer : "auto", None, str or Canonizer
        As for :class:`~lime_attr.LRPScope`.
    forward_func : callable, optional
        A function of the inputs that calls ``model`` (default: ``model`` itself, which is what Captum's
        ``LLMGradientAttribution`` needs; called directly on a Hugging Face model, pass one that returns a
        tensor, e.g. ``lambda ids: model(ids).logits[:, -1]``).
    device_ids : list of int, optional
        As in Captum (DataParallel).
    multiply_by_inputs : bool
        ``True`` (LRP relevance); ``False`` returns the modified gradient only.

    Examples
    --------
    >>> import torch
    >>> from lime_attr.attribution.layer import LayerLRP
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> rel = LayerLRP(net, net[1], composite="epsilon-plus").attribute(torch.randn(2, 4), target=0)
    >>> rel.shape
    torch.Size([2, 8])
    """

    def __init__(self, model: nn.Module, layer: Any, composite: Union[str, Composite] = "attnlrp",
                 canonizer: Any = "auto", forward_func: Optional[Callable] = None,
                 device_ids: Optional[list] = None, multiply_by_inputs: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError("LayerLRP needs the model (a torch.nn.Module): the rules attach to its modules")
        _check_layers_in_model(model, layer)
        super().__init__(forward_func if forward_func is not None else model, layer, device_ids, multiply_by_inputs)
        self.model = model
        self.composite = composite
        self.canonizer = canonizer
        self._scope: Optional[LRPScope] = None

    def scope(self) -> LRPScope:
        """The (reusable) scope applying the composite and canonizer to ``model``."""
        if self._scope is None:
            self._scope = LRPScope(self.model, self.composite, self.canonizer)
        return self._scope

    def attribute(self, inputs: Any, target: Any = None, additional_forward_args: Any = None,
                  attribute_to_layer_input: bool = False, grad_kwargs: Optional[dict] = None) -> Any:
        r"""Relevance of the layer's output (or input) for ``target``: Captum's
        ``LayerGradientXActivation.attribute`` run inside the LRP scope (same arguments, same return)."""
        check_autograd_mode("LayerLRP.attribute")
        target = normalize_target(target)
        try:
            with self.scope():
                return super().attribute(inputs, target=target, additional_forward_args=additional_forward_args,
                                         attribute_to_layer_input=attribute_to_layer_input, grad_kwargs=grad_kwargs)
        except AttributeError as exc:
            if is_hf_model(self.forward_func):
                raise TypeError("LayerLRP.attribute: the Hugging Face model returns a ModelOutput, not a tensor; pass "
                                "forward_func=lambda ids: model(ids).logits[:, -1] (an int target is then a token "
                                "id), or use LayerLRP through captum's LLMGradientAttribution") from exc
            raise
        except (RuntimeError, ValueError, TypeError) as exc:
            raise forward_error(exc, "LayerLRP.attribute: the forward failed on these inputs (LayerLRP passes them to "
                                     "the model as they are: for a Hugging Face model, its input_ids; the layer's "
                                     "activation is what gets explained)") from exc


def _check_layers_in_model(model: nn.Module, layer: Any) -> None:
    """Every explained layer must be a module of ``model``: the rules attach to ``model``'s modules only."""
    layers = layer if isinstance(layer, (list, tuple)) else [layer]
    own = {id(m) for m in model.modules()}
    for i, m in enumerate(layers):
        if not isinstance(m, nn.Module):
            raise TypeError(f"LayerLRP's layer must be an nn.Module of the model (or a list of them), got "
                            f"{type(m).__name__}; e.g. model.get_input_embeddings() or model.model.layers[0]")
        if id(m) not in own:
            raise ValueError(f"layer {i} ({type(m).__name__}) is not a module of the model ({type(model).__name__}): "
                             "its activation would never be recorded. Pass a submodule of this model instance (e.g. "
                             "model.get_submodule('model.layers.0')), not one of a copy or another model")
