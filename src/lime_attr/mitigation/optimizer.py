r"""``LimeOptimizer``: the inner loop of LIME for one generated token.

Per token, additive perturbations :math:`\Delta_K, \Delta_V` (zero-initialised leaf tensors, one pair
per perturbed decoder layer, shape ``[batch, kv_heads, seq, head_dim]``) are added to the keys and values
of the language model's attention -- after RoPE, before the kernel -- through the attribution scope's
public ``add_attention_transform``. Each inner step runs one forward of the whole sequence inside the scope, takes
the relevance

.. math:: R_i = \sum_d x_{id}\,\frac{\partial^{\mathrm{LRP}} z^*}{\partial x_{id}}

at the language model's input embeddings :math:`x` for the logit :math:`z^*` of the token the decoder
would emit (the relevance engine, :func:`lime_attr.attribution.engine.relevance`: one rule-modified
backward with ``create_graph=True``, exactly what ``LRP.attribute(..., create_graph=True)`` computes), and
minimises

.. math:: L = -\frac{1}{|M|}\sum_{i\in M}\log\operatorname{softmax}(R/\tau)_i + \lambda\,\mathrm{KL}

with the configured optimiser. The gradient of the relevance term is, by default
(``second_order="autograd"``), autograd's double backward through the rule-modified backward pass, as in
the reference code; ``second_order="exact"`` replaces it with the exact derivative of the relevance
(the engine's ``second_order="exact"``, :func:`lime_attr.attribution.exact.exact_attribute`: one
reverse-over-forward pass). The KL term's gradient
is the scope's rule-modified gradient in both settings. LIME never touches rules or canonizers: it uses
the attribution's scope (composite + canonizer bound to the model) and the scope's public
attention-transform hook.

What is explained (:math:`z^*` above), the relevance term of :math:`L` and a per-tensor scale of the
learning rate come from ``LimeConfig.objective`` (:mod:`lime_attr.mitigation.objectives`); the formulas
above are the default, ``"paper"``.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attribution.engine import relevance
from ..canonizers.facts import find_decoder
from ..modality import modality_share
from .attention import switch_attention
from .checkpoint import LayerCheckpoint
from .config import LimeConfig
from .objectives import Objective, checked_explained, checked_lr_scale, checked_relevance_loss
from .records import TokenRecord, step_record

__all__ = ["LimeOptimizer", "decoder_layers", "language_decoder", "kl_to_reference", "work_dtype"]

log = logging.getLogger(__name__)


@dataclass
class _StepOut:
    logits: Tensor  # [B, V] last-position logits (graph attached while optimising)
    relevance: Tensor  # [B, S]
    target: Tensor  # [B]
    explained: Optional[Tensor] = None  # [B] the objective's explained scalar (detached)


@dataclass
class _TokenState:
    """The mutable state of one token's inner loop (see :meth:`LimeOptimizer.optimize`)."""

    rec: TokenRecord
    pick: Callable[[Tensor], Tensor]
    valid: Tensor
    counts: Tensor
    mod_f: Tensor
    valid_f: Tensor
    active: Tensor
    ref_logits: Optional[Tensor] = None
    log_ref: Optional[Tensor] = None
    ref_raw: Optional[Tensor] = None
    fixed_target: Optional[Tensor] = None
    params: Any = None
    opt: Any = None
    last: Optional[_StepOut] = None
    fresh: bool = False
    best: float = math.inf
    stall: int = 0
    steps_run: int = 0
    share0: Optional[Tensor] = None


def language_decoder(model: nn.Module) -> nn.Module:
    """The language model's decoder (the module holding the ``layers`` ModuleList) of an HF model.

    Where it is, is a family fact (:func:`lime_attr.canonizers.facts.find_decoder`).
    """
    return find_decoder(model)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The language model's decoder layers."""
    return list(language_decoder(model).layers)


def modality_focus(relevance: Tensor, modality: Tensor, valid: Tensor, tau: float) -> Tensor:
    """Mass of ``softmax(R / tau)`` (over the valid positions) on the perceptual positions, per row."""
    r = (relevance.detach() / tau).masked_fill(valid == 0, float("-inf"))
    return (torch.softmax(r, -1) * modality).sum(-1)


class LimeOptimizer:
    r"""Optimise :math:`\Delta_K, \Delta_V` for one generated token at a time.

    Parameters
    ----------
    attribution : LRP or ModalityAttribution
        Any lime_attr attribution with a ``model`` and a ``scope()`` (the rules it explains with).
        Relevance is taken at the language model's input embeddings.
    config : LimeConfig, optional

    Notes
    -----
    Use :meth:`session` around a sequence of :meth:`optimize` calls (``lime_generate`` does): it sets the
    attention implementation, freezes the parameters' ``requires_grad`` flags (restored exactly) and
    enters the scope once. Parameters are never written.
    """

    def __init__(self, attribution: Any, config: Optional[LimeConfig] = None) -> None:
        model = getattr(attribution, "model", None)
        if not isinstance(model, nn.Module) or not callable(getattr(attribution, "scope", None)):
            raise TypeError("LimeOptimizer needs a lime_attr attribution (LRP or ModalityAttribution) built on the "
                            f"model; got {type(attribution).__name__}")
        self.attribution = attribution
        self.model = model
        self.config = (config or LimeConfig()).validate()
        try:
            layers = decoder_layers(model)
        except TypeError as exc:
            if self.config.activation_checkpoint:
                raise ValueError(f"LimeConfig.activation_checkpoint checkpoints the language model's decoder layers, "
                                 f"and {type(model).__name__} has none LIME can find ({exc}). Set "
                                 "activation_checkpoint=False, or pass a model with a decoder") from exc
            raise
        self._layers = layers
        self.num_layers = len(layers)
        self.layer_ids = self.config.validate_for(self.num_layers)
        self.objective: Objective = self.config.objective_impl
        self._lr_scales: dict[int, tuple[float, float]] = {}  # per layer, from its unperturbed keys / values
        self._attn_index = {id(layers[i].self_attn): i for i in self.layer_ids}
        self._deltas: dict[int, tuple[Optional[Tensor], Optional[Tensor]]] = {}
        self._pos_mask: Optional[Tensor] = None
        self._grad_deltas = True
        self._emitting = False  # the no-grad emission forward is running (its transform adds the final Delta)
        self._in_session = False
        self._checkpoint: Optional[LayerCheckpoint] = None
        self.events: Optional[list] = None  # set to a list to record the step order

    # ------------------------------------------------------------------ session
    @property
    def in_session(self) -> bool:
        """Whether :meth:`session` is entered (the scope installed, the attention implementation switched)."""
        return self._in_session

    @contextlib.contextmanager
    def session(self) -> Iterator["LimeOptimizer"]:
        """Attention implementation switched, parameters frozen, scope entered; all restored on exit."""
        if self._in_session:
            yield self
            return
        model = self.model
        flags = [(p, p.requires_grad) for p in model.parameters()]
        restore_attn = switch_attention(model, self.config.attn_implementation)
        scope = self.attribution.scope()
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            with scope, contextlib.ExitStack() as stack:
                transform = scope.add_attention_transform(self._transform, stage=self.config.placement)
                stack.callback(transform.remove)
                emission = scope.add_attention_transform(self._emission_transform, stage=self.config.placement,
                                                         also_without_grad=True)
                stack.callback(emission.remove)
                if self.config.activation_checkpoint:
                    self._checkpoint = stack.enter_context(LayerCheckpoint(
                        self._layers, self.layer_ids, self, scope, self.config.release_heap).installed())
                self._in_session = True
                try:
                    yield self
                finally:
                    self._in_session = False
                    self._checkpoint = None
                    self._deltas.clear()
        finally:
            for p, f in flags:
                p.requires_grad_(f)
            restore_attn()

    # ------------------------------------------------------------------ the attention transform
    def _transform(self, module: nn.Module, q: Tensor, k: Tensor, v: Tensor, kwargs: dict):
        """Add this token's Delta_K / Delta_V to the keys and values of a perturbed layer's attention.

        Runs at the configured stage of the scope's attention bridge (``delta_placement``); with
        ``delta_heads="query"`` the keys and values are first repeated to one head per query head (the
        grouped-query repeat), so that Delta has the released code's layout ``[batch, heads, seq, dim]``.
        """
        idx = self._attn_index.get(id(module))
        if idx is None:
            return q, k, v
        if self.config.heads == "query" and k.shape[1] != q.shape[1]:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        pair = self._deltas.get(idx)
        if pair is None:
            if not self._grad_deltas:
                return q, k, v
            pair = self._deltas[idx] = self._new_deltas(k.shape, v.shape, k.dtype, k.device)
        if idx not in self._lr_scales and self.objective.scales_lr():  # (the first forward of the token)
            self._lr_scales[idx] = checked_lr_scale(self.objective, k.detach(), v.detach())
        dk, dv = pair
        if dk is not None:
            if dk.shape != k.shape:
                raise RuntimeError(f"layer {idx}: key shape {tuple(k.shape)} changed within one token "
                                   f"(Delta_K has {tuple(dk.shape)})")
            k = k + self._masked(dk).to(k.dtype)
        if dv is not None:
            v = v + self._masked(dv).to(v.dtype)
        return q, k, v

    def _emission_transform(self, module: nn.Module, q: Tensor, k: Tensor, v: Tensor, kwargs: dict):
        """The final Delta in the no-grad emission forward (:meth:`_emitting`); the identity in every other
        forward (those with grad get :meth:`_transform`)."""
        if not self._emitting or torch.is_grad_enabled():
            return q, k, v
        return self._transform(module, q, k, v, kwargs)

    @contextlib.contextmanager
    def _emitting_without_grad(self) -> Iterator[None]:
        """A forward with the final, fixed Delta (``_grad_deltas`` already off) and no gradients: no rule runs
        (rules change only gradients), no graph is built."""
        self._emitting = True
        try:
            with torch.no_grad():
                yield
        finally:
            self._emitting = False

    def delta_pair(self, layer: int, hidden_states: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """``(Delta_K, Delta_V)`` of decoder layer ``layer`` for the current token, created (zero) for
        ``hidden_states`` ``[batch, seq, hidden]`` from the attention module's head counts if not yet (the
        activation checkpoint needs them before the layer runs)."""
        pair = self._deltas.get(layer)
        if pair is None:
            attn = self._layers[layer].self_attn
            cfg, head_dim = getattr(attn, "config", None), getattr(attn, "head_dim", None)
            heads = getattr(cfg, "num_attention_heads" if self.config.heads == "query" else "num_key_value_heads",
                            None)
            if not isinstance(heads, int) or not isinstance(head_dim, int):
                raise TypeError(f"LimeConfig.activation_checkpoint: cannot read the head count and head_dim of "
                                f"{type(attn).__name__} (layer {layer}). Set activation_checkpoint=False")
            shape = (*hidden_states.shape[:1], heads, hidden_states.shape[1], head_dim)
            pair = self._deltas[layer] = self._new_deltas(shape, shape, hidden_states.dtype, hidden_states.device)
        return pair

    @contextlib.contextmanager
    def substitute_deltas(self, layer: int, pair: tuple[Optional[Tensor], Optional[Tensor]]) -> Iterator[None]:
        """While active, the attention transform adds ``pair`` to layer ``layer`` (the activation checkpoint's
        recomputation differentiates with respect to its own copies)."""
        previous = self._deltas.get(layer)
        self._deltas[layer] = pair
        try:
            yield
        finally:
            if previous is None:
                self._deltas.pop(layer, None)
            else:
                self._deltas[layer] = previous

    def _new_deltas(self, k_shape: Any, v_shape: Any, dtype: torch.dtype,
                    device: torch.device) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Zero-initialised leaf perturbations of the keys' and values' shapes (those the config perturbs), in
        LIME's working dtype for a model computing in ``dtype``."""
        dt = self._dtype(dtype)
        dk = torch.zeros(k_shape, dtype=dt, device=device, requires_grad=True) if "k" in self.config.perturb else None
        dv = torch.zeros(v_shape, dtype=dt, device=device, requires_grad=True) if "v" in self.config.perturb else None
        return dk, dv

    def _masked(self, delta: Tensor) -> Tensor:
        d = delta if self._grad_deltas else delta.detach()
        return d * self._pos_mask if self._pos_mask is not None else d

    def _dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype of LIME's own tensors for a model computing in ``dtype`` (``precision``)."""
        return work_dtype(dtype, self.config.precision)

    def _work(self, t: Tensor) -> Tensor:
        return t.to(self._dtype(t.dtype))

    # ------------------------------------------------------------------ one forward + relevance
    def _forward(self, embeds: Tensor, model_kwargs: dict, pick: Callable[[Tensor], Tensor],
                 with_relevance: bool, create_graph: bool, step: Optional[int] = None) -> _StepOut:
        """One forward of the model on ``embeds``; with relevance, the relevance engine's forward + backward.

        The explained output is the objective's scalar (:meth:`Objective.explained
        <lime_attr.mitigation.objectives.Objective.explained>`; ``"paper"``: the logit) for the token ``pick``
        chooses (fixed at the first call, so that the exact second order's tangent pass explains the same
        token). With ``second_order="exact"`` the relevance is differentiated exactly (the engine's exact path).
        """
        seen: dict[str, Tensor] = {}

        def explained(x: Tensor) -> Tensor:
            out = self.model(inputs_embeds=x, **model_kwargs)
            logits = self._work((out.logits if hasattr(out, "logits") else out[0])[:, -1, :])
            if "target" not in seen:
                seen["logits"], seen["target"] = logits, pick(logits.detach())
                if step is not None:
                    self._event("decode", step)
            z = checked_explained(self.objective, logits, seen["target"].to(logits.device))
            if with_relevance and not bool(torch.isfinite(z.detach()).all()):
                raise FloatingPointError("the explained logit is NaN/inf; check the model's dtype and the perturbation "
                                         "(lr)")
            return z

        if not with_relevance:
            with torch.enable_grad():
                explained(embeds.detach())
            if self.attribution.scope().pop_carriers():
                raise TypeError(_NO_CARRIERS)
            return _StepOut(seen["logits"], torch.empty(0), seen["target"])
        exact = create_graph and self.config.second_order == "exact"
        res = relevance(self.attribution.scope(), explained, [embeds.detach()], create_graph=create_graph and not exact,
                        second_order="exact" if exact else "autograd", retain_graph=exact, carriers="refuse",
                        wrt=self._perturbations if exact else None)
        rel = self._work(res.inputs[0]).sum(-1)  # (float32: the sum over the hidden dimension upcast too)
        if not create_graph:
            rel = rel.detach()
        return _StepOut(seen["logits"], rel, seen["target"], res.output.detach())

    def _perturbations(self) -> list[Tensor]:
        """The current Delta_K / Delta_V tensors (what the exact relevance is differentiated w.r.t.)."""
        return [d for pair in self._deltas.values() for d in pair if d is not None]

    def _event(self, *e: Any) -> None:
        if self.events is not None:
            self.events.append(e)

    # ------------------------------------------------------------------ main
    def optimize(self, embeds: Tensor, model_kwargs: dict, modality: Tensor, valid: Tensor,
                 pick: Optional[Callable[[Tensor], Tensor]] = None, ref_logits: Optional[Tensor] = None,
                 active: Optional[Tensor] = None, index: int = 0,
                 emit_fn: Optional[Callable[[], Tensor]] = None) -> tuple[Tensor, Tensor, TokenRecord]:
        """Run the inner loop for the next token of every row.

        Parameters
        ----------
        embeds : Tensor
            ``[B, S, D]`` input embeddings of the language model (perceptual features scattered in).
        model_kwargs : dict
            ``attention_mask``, ``position_ids``... for the model's forward with ``inputs_embeds``.
        modality, valid : Tensor
            ``[B, S]`` bool: perceptual positions M; non-padding positions.
        pick : callable, optional
            ``logits [B, V] -> token ids [B]``: the decoder (processors + greedy or fixed-noise sampling);
            default greedy (argmax).
        ref_logits : Tensor, optional
            ``[B, V]`` unperturbed next-token logits if already known (KV-cache pass); otherwise taken
            from the first inner forward, where the perturbation is zero.
        active : Tensor, optional
            ``[B]`` bool: rows to optimise (others keep Delta = 0 and emit their unperturbed token).
        emit_fn : callable, optional
            ``() -> logits [B, V]``: for ``emit="cached"``, a forward of the caller's KV-cache step (the
            final perturbation is applied by the attention transform while it runs).

        Returns
        -------
        logits : Tensor
            ``[B, V]`` logits the token is emitted from (``config.emit_from``).
        ref_logits : Tensor
            ``[B, V]`` unperturbed logits (the given ones, or those of the first inner forward).
        record : TokenRecord
        """
        if not self._in_session:
            with self.session():
                return self.optimize(embeds, model_kwargs, modality, valid, pick, ref_logits, active, index, emit_fn)
        st = self._begin(embeds, modality, valid, pick, ref_logits, active, index)
        n_updates, lr = self.config.schedule
        try:
            for s in range(n_updates):
                out = self._inner_forward(st, embeds, model_kwargs, s, lr)
                loss_rows = self._record_step(st, out, s)
                if self._stops(st, loss_rows, s):
                    break
                self._update(st, loss_rows, s)
                del out, loss_rows
            st.rec.steps = st.steps_run
            if n_updates == 0 and st.rec.skipped is None:
                st.rec.skipped = "steps=0"
            emit = self._emission(st, embeds, model_kwargs, emit_fn)
            ref = st.ref_logits if st.ref_logits is not None else (st.ref_raw if st.ref_raw is not None else emit)
            ref = ref.detach().float()
            inactive = ~st.active
            if bool(inactive.any()):
                emit = torch.where(inactive[:, None], ref.to(emit.device), emit)
            return emit, ref, st.rec
        finally:
            st.opt = st.params = None
            self._deltas.clear()
            self._lr_scales.clear()
            self._pos_mask = None
            self._grad_deltas = True

    def _begin(self, embeds: Tensor, modality: Tensor, valid: Tensor, pick: Optional[Callable],
               ref_logits: Optional[Tensor], active: Optional[Tensor], index: int) -> "_TokenState":
        """The state of one token's inner loop (inputs checked, records initialised, Delta cleared)."""
        cfg, B = self.config, embeds.shape[0]
        modality = modality.to(embeds.device).bool()
        valid = valid.to(embeds.device).bool()
        counts = (modality & valid).sum(-1)
        if bool((counts == 0).any()):
            rows = (counts == 0).nonzero().flatten().tolist()
            raise ValueError(f"the modality span is empty for batch row(s) {rows}: LIME needs perceptual (image / "
                             "audio) positions to shift relevance to")
        nan = [float("nan")] * B
        rec = TokenRecord(index=index, share_before=list(nan), share_after=list(nan), focus_before=list(nan),
                          focus_after=list(nan))
        st = _TokenState(rec=rec, pick=pick or (lambda logits: logits.argmax(-1)), valid=valid, counts=counts,
                         mod_f=modality.float(), valid_f=valid.float(), ref_logits=ref_logits,
                         active=(torch.ones(B, dtype=torch.bool, device=embeds.device) if active is None
                                 else active.to(embeds.device)))
        if ref_logits is not None:
            st.log_ref = F.log_softmax(self._work(ref_logits.detach()), -1)
            if cfg.target_rule == "fixed":
                st.fixed_target = st.pick(ref_logits.detach().float())
        self._pos_mask = modality.float()[:, None, :, None] if cfg.positions == "modality" else None
        self._deltas.clear()
        self._grad_deltas = True
        return st

    def _inner_forward(self, st: "_TokenState", embeds: Tensor, model_kwargs: dict, s: int, lr: float) -> _StepOut:
        """Step ``s``'s forward and relevance (with graph); at step 0 also the optimiser and the references."""
        self._event("forward", s)
        pick = (lambda _l, t=st.fixed_target: t) if st.fixed_target is not None else st.pick  # noqa: E731
        with self._checkpointing(embeds, model_kwargs):
            out = self._forward(embeds, model_kwargs, pick, with_relevance=True, create_graph=True, step=s)
        self._event("relevance", s)
        if s > 0:
            return out
        st.params = [d for pair in self._deltas.values() for d in pair if d is not None]
        if not st.params:
            raise RuntimeError("no attention call of the perturbed layers went through the scope's attention bridge: "
                               "is a canonizer for this model registered?")
        st.opt = self._make_optimizer(st.params, lr)
        if st.log_ref is None:
            st.ref_raw = out.logits.detach()
            st.log_ref = F.log_softmax(st.ref_raw, -1)
        if st.fixed_target is None and self.config.target_rule == "fixed":
            st.fixed_target = out.target
        st.share0 = modality_share(out.relevance.detach(), st.mod_f, st.valid_f)
        st.rec.share_before = st.share0.tolist()
        st.rec.focus_before = modality_focus(out.relevance, st.mod_f, st.valid_f, self.config.temperature).tolist()
        if self.config.record_relevance:
            st.rec.relevance_before = out.relevance.detach().cpu()
        return out

    @contextlib.contextmanager
    def _checkpointing(self, embeds: Tensor, model_kwargs: dict) -> Iterator[None]:
        """The activation checkpoint active (``LimeConfig.activation_checkpoint``); before its first use the
        scope's op-coverage check runs on a short prefix, so that the check sees every op."""
        if self._checkpoint is None:
            yield
            return
        scope = self.attribution.scope()
        if scope.check_ops == "always":
            raise ValueError("LimeConfig.activation_checkpoint: the attribution's scope runs the op-coverage check on "
                             "every forward (check_ops='always'), which sees each layer's ops only without the "
                             "checkpoint. Use check_ops='first' or set activation_checkpoint=False")
        if scope.op_check_pending:
            n = min(embeds.shape[1], 4)
            with torch.enable_grad():
                self.model(inputs_embeds=embeds[:, :n].detach().requires_grad_(True), **_prefix(model_kwargs,
                                                                                                embeds.shape[1], n))
            scope.pop_carriers()
            self._deltas.clear()  # (the prefix's perturbations and lr scales)
            self._lr_scales.clear()
        if scope.applies_op_rules:
            raise ValueError(f"LimeConfig.activation_checkpoint: the composite applies op rules "
                             f"({', '.join(sorted(scope.ruled_ops))}) in this model's forward, which a layer checkpoint "
                             "cannot replay. Set activation_checkpoint=False")
        with self._checkpoint.active():
            yield

    def _param_lrs(self, lr: float) -> Optional[list[float]]:
        """Per Delta tensor (the order of ``st.params``), ``lr`` times the objective's ``lr_scale``; None when
        the objective does not scale the lr."""
        if not self.objective.scales_lr():
            return None
        lrs = []
        for idx, pair in self._deltas.items():
            scales = self._lr_scales[idx]
            lrs += [lr * sc for d, sc in zip(pair, scales) if d is not None]
        return lrs

    def _make_optimizer(self, params: list, lr: float) -> Any:
        """The inner optimiser over ``params`` (one lr per tensor where the objective scales it)."""
        lrs = self._param_lrs(lr)
        if self.config.mode == "fast":
            # the same arithmetic as torch.optim's single-tensor Adam / plain SGD (tested bit for bit) without
            # its per-call machinery, which costs milliseconds per token
            return _InnerOptimizer(params, lr if lrs is None else lrs, self.config.optimizer)
        groups: Any = params if lrs is None else [{"params": [p], "lr": r} for p, r in zip(params, lrs)]
        return torch.optim.Adam(groups, lr=lr) if self.config.optimizer == "adam" else torch.optim.SGD(groups, lr=lr)

    def _record_step(self, st: "_TokenState", out: _StepOut, s: int) -> Tensor:
        """The step's losses per row (with graph), written to the token's record."""
        cfg, rec = self.config, st.rec
        rel_loss, kl = self._losses(out, st.log_ref, st.mod_f, st.valid)
        loss_rows = rel_loss + cfg.kl_weight * kl
        rec.losses.append(loss_rows.detach().tolist())
        rec.rel_losses.append(rel_loss.detach().tolist())
        rec.kl.append(kl.detach().tolist())
        share = modality_share(out.relevance.detach(), st.mod_f, st.valid_f)
        focus = modality_focus(out.relevance, st.mod_f, st.valid_f, cfg.temperature)
        rec.share_after, rec.focus_after = share.tolist(), focus.tolist()
        if cfg.record_relevance:
            rec.relevance_after = out.relevance.detach().cpu()
        if cfg.record == "steps":
            rec.step_records.append(step_record(s, out, (loss_rows, rel_loss, kl), self._deltas, share, focus,
                                                cfg.top_k_logits))
        self._event("loss", s)
        st.last = _StepOut(out.logits.detach(), torch.empty(0), out.target)
        st.fresh = True  # `last` was computed with the current perturbation
        return loss_rows

    def _stops(self, st: "_TokenState", loss_rows: Tensor, s: int) -> bool:
        """Fast mode's share gate (before the first update) and early stopping; records why it stopped."""
        cfg = self.config
        if cfg.mode != "fast":
            return False
        if s == 0 and cfg.share_gate is not None:
            st.active = st.active & (st.share0 < cfg.share_gate)
        if not bool(st.active.any()):
            st.rec.skipped = st.rec.skipped or "share"
            st.rec.skip_reason = st.rec.skip_reason or (
                f"share of relevance {max(st.share0.tolist()):.3g} >= share_gate {cfg.share_gate}")
            return True
        total = float((loss_rows.detach() * st.active).sum())
        if cfg.patience > 0 and s > 0:
            if total > st.best - cfg.tol * abs(st.best):
                st.stall += 1
                if st.stall >= cfg.patience:
                    st.rec.skipped = "early_stop"
                    st.rec.skip_reason = f"loss improved by less than tol={cfg.tol} for {cfg.patience} step(s)"
                    return True
            else:
                st.stall = 0
        st.best = min(st.best, total)
        return False

    def _update(self, st: "_TokenState", loss_rows: Tensor, s: int) -> None:
        """One optimiser update of Delta on the active rows' loss."""
        grads = torch.autograd.grad((loss_rows * st.active).sum(), st.params, allow_unused=True)
        self._event("backward", s)
        for p, g in zip(st.params, grads):
            p.grad = None if g is None else g.detach()
        del grads
        st.opt.step()
        st.opt.zero_grad(set_to_none=True)
        st.fresh = False
        st.steps_run += 1
        self._event("update", s)

    def _emission(self, st: "_TokenState", embeds: Tensor, model_kwargs: dict,
                  emit_fn: Optional[Callable[[], Tensor]]) -> Tensor:
        """The emission policy: which logits the token comes from (``LimeConfig.emit``)."""
        cfg, last = self.config, st.last
        if last is None:
            self._event("emit", "unperturbed")
            if st.ref_logits is not None:
                return st.ref_logits.detach().float()
            self._grad_deltas = False
            return self._forward(embeds, model_kwargs, st.pick, False, False).logits.detach()
        if cfg.emit_from == "last_forward" or st.steps_run == 0 or st.fresh:
            # (fresh: stopped early right after a forward, which already saw the final perturbation)
            reused = st.fresh and cfg.emit_from != "last_forward" and st.steps_run > 0
            self._event("emit", "reused_final" if reused else "last_forward")
            return last.logits
        self._grad_deltas = False
        if cfg.emit_from == "cached" and emit_fn is not None:
            self._event("emit", "cached")
            with self._emitting_without_grad():
                return emit_fn().detach().float()
        self._event("emit", "final")
        if not cfg.final_relevance:
            with self._emitting_without_grad():
                out = self.model(inputs_embeds=embeds.detach(), **model_kwargs)
            return self._work((out.logits if hasattr(out, "logits") else out[0])[:, -1, :])
        # relevance under the perturbation the token is emitted from (first order, no graph)
        fin = self._forward(embeds, model_kwargs, st.pick, True, False)
        st.rec.share_after = modality_share(fin.relevance.detach(), st.mod_f, st.valid_f).tolist()
        st.rec.focus_after = modality_focus(fin.relevance, st.mod_f, st.valid_f, cfg.temperature).tolist()
        if cfg.record_relevance:
            st.rec.relevance_after = fin.relevance.detach().cpu()
        return fin.logits.detach()

    def _losses(self, out: _StepOut, log_ref: Tensor, mod_f: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """``(relevance loss, KL)`` per row: the objective's relevance loss and the KL to the reference
        (``mod_f``: the perceptual positions, 0 / 1)."""
        rel_loss = checked_relevance_loss(self.objective, out.relevance, mod_f.bool(), valid.bool(),
                                          self.config.temperature)
        return rel_loss, kl_to_reference(log_ref, out.logits, self.config.kl_direction)


_NO_CARRIERS = ("LIME takes relevance at the input embeddings; first-layer rules (flat / wsquare / zbox) that need "
                "carrier tensors are not supported. Use a composite without them")


def _prefix(model_kwargs: dict, length: int, n: int) -> dict:
    """``model_kwargs`` for the first ``n`` of ``length`` positions (tensors sliced along their last dimension,
    and the one before it for square masks)."""
    out = {}
    for key, value in model_kwargs.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[-1] == length:
            value = value[..., :n]
            if value.dim() > 1 and value.shape[-2] == length:
                value = value[..., :n, :]
        out[key] = value
    return out


def work_dtype(dtype: torch.dtype, precision: str = "float32") -> torch.dtype:
    """The dtype of LIME's own tensors (perturbations, logits, relevance, losses) for a model computing in
    ``dtype``: float32, or float64 for a float64 model (so that the loop can be checked against finite
    differences); the model's own with ``precision="model"``."""
    if precision == "model":
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def kl_to_reference(log_ref: Tensor, logits: Tensor, direction: str) -> Tensor:
    """LIME's KL term per row between the reference log-probabilities and those of ``logits``
    (``LimeConfig.kl_direction``: ``"ref||delta"`` as the reference code, or ``"delta||ref"``)."""
    log_delta = F.log_softmax(logits, -1)
    if direction == "ref||delta":
        return (log_ref.exp() * (log_ref - log_delta)).sum(-1)
    return (log_delta.exp() * (log_delta - log_ref)).sum(-1)


class _InnerOptimizer:
    """Adam (betas 0.9 / 0.999, eps 1e-8, no weight decay) or plain SGD over a few tensors, with exactly the
    operations of ``torch.optim.Adam(foreach=False)`` / ``torch.optim.SGD`` (their single-tensor path,
    the default on CPU): the same numbers bit for bit, without the optimiser framework's per-step
    overhead. Used by fast mode; reference mode keeps ``torch.optim``. ``lr`` is one learning rate, or a
    list of one per tensor (an objective's ``lr_scale``)."""

    def __init__(self, params: list, lr: Any, kind: str = "adam", betas: tuple = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = list(params)
        self.lrs = [float(r) for r in lr] if isinstance(lr, (list, tuple)) else [float(lr)] * len(self.params)
        if len(self.lrs) != len(self.params):
            raise ValueError(f"_InnerOptimizer: {len(self.lrs)} learning rates for {len(self.params)} tensors")
        self.lr, self.kind, self.betas, self.eps = self.lrs[0] if self.lrs else 0.0, kind, betas, eps
        self.steps = [0] * len(self.params)
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params] \
            if kind == "adam" else []
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params] \
            if kind == "adam" else []

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        if self.kind != "adam":
            for p, g, lr in zip(self.params, grads, self.lrs):
                if g is not None:
                    p.add_(g, alpha=-lr)
            return
        beta1, beta2 = self.betas
        for i, (p, g, m, v) in enumerate(zip(self.params, grads, self.exp_avg, self.exp_avg_sq)):
            if g is None:  # torch.optim skips such a parameter, its step count included
                continue
            self.steps[i] += 1
            step = float(self.steps[i])
            bias_correction1 = 1 - beta1 ** step
            bias_correction2 = 1 - beta2 ** step
            step_size = self.lrs[i] / bias_correction1
            bias_correction2_sqrt = bias_correction2 ** 0.5
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
