"""``LRP``: Captum-compatible Layer-wise Relevance Propagation in gradient form."""
from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Sequence, Union, overload

import torch
from captum._utils.common import (_format_additional_forward_args, _format_output, _format_tensor_into_tuples,
                                  _is_tuple, _run_forward)
from captum.attr import GradientAttribution
from torch import Tensor, nn

from ..composites import Composite
from ..errors import LimeAttrError
from ..model_checks import check_autograd_mode, forward_error
from ..scope import LRPScope
from ._forward import HFForward, hf_input_name, is_hf_model
from .checks import check_finite, normalize_target, validate_inputs, validate_target
from .engine import SECOND_ORDERS, relevance

__all__ = ["LRP"]


class LRP(GradientAttribution):
    r"""Layer-wise Relevance Propagation for any torch or Hugging Face model, in one backward pass.

    Relevance of an input ``x`` is ``x * g`` where ``g`` is the rule-modified gradient of the explained
    output, obtained with one backward pass seeded with 1 at that output: the relevances sum to the
    explained logit (up to what biases, stabilisers and the non-conservative softmax rule keep).

    Parameters
    ----------
    model : nn.Module or callable
        A torch module, or a Hugging Face model (pass the model itself; inputs are then its
        ``inputs_embeds`` / ``pixel_values`` / ``input_features``).
    composite : str or Composite
        Which rule applies where (default ``"attnlrp"``; see :func:`lime_attr.available_composites`).
    canonizer : "auto", None, str or Canonizer
        Per-architecture adapter; ``"auto"`` picks it from ``model.config.model_type``.

    Examples
    --------
    >>> import torch
    >>> from lime_attr import LRP
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> x = torch.randn(2, 4)
    >>> attr, delta = LRP(model, composite="epsilon-plus").attribute(x, target=1, return_convergence_delta=True)
    >>> attr.shape
    torch.Size([2, 4])
    """

    def __init__(self, model: Union[nn.Module, Callable], composite: Union[str, Composite] = "attnlrp",
                 canonizer: Any = "auto") -> None:
        super().__init__(model)
        if not isinstance(model, nn.Module):
            raise TypeError("LRP needs the model itself (a torch.nn.Module), not a function: rules attach to "
                            "its modules")
        self.model = model
        self.composite = composite
        self.canonizer = canonizer
        self._scope: Optional[LRPScope] = None

    @property
    def multiplies_by_inputs(self) -> bool:  # noqa: D401
        """Whether relevance is multiplied by the inputs; always True (LRP relevance is input times modified gradient)."""
        return True

    def has_convergence_delta(self) -> bool:
        """Always True: the delta is the explained output minus the sum of relevance, per example."""
        return True

    def scope(self) -> LRPScope:
        """A (reusable) scope applying this attribution's composite and canonizer to the model."""
        if self._scope is None:
            self._scope = LRPScope(self.model, self.composite, self.canonizer)
        return self._scope

    @overload
    def attribute(self, inputs: Tensor, target: Any = None, additional_forward_args: Any = None,
                  return_convergence_delta: Literal[False] = False, create_graph: bool = False,
                  latent: None = None, second_order: str = "autograd", **model_kwargs: Any) -> Tensor: ...

    @overload
    def attribute(self, inputs: tuple[Tensor, ...], target: Any = None, additional_forward_args: Any = None,
                  return_convergence_delta: Literal[False] = False, create_graph: bool = False,
                  latent: None = None, second_order: str = "autograd",
                  **model_kwargs: Any) -> tuple[Tensor, ...]: ...

    @overload
    def attribute(self, inputs: Tensor, target: Any = None, additional_forward_args: Any = None, *,
                  return_convergence_delta: Literal[True], create_graph: bool = False, latent: None = None,
                  second_order: str = "autograd", **model_kwargs: Any) -> tuple[Tensor, Tensor]: ...

    @overload
    def attribute(self, inputs: tuple[Tensor, ...], target: Any = None, additional_forward_args: Any = None, *,
                  return_convergence_delta: Literal[True], create_graph: bool = False, latent: None = None,
                  second_order: str = "autograd", **model_kwargs: Any) -> tuple[tuple[Tensor, ...], Tensor]: ...

    @overload
    def attribute(self, inputs: Union[Tensor, tuple[Tensor, ...]], target: Any = None,
                  additional_forward_args: Any = None, return_convergence_delta: bool = False,
                  create_graph: bool = False, *, latent: Sequence[str], second_order: str = "autograd",
                  **model_kwargs: Any) -> tuple: ...

    def attribute(self, inputs: Union[Tensor, tuple[Tensor, ...]], target: Any = None,
                  additional_forward_args: Any = None, return_convergence_delta: bool = False,
                  create_graph: bool = False, latent: Optional[Sequence[str]] = None,
                  second_order: str = "autograd", **model_kwargs: Any) -> Any:
        r"""Relevance of ``inputs`` for the ``target`` output.

        Parameters
        ----------
        inputs : Tensor or tuple of Tensor
            Batch on dim 0; the output has the same structure. For Hugging Face models: the
            ``inputs_embeds`` (token models) or ``pixel_values`` / ``input_features``.
        target : int, tuple, list, Tensor or None
            Captum's formats (numpy integers are accepted as ints). For a Hugging Face token model an int
            is a token id explained at the last position (a right-padded ``attention_mask`` is refused: the
            last position would be padding); a tuple ``(position, token_id)`` selects another position.
            ``None``: for a Hugging Face model, the model's top output per row -- the greedy next token of a
            causal LM (as in :meth:`ModalityAttribution.attribute`), the predicted class of a classifier;
            for a plain torch model, the output itself, which must then be one scalar per example.
        additional_forward_args : Any
            Passed after ``inputs`` to the model (for Hugging Face models: a dict of keyword arguments).
        return_convergence_delta : bool
            Also return ``output - sum(relevance)`` per example.
        create_graph : bool
            Keep the graph so that the relevance can itself be differentiated (LIME needs this).
        second_order : {"autograd", "exact"}
            How a relevance computed with ``create_graph=True`` differentiates. ``"autograd"`` (default):
            autograd differentiates the rule-modified backward pass itself, which is exact only where no
            rule-modified value enters a later backward formula (LRP-0, CP-LRP). ``"exact"``: the exact
            derivative of the relevance function, computed when the relevance is differentiated by one
            reverse-over-forward pass (:mod:`lime_attr.attribution.exact`, docs: rules, "Differentiating
            relevance"); implies ``create_graph=True``, not with ``latent`` or first-layer rules.
        latent : sequence of str, optional
            Qualified module names whose output relevance (hidden state times modified gradient, from the
            same backward pass) is returned too, as a dict appended to the return value
            (docs: latent_relevance).
        **model_kwargs
            Hugging Face models only: further keyword inputs (``attention_mask``, ``pixel_values``...).

        Returns
        -------
        Tensor or tuple
            The relevance, shaped like ``inputs``; with ``return_convergence_delta``, also the delta (a
            ``[batch]`` tensor); with ``latent``, also the dict ``{module_name: relevance}``, last.
        """
        _check_arguments(inputs, create_graph, return_convergence_delta, second_order)
        target = normalize_target(target)
        is_tuple = _is_tuple(inputs)
        inputs_t = _format_tensor_into_tuples(inputs)
        validate_inputs(inputs_t)
        forward = self.explained_forward(inputs_t, target, additional_forward_args, **model_kwargs)
        res = relevance(self.scope(), forward, inputs_t, create_graph=create_graph, second_order=second_order,
                        latent=latent or None)
        check_finite(res.inputs)
        result = _format_output(is_tuple, res.inputs)
        tail: tuple = ()
        if return_convergence_delta:
            delta = res.delta()
            differentiable = create_graph or second_order == "exact"
            tail += (delta if differentiable else delta.detach(),)
        if latent:
            tail += (res.latent,)
        return (result, *tail) if tail else result

    def explained_forward(self, inputs: Union[Tensor, tuple[Tensor, ...]], target: Any = None,
                          additional_forward_args: Any = None, **model_kwargs: Any) -> Callable[..., Tensor]:
        """The function of the inputs whose output :meth:`attribute` explains: ``f(*inputs) -> Tensor [batch]``.

        It runs the model (with ``additional_forward_args`` / ``model_kwargs`` as for :meth:`attribute`) and
        selects the ``target`` scalar per example; it is what the relevance engine
        (:func:`lime_attr.attribution.engine.relevance`) runs inside the scope.
        """
        target = normalize_target(target)
        inputs_t = _format_tensor_into_tuples(inputs)
        forward_func, additional = self._forward_func(inputs_t, target, additional_forward_args, model_kwargs)

        def explained(*xs: Tensor) -> Tensor:
            return self._explained_output(forward_func, xs, additional, target)

        return explained

    def _explained_output(self, forward_func: Callable, work: Sequence[Tensor], additional: Any, target: Any) -> Tensor:
        """Run the model on ``work`` (inside the scope) and select the explained scalar per example: ``[batch]``."""
        try:
            raw = forward_func(*work, *(_format_additional_forward_args(additional) or ()))
        except (RuntimeError, ValueError, TypeError) as exc:
            if isinstance(exc, LimeAttrError):
                raise
            shapes = ", ".join(str(tuple(x.shape)) for x in work)
            raise forward_error(exc, f"the model's forward failed on input(s) of shape {shapes} (does the input "
                                     f"shape match the model?{_dtype_hint(self.model, work)})") from exc
        if not isinstance(raw, Tensor):
            raise TypeError(f"the model returned a {type(raw).__name__}, not a tensor: LRP explains one output tensor. "
                            "Wrap the model in a module whose forward returns the tensor to explain (e.g. "
                            "`lambda x: model(x)[0]` inside an nn.Module)")
        if target is None and is_hf_model(self.model) and raw.dim() == 2 and raw.shape[1] > 1:
            target = raw.detach().argmax(-1).tolist()  # the greedy token / predicted class, as ModalityAttribution
        validate_target(raw, target)
        out = _run_forward(lambda *a: raw, tuple(work), target, None) if target is not None else raw
        out = out.reshape(out.shape[0], -1)
        if out.shape[1] != 1:
            raise ValueError(f"the selected output has {out.shape[1]} values per example; the target must select "
                             "one scalar per example")
        out = out[:, 0]
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError("the explained output is NaN/inf; check the model's dtype (fp16 overflows "
                                     "easily: use bf16 or fp32) and its inputs")
        return out

    def _forward_func(self, inputs_t: tuple, target: Any, additional: Any, model_kwargs: dict):
        model = self.model
        if is_hf_model(model):
            keep = isinstance(target, tuple) or (isinstance(target, list) and target and isinstance(target[0], tuple))
            kw = dict(model_kwargs)
            input_name = kw.pop("input_name", None) or hf_input_name(model)
            fwd = HFForward(model, input_name, kw, keep)
            return fwd, additional
        if model_kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(model_kwargs)}; for plain torch models pass "
                            "extra model inputs through additional_forward_args")
        return model, additional


def _check_arguments(inputs: Any, create_graph: Any, return_convergence_delta: Any, second_order: Any) -> None:
    """The checks of :meth:`LRP.attribute`'s arguments that need no forward pass."""
    if not isinstance(inputs, (Tensor, tuple)):
        raise TypeError(f"inputs must be a torch.Tensor or a tuple of tensors (batch on dim 0), got "
                        f"{type(inputs).__name__}; convert it with torch.as_tensor(..., dtype=torch.float32)")
    for flag, value in (("create_graph", create_graph), ("return_convergence_delta", return_convergence_delta)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False, got {value!r}")
    if second_order not in SECOND_ORDERS:
        raise ValueError(f"second_order must be 'autograd' or 'exact', got {second_order!r}")
    check_autograd_mode("LRP.attribute")


def _dtype_hint(model: nn.Module, inputs: Sequence[Tensor]) -> str:
    """A hint naming the dtypes when the inputs' dtype differs from the parameters', else an empty string."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None or all(x.dtype == param.dtype for x in inputs):
        return ""
    got = ", ".join(sorted({str(x.dtype).replace("torch.", "") for x in inputs}))
    return (f" do the dtypes match? the inputs are {got}, the model's parameters "
            f"{str(param.dtype).replace('torch.', '')}: cast one to the other")
