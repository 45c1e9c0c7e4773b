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

from typing import Any, Callable, Optional, Sequence, Union

import torch

from captum._utils.common import (_format_additional_forward_args, _format_output, _format_tensor_into_tuples,
                                  _run_forward)
from captum.attr import LayerGradientXActivation
from torch import Tensor, nn

from ..composites import Composite
from ..model_checks import check_autograd_mode, forward_error
from ..scope import LRPScope
from ._forward import is_hf_model
from .checks import normalize_target
from .engine import relevance

__all__ = ["LayerLRP", "LayerRecorder"]


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
        r"""Relevance of the layer's output (or input) for ``target``, with the arguments and the return of
        Captum's ``LayerGradientXActivation.attribute``.

        The relevance engine (:func:`lime_attr.attribution.engine.relevance`) runs the forward and the
        rule-modified backward, reading the layer's activation as its latent tensor
        (:class:`LayerRecorder`); with ``device_ids`` (DataParallel) Captum's own computation runs inside
        the scope. Of ``grad_kwargs``, ``create_graph`` is honoured.
        """
        check_autograd_mode("LayerLRP.attribute")
        target = normalize_target(target)
        try:
            if self.device_ids is not None:
                with self.scope():
                    return super().attribute(inputs, target=target, additional_forward_args=additional_forward_args,
                                             attribute_to_layer_input=attribute_to_layer_input,
                                             grad_kwargs=grad_kwargs)
            return self._attribute(inputs, target, additional_forward_args, attribute_to_layer_input,
                                   bool((grad_kwargs or {}).get("create_graph", False)))
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

    def _attribute(self, inputs: Any, target: Any, additional_forward_args: Any, to_input: bool,
                   create_graph: bool) -> Any:
        inputs_t = _format_tensor_into_tuples(inputs)
        additional = _format_additional_forward_args(additional_forward_args)

        def forward() -> Tensor:
            out = _run_forward(self.forward_func, inputs_t, target=target, additional_forward_args=additional)
            assert out[0].numel() == 1, ("Target not provided when necessary, cannot take gradient with respect to "
                                         "multiple outputs.")
            return out

        layers = self.layer if isinstance(self.layer, (list, tuple)) else [self.layer]
        recorder = LayerRecorder(layers, to_input, self.multiplies_by_inputs)
        res = relevance(self.scope(), forward, [], create_graph=create_graph, latent=recorder)
        per_layer = [_format_output(len(r) > 1, r) for r in res.latent["layers"]]
        return per_layer[0] if isinstance(self.layer, nn.Module) else per_layer


class LayerRecorder:
    """The activations of some layers (outputs, or inputs with ``to_input``), for the relevance engine.

    What Captum's layer attributions record, in the same way: the hook makes the activation require
    grad and passes a clone on to the rest of the forward (the last call of a layer is kept).

    Parameters
    ----------
    layers : sequence of nn.Module
    to_input : bool
        Record each layer's input instead of its output.
    multiply_by_inputs : bool
        ``relevance`` returns activation times gradient (LRP relevance) rather than the gradient.
    """

    def __init__(self, layers: Sequence[nn.Module], to_input: bool = False, multiply_by_inputs: bool = True) -> None:
        self.layers, self.to_input, self.multiply = list(layers), to_input, multiply_by_inputs
        self.saved: list[Optional[tuple]] = [None] * len(self.layers)
        self._handles: list = []

    def __enter__(self) -> "LayerRecorder":
        self.saved = [None] * len(self.layers)
        for i, layer in enumerate(self.layers):
            if self.to_input:
                self._handles.append(layer.register_forward_pre_hook(self._hook(i)))
            else:
                self._handles.append(layer.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, i: int) -> Callable:
        def hook(module: nn.Module, inp: Any, out: Any = None) -> Any:
            value = inp if self.to_input else out
            many = isinstance(value, (tuple, list))
            tensors = tuple(value) if many else (value,)
            for t in tensors:
                if isinstance(t, Tensor) and not t.requires_grad and t.is_floating_point():
                    t.requires_grad_()
            self.saved[i] = tensors
            if not many:
                return tensors[0].clone()
            clones = [t.clone() for t in tensors]
            return clones if isinstance(value, list) else tuple(clones)
        return hook

    def tensors(self) -> list[Tensor]:
        """The recorded activations, flattened in layer order."""
        for layer, saved in zip(self.layers, self.saved):
            if saved is None:
                raise RuntimeError(f"LayerLRP: the layer {type(layer).__name__} did not run in this forward")
        return [t for saved in self.saved for t in saved]

    def relevance(self, grads: Sequence[Optional[Tensor]], detach: bool = True) -> dict[str, list]:
        """``{"layers": [(activation * gradient, ...) per layer]}`` (the gradient alone without multiplying)."""
        it = iter(grads)
        out = []
        for saved in self.saved:
            rels = []
            for a in saved:
                g = next(it)
                g = torch.zeros_like(a) if g is None else g
                r = a * g if self.multiply else g
                rels.append(r.detach() if detach else r)
            out.append(tuple(rels))
        return {"layers": out}


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
