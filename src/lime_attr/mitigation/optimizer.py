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
from .config import LimeConfig

__all__ = ["LimeOptimizer", "TokenRecord", "decoder_layers", "language_decoder"]

log = logging.getLogger(__name__)


@dataclass
class TokenRecord:
    r"""What the inner loop did for one generated position (one entry per batch row where relevant).

    Attributes
    ----------
    index : int
        Position in the answer (0 = first generated token).
    tokens : list of int
        Emitted token per row.
    unperturbed_tokens : list of int
        The token the unperturbed model would have emitted (same sampling noise).
    changed : list of bool
        Whether LIME changed the token.
    share_before, share_after : list of float
        Perceptual share of relevance :math:`\sum_M |R| / \sum |R|` (the paper's "modality reliance")
        without the perturbation and under the last perturbation whose relevance was computed (``nan``
        where not computed).
    focus_before, focus_after : list of float
        The quantity the objective raises: the mass of :math:`\operatorname{softmax}(R/\tau)` on M.
    losses, rel_losses, kl : list of list of float
        Per inner step (outer list) and row (inner list): total loss, relevance loss, KL term.
    steps : int
        Optimiser updates applied.
    skipped : str or None
        Why the optimisation was skipped or stopped early (``"confidence"``, ``"share"``,
        ``"early_stop"``, ``"steps=0"``), else None.
    relevance_before, relevance_after : Tensor or None
        ``[batch, seq]`` relevance vectors (only with ``record_relevance``).
    """

    index: int
    tokens: list = field(default_factory=list)
    unperturbed_tokens: list = field(default_factory=list)
    changed: list = field(default_factory=list)
    share_before: list = field(default_factory=list)
    share_after: list = field(default_factory=list)
    focus_before: list = field(default_factory=list)
    focus_after: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    rel_losses: list = field(default_factory=list)
    kl: list = field(default_factory=list)
    steps: int = 0
    skipped: Optional[str] = None
    relevance_before: Optional[Tensor] = None
    relevance_after: Optional[Tensor] = None


@dataclass
class _StepOut:
    logits: Tensor  # [B, V] last-position logits (graph attached while optimising)
    relevance: Tensor  # [B, S]
    target: Tensor  # [B]


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
        layers = decoder_layers(model)
        self.num_layers = len(layers)
        self.layer_ids = self.config.validate_for(self.num_layers)
        self._attn_index = {id(layers[i].self_attn): i for i in self.layer_ids}
        self._deltas: dict[int, tuple[Optional[Tensor], Optional[Tensor]]] = {}
        self._pos_mask: Optional[Tensor] = None
        self._grad_deltas = True
        self._in_session = False
        self.events: Optional[list] = None  # set to a list to record the step order

    # ------------------------------------------------------------------ session
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
            with scope:
                transform = scope.add_attention_transform(self._transform)
                self._in_session = True
                try:
                    yield self
                finally:
                    self._in_session = False
                    transform.remove()
                    self._deltas.clear()
        finally:
            for p, f in flags:
                p.requires_grad_(f)
            restore_attn()

    # ------------------------------------------------------------------ the attention transform
    def _transform(self, module: nn.Module, q: Tensor, k: Tensor, v: Tensor, kwargs: dict):
        idx = self._attn_index.get(id(module))
        if idx is None:
            return q, k, v
        pair = self._deltas.get(idx)
        perturb = self.config.perturb
        if pair is None:
            if not self._grad_deltas:
                return q, k, v
            dk = dv = None
            dt = _work_dtype(k.dtype)
            if "k" in perturb:
                dk = torch.zeros(k.shape, dtype=dt, device=k.device, requires_grad=True)
            if "v" in perturb:
                dv = torch.zeros(v.shape, dtype=dt, device=v.device, requires_grad=True)
            pair = self._deltas[idx] = (dk, dv)
        dk, dv = pair
        mask = self._pos_mask
        if dk is not None:
            if dk.shape != k.shape:
                raise RuntimeError(f"layer {idx}: key shape {tuple(k.shape)} changed within one token "
                                   f"(Delta_K has {tuple(dk.shape)})")
            d = dk if self._grad_deltas else dk.detach()
            d = d * mask if mask is not None else d
            k = k + d.to(k.dtype)
        if dv is not None:
            d = dv if self._grad_deltas else dv.detach()
            d = d * mask if mask is not None else d
            v = v + d.to(v.dtype)
        return q, k, v

    # ------------------------------------------------------------------ one forward + relevance
    def _forward(self, embeds: Tensor, model_kwargs: dict, pick: Callable[[Tensor], Tensor],
                 with_relevance: bool, create_graph: bool, step: Optional[int] = None) -> _StepOut:
        """One forward of the model on ``embeds``; with relevance, the relevance engine's forward + backward.

        The explained output is the logit of the token ``pick`` chooses (fixed at the first call, so that
        the exact second order's tangent pass explains the same token). With ``second_order="exact"``
        the relevance is differentiated exactly (the engine's exact path).
        """
        seen: dict[str, Tensor] = {}

        def explained(x: Tensor) -> Tensor:
            out = self.model(inputs_embeds=x, **model_kwargs)
            logits = _work((out.logits if hasattr(out, "logits") else out[0])[:, -1, :])
            if "target" not in seen:
                seen["logits"], seen["target"] = logits, pick(logits.detach())
                if step is not None:
                    self._event("decode", step)
            z = logits.gather(1, seen["target"][:, None].to(logits.device))[:, 0]
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
        rel = _work(res.inputs[0].sum(-1))
        if not create_graph:
            rel = rel.detach()
        return _StepOut(seen["logits"], rel, seen["target"])

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
        cfg = self.config
        if not self._in_session:
            with self.session():
                return self.optimize(embeds, model_kwargs, modality, valid, pick, ref_logits, active, index, emit_fn)
        B = embeds.shape[0]
        if pick is None:
            pick = lambda logits: logits.argmax(-1)  # noqa: E731
        modality = modality.to(embeds.device).bool()
        valid = valid.to(embeds.device).bool()
        counts = (modality & valid).sum(-1)
        if bool((counts == 0).any()):
            rows = (counts == 0).nonzero().flatten().tolist()
            raise ValueError(f"the modality span is empty for batch row(s) {rows}: LIME needs perceptual (image / "
                             "audio) positions to shift relevance to")
        active = torch.ones(B, dtype=torch.bool, device=embeds.device) if active is None else active.to(embeds.device)
        rec = TokenRecord(index=index)
        mod_f, valid_f = modality.float(), valid.float()
        self._pos_mask = modality.float()[:, None, :, None] if cfg.positions == "modality" else None
        self._deltas.clear()
        self._grad_deltas = True
        params: list[Tensor] = []
        opt: Any = None
        log_ref: Optional[Tensor] = None if ref_logits is None else F.log_softmax(ref_logits.detach().float(), -1)
        fixed_target: Optional[Tensor] = None
        ref_raw: Optional[Tensor] = None
        if cfg.target_rule == "fixed" and ref_logits is not None:
            fixed_target = pick(ref_logits.detach().float())
        last: Optional[_StepOut] = None
        best, stall = math.inf, 0
        nan = [float("nan")] * B
        rec.share_before, rec.share_after = list(nan), list(nan)
        rec.focus_before, rec.focus_after = list(nan), list(nan)
        tau = cfg.temperature
        steps_run = 0
        fresh = False
        n_updates, lr = cfg.schedule
        try:
            for s in range(n_updates):
                self._event("forward", s)
                if fixed_target is not None:
                    pick_s = lambda _l, t=fixed_target: t  # noqa: E731
                else:
                    pick_s = pick
                out = self._forward(embeds, model_kwargs, pick_s, with_relevance=True, create_graph=True, step=s)
                self._event("relevance", s)
                if s == 0:
                    params = [d for pair in self._deltas.values() for d in pair if d is not None]
                    if not params:
                        raise RuntimeError("no attention call of the perturbed layers went through the scope's "
                                           "attention bridge: is a canonizer for this model registered?")
                    if cfg.mode == "fast":
                        # same arithmetic as torch.optim's single-tensor Adam / plain SGD (tested bit for
                        # bit) without its per-call machinery, which costs milliseconds per token
                        opt = _InnerOptimizer(params, lr, cfg.optimizer)
                    else:
                        opt = (torch.optim.Adam(params, lr=lr) if cfg.optimizer == "adam"
                               else torch.optim.SGD(params, lr=lr))
                    if log_ref is None:
                        ref_raw = out.logits.detach()
                        log_ref = F.log_softmax(ref_raw, -1)
                    if fixed_target is None and cfg.target_rule == "fixed":
                        fixed_target = out.target
                    share0 = modality_share(out.relevance.detach(), mod_f, valid_f)
                    rec.share_before = share0.tolist()
                    rec.focus_before = modality_focus(out.relevance, mod_f, valid_f, tau).tolist()
                    if cfg.record_relevance:
                        rec.relevance_before = out.relevance.detach().cpu()
                rel_loss, kl = self._losses(out, log_ref, mod_f, valid, counts)
                loss_rows = rel_loss + cfg.kl_weight * kl
                rec.losses.append(loss_rows.detach().tolist())
                rec.rel_losses.append(rel_loss.detach().tolist())
                rec.kl.append(kl.detach().tolist())
                rec.share_after = modality_share(out.relevance.detach(), mod_f, valid_f).tolist()
                rec.focus_after = modality_focus(out.relevance, mod_f, valid_f, tau).tolist()
                if cfg.record_relevance:
                    rec.relevance_after = out.relevance.detach().cpu()
                self._event("loss", s)
                last = _StepOut(out.logits.detach(), torch.empty(0), out.target)
                fresh = True  # `last` was computed with the current perturbation
                if cfg.mode == "fast":
                    if s == 0 and cfg.share_gate is not None:
                        active = active & (share0 < cfg.share_gate)
                    if not bool(active.any()):
                        rec.skipped = rec.skipped or "share"
                        break
                    total = float((loss_rows.detach() * active).sum())
                    if cfg.patience > 0 and s > 0:
                        if total > best - cfg.tol * abs(best):
                            stall += 1
                            if stall >= cfg.patience:
                                rec.skipped = "early_stop"
                                break
                        else:
                            stall = 0
                    best = min(best, total)
                loss = (loss_rows * active).sum()
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                self._event("backward", s)
                del out, loss, loss_rows, rel_loss, kl
                for p, g in zip(params, grads):
                    p.grad = None if g is None else g.detach()
                del grads
                opt.step()
                opt.zero_grad(set_to_none=True)
                fresh = False
                steps_run += 1
                self._event("update", s)
            rec.steps = steps_run
            if n_updates == 0 and rec.skipped is None:
                rec.skipped = "steps=0"
            # ------------------------------------------------------------ emission
            if last is None:
                self._event("emit", "unperturbed")
                if ref_logits is not None:
                    emit = ref_logits.detach().float()
                else:
                    self._grad_deltas = False
                    emit = self._forward(embeds, model_kwargs, pick, False, False).logits.detach()
            elif cfg.emit_from == "last_forward" or steps_run == 0 or fresh:
                # (fresh: stopped early right after a forward, which already saw the final perturbation)
                reused = fresh and cfg.emit_from != "last_forward" and steps_run > 0
                self._event("emit", "reused_final" if reused else "last_forward")
                emit = last.logits
            elif cfg.emit_from == "cached" and emit_fn is not None:
                self._event("emit", "cached")
                self._grad_deltas = False
                with torch.enable_grad():  # the scope applies attention transforms only with grad enabled
                    emit = emit_fn().detach().float()
            else:
                self._event("emit", "final")
                self._grad_deltas = False
                if cfg.final_relevance:
                    # relevance under the perturbation the token is emitted from (first order, no graph)
                    fin = self._forward(embeds, model_kwargs, pick, True, False)
                    rec.share_after = modality_share(fin.relevance.detach(), mod_f, valid_f).tolist()
                    rec.focus_after = modality_focus(fin.relevance, mod_f, valid_f, tau).tolist()
                    if cfg.record_relevance:
                        rec.relevance_after = fin.relevance.detach().cpu()
                    emit = fin.logits.detach()
                    del fin
                else:
                    emit = self._forward(embeds, model_kwargs, pick, False, False).logits.detach()
            if ref_logits is None:
                ref_logits = ref_raw if ref_raw is not None else emit
            ref_logits = ref_logits.detach().float()
            inactive = ~active
            if bool(inactive.any()):
                emit = torch.where(inactive[:, None], ref_logits.to(emit.device), emit)
            return emit, ref_logits, rec
        finally:
            del opt, params
            self._deltas.clear()
            self._pos_mask = None
            self._grad_deltas = True

    def _losses(self, out: _StepOut, log_ref: Tensor, mod_f: Tensor, valid: Tensor, counts: Tensor):
        cfg = self.config
        r = out.relevance / cfg.temperature
        r = r.masked_fill(~valid, float("-inf"))
        logp = F.log_softmax(r, dim=-1)
        logp = torch.where(valid, logp, torch.zeros_like(logp))
        rel_loss = -(logp * mod_f).sum(-1) / counts.to(logp.dtype)
        log_delta = F.log_softmax(out.logits, -1)
        if cfg.kl_direction == "ref||delta":
            kl = (log_ref.exp() * (log_ref - log_delta)).sum(-1)
        else:
            kl = (log_delta.exp() * (log_delta - log_ref)).sum(-1)
        return rel_loss, kl


_NO_CARRIERS = ("LIME takes relevance at the input embeddings; first-layer rules (flat / wsquare / zbox) that need "
                "carrier tensors are not supported. Use a composite without them")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of LIME's own tensors (perturbations, logits, relevance, losses): float32, or float64 for a
    float64 model (so that the loop can be checked against finite differences)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _work(t: Tensor) -> Tensor:
    return t.to(_work_dtype(t.dtype))


class _InnerOptimizer:
    """Adam (betas 0.9 / 0.999, eps 1e-8, no weight decay) or plain SGD over a few tensors, with exactly the
    operations of ``torch.optim.Adam(foreach=False)`` / ``torch.optim.SGD`` (their single-tensor path,
    the default on CPU): the same numbers bit for bit, without the optimiser framework's per-step
    overhead. Used by fast mode; reference mode keeps ``torch.optim``."""

    def __init__(self, params: list, lr: float, kind: str = "adam", betas: tuple = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = list(params)
        self.lr, self.kind, self.betas, self.eps = float(lr), kind, betas, eps
        self.steps = [0] * len(self.params)
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params] \
            if kind == "adam" else []
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params] \
            if kind == "adam" else []

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        if self.kind != "adam":
            for p, g in zip(self.params, grads):
                if g is not None:
                    p.add_(g, alpha=-self.lr)
            return
        beta1, beta2 = self.betas
        for i, (p, g, m, v) in enumerate(zip(self.params, grads, self.exp_avg, self.exp_avg_sq)):
            if g is None:  # torch.optim skips such a parameter, its step count included
                continue
            self.steps[i] += 1
            step = float(self.steps[i])
            bias_correction1 = 1 - beta1 ** step
            bias_correction2 = 1 - beta2 ** step
            step_size = self.lr / bias_correction1
            bias_correction2_sqrt = bias_correction2 ** 0.5
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
