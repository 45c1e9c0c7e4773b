r"""``IncrementalOptimizer``: LIME along the KV-cache path (``LimeConfig(mode="incremental")``).

The cheap variant of LIME (issue 15, part 4). Per generated token only the *current* position is
computed, over the unperturbed KV cache of the positions before it:

* **Relevance along the cache path.** The current position's forward reads, at every decoder layer
  :math:`l`, the cached keys and values :math:`K^l_j, V^l_j` of the earlier positions :math:`j < t` and
  its own input embedding :math:`x_t`. These are the inputs of the incremental computation, so the
  relevance of position :math:`j` is what the rule-modified backward of the explained logit :math:`z^*`
  carries into its cache entries, summed over *all* layers, heads and head dimensions,

  .. math:: R_j = \sum_l \sum_{h,d} \Big( K^l_j \odot \frac{\partial^{\mathrm{LRP}} z^*}{\partial K^l_j}
            + V^l_j \odot \frac{\partial^{\mathrm{LRP}} z^*}{\partial V^l_j} \Big)_{h,d}, \qquad
            R_t = \sum_d x_{t,d}\, \frac{\partial^{\mathrm{LRP}} z^*}{\partial x_{t,d}},

  with the gradient taken where the attention rule sees K and V (the ``before_rule`` stage of the
  scope's attention bridge: AttnLRP's 1/4, 1/2 scaling included, CP-LRP's detached keys give 0). These
  are the inputs of the one-position computation, so under a conservative rule set
  :math:`\sum_{j \le t} R_j = z^*` (tested). No backward runs through the earlier positions.
* **Delta on the current query's reads.** :math:`\Delta_K^l, \Delta_V^l` (zero-initialised, shaped like
  what the query reads, ``[batch, heads, t + 1, head_dim]``: the cached positions and its own) are added
  to the keys and values the current query attends to, at the configured ``delta_placement``; they are
  never written to the cache.
* **The loss** is the objective's (``LimeConfig.objective``, :mod:`lime_attr.mitigation.objectives`) relevance
  loss over positions :math:`0..t` plus ``kl_weight`` times the
  KL to the unperturbed next-token distribution (which the first inner forward, at :math:`\Delta = 0`,
  gives); its gradient reaches :math:`\Delta` by autograd's double backward (``second_order="autograd"``;
  ``"exact"`` is refused: the engine's exact second order does not take the cache entries as inputs), or,
  with ``second_order="frozen"``, from the first-order relevance backward alone, the rule gradient held
  constant (one update; :mod:`lime_attr.mitigation.first_order`), the emission forward then running
  without gradients.
* **The cache** keeps the unperturbed keys and values: every forward runs on a fresh
  :class:`~transformers.DynamicCache` built from them (:class:`KVCacheState`), and the current position's
  entries are taken, detached, from the first inner forward (where :math:`\Delta = 0`).
* **The first token**: by default (``prompt_pass="separate"``) the decode loop fills the cache with a no-grad
  forward of the prompt's prefix and the first token is one position over it, like every other. With
  ``prompt_pass="fused"`` its first inner forward computes the whole prompt instead (``x`` of shape
  ``[B, t + 1, D]`` over an empty state), the earlier positions' keys and values read detached where the
  rule sees them, as cached ones are, so that the backward runs along the last position's path only; it
  fills the cache, and the token's later forwards run over it (one forward fewer; on large models its
  backward's products run over every position, see ``docs/lime.rst``).

Per token this costs ``n`` forwards of one position with their relevance backward and double backward,
plus one forward of one position for the emission (the schedule is fast mode's: ``n = min(fast_updates,
steps - 1)`` updates carrying the reference's total step). ``docs/lime.rst`` ("Incremental mode") says
what this approximates and measures its cost.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache

from ..attribution.engine import relevance
from ..modality import modality_share
from .attention import switch_attention
from .cache import cache_kwargs, output_cache
from .config import LimeConfig
from .first_order import first_step, frozen_gradient
from .objectives import Objective, checked_explained, checked_lr_scale, checked_relevance_loss
from .optimizer import decoder_layers, kl_to_reference, modality_focus, work_dtype
from .records import TokenRecord, step_record

__all__ = ["IncrementalOptimizer", "KVCacheState", "CacheProbe"]

log = logging.getLogger(__name__)


class KVCacheState:
    """The unperturbed keys and values ``[(K^l, V^l)]`` of the positions before the current one.

    Each forward of the current position runs on :meth:`fork` -- a fresh ``DynamicCache`` holding these
    tensors -- so that what a perturbed or differentiated forward appends never reaches them.

    Parameters
    ----------
    pairs : sequence of tuple
        Per decoder layer, ``[batch, kv_heads, length, head_dim]`` keys and values (detached).
    """

    def __init__(self, pairs: Sequence[tuple[Tensor, Tensor]]) -> None:
        self.pairs = [(k.detach(), v.detach()) for k, v in pairs]

    @classmethod
    def from_cache(cls, cache: Any) -> "KVCacheState":
        """The state of a ``DynamicCache`` of full-attention layers (clear error for any other cache)."""
        layers = getattr(cache, "layers", None)
        if not isinstance(cache, DynamicCache) or layers is None:
            raise TypeError(f"LIME mode='incremental' needs the model to return a transformers DynamicCache, got "
                            f"{type(cache).__name__}; use mode='fast'")
        if any(getattr(layer, "is_sliding", False) for layer in layers):
            raise ValueError("LIME mode='incremental' supports full-attention caches only; this model's cache has "
                             "sliding-window layers. Use mode='fast'")
        return cls([(item[0], item[1]) for item in cache])

    @property
    def length(self) -> int:
        """Number of cached positions."""
        return int(self.pairs[0][0].shape[-2]) if self.pairs else 0

    def prefix(self, length: int) -> "KVCacheState":
        """The state of the first ``length`` positions."""
        return KVCacheState([(k[..., :length, :], v[..., :length, :]) for k, v in self.pairs])

    def fork(self) -> DynamicCache:
        """A new ``DynamicCache`` with these keys and values (the caller's forward may append to it)."""
        return DynamicCache(ddp_cache_data=self.pairs) if self.pairs else DynamicCache()


class CacheProbe:
    """Zero tensors added to the keys and values of every decoder attention call while it is entered.

    A recorder of the relevance engine (:class:`~lime_attr.attribution.engine.Recorder`): their gradients,
    taken in the same backward as the input's, give the relevance :math:`K \\odot g_K + V \\odot g_V`
    of every position a query reads, summed over layers, heads and the head dimension.

    Parameters
    ----------
    dtype : torch.dtype
        The dtype the relevance is summed in.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.active = False
        self.items: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self.grads: list[Optional[Tensor]] = []  # the probes' gradients of the last relevance (K, V per item)

    def __enter__(self) -> "CacheProbe":
        self.items, self.active = [], True
        return self

    def __exit__(self, *exc: Any) -> None:
        self.active = False

    def add(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``k + P_K, v + P_V`` with fresh zero probes (unchanged while not entered)."""
        if not self.active:
            return k, v
        pk = torch.zeros_like(k, requires_grad=True)
        pv = torch.zeros_like(v, requires_grad=True)
        self.items.append((k.detach(), v.detach(), pk, pv))
        return k + pk, v + pv

    def tensors(self) -> list[Tensor]:
        if not self.items:
            raise RuntimeError("no decoder attention call went through the scope's attention bridge: is a canonizer "
                               "for this model registered?")
        return [t for item in self.items for t in item[2:]]

    def relevance(self, grads: Sequence[Optional[Tensor]], detach: bool = True) -> dict:
        """``{"cache": [batch, positions]}``: the relevance of every position read, summed over the calls."""
        self.grads = list(grads)
        total: Optional[Tensor] = None
        for i, (k, v, _, _) in enumerate(self.items):
            for x, g in ((k, grads[2 * i]), (v, grads[2 * i + 1])):
                r = (x.to(self.dtype) * (torch.zeros_like(x) if g is None else g).to(self.dtype)).sum((1, 3))
                total = r if total is None else total + r
        assert total is not None
        return {"cache": total.detach() if detach else total}


@dataclass
class _Step:
    logits: Tensor  # [B, V] (graph attached while optimising)
    relevance: Optional[Tensor]  # [B, t + 1] or None
    target: Tensor  # [B]
    cache: Any  # the fork this forward ran on (holds the current position's entries afterwards)
    explained: Optional[Tensor] = None  # [B] the objective's explained scalar (detached)


@dataclass
class _Token:
    """The state of one token's inner loop."""

    rec: TokenRecord
    pick: Callable[[Tensor], Tensor]
    modality: Tensor
    valid: Tensor
    active: Tensor
    ref: Optional[Tensor] = None
    log_ref: Optional[Tensor] = None
    target: Optional[Tensor] = None
    next_state: Optional[KVCacheState] = None
    opt: Any = None
    last: Optional[Tensor] = None
    steps_run: int = 0


class IncrementalOptimizer:
    r"""LIME's inner loop for one token along the KV-cache path (see the module docstring).

    Parameters
    ----------
    attribution : LRP or ModalityAttribution
        A lime_attr attribution with a ``model`` and a ``scope()`` (its rules).
    config : LimeConfig
        ``mode="incremental"``.

    Notes
    -----
    :meth:`session` (entered by ``lime_generate`` at the first optimised token) switches the attention
    implementation, freezes the parameters' ``requires_grad`` flags and enters the scope, all restored
    on exit; :meth:`step` decodes one token.
    """

    def __init__(self, attribution: Any, config: LimeConfig) -> None:
        model = getattr(attribution, "model", None)
        if not isinstance(model, nn.Module) or not callable(getattr(attribution, "scope", None)):
            raise TypeError("IncrementalOptimizer needs a lime_attr attribution (LRP or ModalityAttribution) built on "
                            f"the model; got {type(attribution).__name__}")
        if not isinstance(config, LimeConfig) or config.validate().mode != "incremental":
            raise ValueError(f"IncrementalOptimizer needs LimeConfig(mode='incremental'), got {config!r}")
        self.attribution, self.model, self.config = attribution, model, config
        layers = decoder_layers(model)
        self.layer_ids = config.validate_for(len(layers))
        self._layer_of = {id(layer.self_attn): i for i, layer in enumerate(layers)}
        self._perturbed = set(self.layer_ids)
        self.objective: Objective = config.objective_impl
        self._deltas: dict[int, tuple[Optional[Tensor], Optional[Tensor]]] = {}
        self._lr_scales: dict[int, tuple[float, float]] = {}  # per layer, from the keys / values it reads
        self._pos_mask: Optional[Tensor] = None
        self._grad_deltas = True
        self._probe = CacheProbe(torch.float32)
        self._frozen = config.second_order == "frozen"
        self._probe_layers: list[int] = []  # (frozen) the layer of every probe item, in call order
        self._whole_prompt = False  # the forward computes the whole prompt: only its last query is "current"
        self._in_session = False
        self.events: Optional[list] = None

    # ------------------------------------------------------------------ session and transforms
    @property
    def in_session(self) -> bool:
        """Whether :meth:`session` is entered (the scope installed, the attention implementation switched)."""
        return self._in_session

    @contextlib.contextmanager
    def session(self) -> Iterator["IncrementalOptimizer"]:
        """Attention implementation switched, parameters frozen, scope entered; all restored on exit."""
        if self._in_session:
            yield self
            return
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        restore_attn = switch_attention(self.model, self.config.attn_implementation)
        scope = self.attribution.scope()
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            with scope:
                if self._frozen:  # its Delta also acts in the no-grad emission forward
                    handles = [scope.add_attention_transform(self._frozen_before_rule, stage="before_rule",
                                                             also_without_grad=True)]
                else:
                    handles = [scope.add_attention_transform(self._before_rule, stage="before_rule"),
                               scope.add_attention_transform(self._after_rule, stage="after_rule")]
                self._in_session = True
                try:
                    yield self
                finally:
                    self._in_session = False
                    for h in handles:
                        h.remove()
                    self._deltas.clear()
        finally:
            for p, f in flags:
                p.requires_grad_(f)
            restore_attn()

    def _before_rule(self, module: nn.Module, q: Tensor, k: Tensor, v: Tensor, kwargs: dict) -> tuple:
        idx = self._layer_of.get(id(module))
        if idx is None:
            return q, k, v
        k, v = self._reads(k), self._reads(v)
        k, v = self._probe.add(k, v)  # where the rule sees K and V: the relevance of the cache entries
        if self.config.placement == "before_rule":
            k, v = self._perturb(idx, q, k, v)
        return q, k, v

    def _after_rule(self, module: nn.Module, q: Tensor, k: Tensor, v: Tensor, kwargs: dict) -> tuple:
        idx = self._layer_of.get(id(module))
        if idx is None or self.config.placement != "after_rule":
            return q, k, v
        k, v = self._perturb(idx, q, k, v)
        return q, k, v

    def _frozen_before_rule(self, module: nn.Module, q: Tensor, k: Tensor, v: Tensor, kwargs: dict) -> tuple:
        """``second_order="frozen"``: the probe (relevance forward) or the fixed Delta (emission forward, no grad)
        on the tensor Delta is added to -- after the grouped-query repeat with ``delta_heads="query"``."""
        idx = self._layer_of.get(id(module))
        if idx is None:
            return q, k, v
        if idx in self._perturbed and self.config.heads == "query" and k.shape[1] != q.shape[1]:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if self._probe.active:
            self._probe_layers.append(idx)
            if idx in self._perturbed and self.objective.scales_lr():
                self._lr_scales[idx] = checked_lr_scale(self.objective, k.detach(), v.detach())
            k, v = self._probe.add(self._reads(k), self._reads(v))
            return q, k, v
        k, v = _add_pair(idx, k, v, self._deltas.get(idx, (None, None)), lambda d: d)
        return q, k, v

    def _reads(self, t: Tensor) -> Tensor:
        """Keys / values as the current query reads them: in a forward of the whole prompt the earlier
        positions' entries are detached, as the cached entries are (so that the backward of the last position's
        logit runs along its own path only, and what reaches the probes is the cache entries' relevance)."""
        if not self._whole_prompt or t.shape[-2] < 2:
            return t
        return torch.cat([t[..., :-1, :].detach(), t[..., -1:, :]], dim=-2)

    def _perturb(self, idx: int, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``k + Delta_K, v + Delta_V`` for a perturbed layer (one head per query head with ``"query"``)."""
        if idx not in self._perturbed:
            return k, v
        if self.config.heads == "query" and k.shape[1] != q.shape[1]:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        pair = self._deltas.get(idx)
        if pair is None:
            if not self._grad_deltas:
                return k, v
            dt = self._probe.dtype
            pair = self._deltas[idx] = tuple(  # type: ignore[assignment]
                torch.zeros(t.shape, dtype=dt, device=t.device, requires_grad=True) if name in self.config.perturb
                else None for name, t in (("k", k), ("v", v)))
            if self.objective.scales_lr():
                self._lr_scales[idx] = checked_lr_scale(self.objective, k.detach(), v.detach())
        def placed(d: Tensor) -> Tensor:
            d = d if self._grad_deltas else d.detach()
            return d * self._pos_mask if self._pos_mask is not None else d

        return _add_pair(idx, k, v, pair, placed)

    # ------------------------------------------------------------------ one forward of the current position
    def _forward(self, state: KVCacheState, x: Tensor, model_kwargs: dict, pick: Callable[[Tensor], Tensor],
                 with_relevance: bool, create_graph: bool = True) -> _Step:
        """The current position ``x [B, 1, D]`` over ``state``; with relevance (graph kept) the engine's
        forward + backward, the cache probes read in the same backward."""
        if x.shape[1] > 1 and state.length:
            raise ValueError(f"the current position must be one ([B, 1, D]) over a cache, got {tuple(x.shape)} over "
                             f"{state.length} cached positions")
        fork, seen = state.fork() if state.length else None, {}  # None: the model makes its own (sliding layers...)
        dt = self._probe.dtype

        def explained(inp: Tensor) -> Tensor:
            out = self.model(inputs_embeds=inp, **model_kwargs, **cache_kwargs(fork))
            seen.setdefault("cache", output_cache(out))
            logits = (out.logits if hasattr(out, "logits") else out[0])[:, -1, :].to(dt)
            if "target" not in seen:
                seen["logits"], seen["target"] = logits, pick(logits.detach())
            z = checked_explained(self.objective, logits, seen["target"].to(logits.device))
            if with_relevance and not bool(torch.isfinite(z.detach()).all()):
                raise FloatingPointError("the explained logit is NaN/inf; check the model's dtype and the "
                                         "perturbation (lr)")
            return z

        if not with_relevance:
            with torch.enable_grad():  # the scope applies attention transforms only with grad enabled
                explained(x.detach())
            return _Step(seen["logits"].detach(), None, seen["target"], seen["cache"])
        self._whole_prompt = x.shape[1] > 1
        try:
            res = relevance(self.attribution.scope(), explained, [x.detach()], create_graph=create_graph,
                            latent=self._probe, carriers="refuse")
        finally:
            self._whole_prompt = False
        r_x = res.inputs[0][:, -1:].to(dt).sum(-1)  # [B, 1]
        rel = torch.cat([res.latent["cache"][:, :-1], r_x], 1)  # the current position counts through x only
        return _Step(seen["logits"], rel, seen["target"], seen["cache"], res.output.detach())

    def plain_step(self, state: KVCacheState, x: Tensor, model_kwargs: dict) -> tuple[Tensor, KVCacheState]:
        """The unperturbed next-token logits ``[B, V]`` and the state with the current position appended (no
        grad, no scope: what cached greedy decoding computes)."""
        fork = state.fork() if state.length else None
        with torch.no_grad():
            out = self.model(inputs_embeds=x, **model_kwargs, **cache_kwargs(fork))
        return out.logits[:, -1, :].float(), KVCacheState.from_cache(output_cache(out))

    # ------------------------------------------------------------------ one token
    def step(self, state: KVCacheState, x: Tensor, model_kwargs: dict, modality: Tensor, valid: Tensor,
             pick: Optional[Callable[[Tensor], Tensor]] = None, active: Optional[Tensor] = None,
             index: int = 0) -> tuple[Tensor, Tensor, KVCacheState, TokenRecord]:
        """Optimise :math:`\\Delta` for the next token of every row and emit it.

        Parameters
        ----------
        state : KVCacheState
            The unperturbed keys / values of positions ``0..t-1``.
        x : Tensor
            ``[B, 1, D]`` input embedding of the current position ``t``; or, with an empty ``state``, ``[B, t + 1,
            D]``: the whole prompt, whose first forward then also fills the cache (its earlier positions' keys and
            values are read detached, as cached ones are; the same numbers up to rounding, one forward fewer).
        model_kwargs : dict
            ``attention_mask`` ``[B, t + 1]``, ``position_ids`` of position ``t`` (of all positions with a whole
            prompt), ``use_cache=True``...
        modality, valid : Tensor
            ``[B, t + 1]`` bool: the perceptual positions M; the non-padding positions.
        pick : callable, optional
            ``logits [B, V] -> ids [B]``: the decoder (default argmax).
        active : Tensor, optional
            ``[B]`` bool: rows to optimise (others emit their unperturbed token).

        Returns
        -------
        emit_logits, ref_logits : Tensor
            ``[B, V]`` float: the logits the token is emitted from; the unperturbed ones.
        state : KVCacheState
            ``state`` with position ``t``'s unperturbed keys / values appended.
        record : TokenRecord
        """
        n_updates, lr = self.config.schedule
        if n_updates == 0:
            logits, nxt = self.plain_step(state, x, model_kwargs)
            rec = _record(index, x.shape[0])
            rec.skipped = "steps=0"
            return logits, logits, nxt, rec
        if not self._in_session:
            with self.session():
                return self.step(state, x, model_kwargs, modality, valid, pick, active, index)
        tok = self._begin(x, modality, valid, pick, active, index)
        try:
            if self._frozen:
                return self._frozen_step(tok, state, x, model_kwargs, lr)
            for s in range(n_updates):
                out = self._forward(state, x, model_kwargs, tok.pick if tok.target is None else
                                    (lambda _l, t=tok.target: t), with_relevance=True)
                if s == 0:
                    self._first(tok, out)
                    state, x, model_kwargs = _current_only(state, tok.next_state, x, model_kwargs)
                    tok.opt = self._optimizer(lr)
                loss = self._losses(tok, out, s)
                self._update(tok, loss)
                tok.last = out.logits.detach()
                del out, loss
            tok.rec.steps = tok.steps_run
            emit = self._emission(tok, state, x, model_kwargs)
            ref = tok.ref.float()
            emit = torch.where(tok.active[:, None], emit.float(), ref)
            return emit, ref, tok.next_state, tok.rec
        finally:
            tok.opt = None
            self._deltas.clear()
            self._lr_scales.clear()
            self._pos_mask = None
            self._grad_deltas = True
            self._probe_layers.clear()

    def _frozen_step(self, tok: _Token, state: KVCacheState, x: Tensor, model_kwargs: dict,
                     lr: float) -> tuple[Tensor, Tensor, KVCacheState, TokenRecord]:
        """``second_order="frozen"``: one relevance forward + first-order backward at Delta = 0, the update
        Delta = step((dL/dR_j) g_j) (:mod:`lime_attr.mitigation.first_order`), then the emission forward
        without gradients."""
        self._probe_layers.clear()
        out = self._forward(state, x, model_kwargs, tok.pick, with_relevance=True, create_graph=False)
        self._first(tok, out)
        state, x, model_kwargs = _current_only(state, tok.next_state, x, model_kwargs)
        rel = out.relevance.detach().requires_grad_(True)
        out.relevance = rel
        loss = self._losses(tok, out, 0)
        (dl_dr,) = torch.autograd.grad((loss * tok.active).sum(), [rel])
        self._set_frozen_deltas(dl_dr, lr)
        tok.steps_run = tok.rec.steps = 1
        tok.last = out.logits.detach()
        del out, loss
        if self.config.emit_from == "last_forward":
            emit = tok.last
        else:
            fork = state.fork()
            with torch.no_grad():
                o = self.model(inputs_embeds=x.detach(), **model_kwargs, **cache_kwargs(fork))
            emit = (o.logits if hasattr(o, "logits") else o[0])[:, -1, :]
        ref = tok.ref.float()
        return torch.where(tok.active[:, None], emit.float(), ref), ref, tok.next_state, tok.rec

    def _set_frozen_deltas(self, dl_dr: Tensor, lr: float) -> None:
        """Delta of every perturbed layer from the probes' gradients (one step of the optimiser from zero)."""
        if not any(i in self._perturbed for i in self._probe_layers):
            raise RuntimeError("no attention call of the perturbed layers went through the scope's attention bridge: "
                               "is a canonizer for this model registered?")
        dt, grads = self._probe.dtype, self._probe.grads
        self._deltas.clear()
        for n, idx in enumerate(self._probe_layers):
            if idx not in self._perturbed:
                continue
            scales = self._lr_scales.get(idx, (1.0, 1.0))
            pair = []
            for name, g, sc in zip(("k", "v"), grads[2 * n: 2 * n + 2], scales):
                if name not in self.config.perturb:
                    pair.append(None)
                    continue
                grad = frozen_gradient(dl_dr, g, self._pos_mask, dt)
                d = first_step(grad, lr * sc, self.config.optimizer)
                pair.append(d * self._pos_mask if self._pos_mask is not None else d)
            self._deltas[idx] = (pair[0], pair[1])

    def _begin(self, x: Tensor, modality: Tensor, valid: Tensor, pick: Optional[Callable], active: Optional[Tensor],
               index: int) -> _Token:
        B, device = x.shape[0], x.device
        modality, valid = modality.to(device).bool(), valid.to(device).bool()
        empty = ((modality & valid).sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"the modality span is empty for batch row(s) {empty}: LIME needs perceptual (image / "
                             "audio) positions to shift relevance to")
        self._probe.dtype = work_dtype(x.dtype, self.config.precision)
        self._pos_mask = modality.to(self._probe.dtype)[:, None, :, None] if self.config.positions == "modality" \
            else None
        self._deltas.clear()
        self._grad_deltas = True
        return _Token(rec=_record(index, B), pick=pick or (lambda logits: logits.argmax(-1)), modality=modality,
                      valid=valid, active=torch.ones(B, dtype=torch.bool, device=device) if active is None
                      else active.to(device).bool())

    def _first(self, tok: _Token, out: _Step) -> None:
        """At Delta = 0: the reference distribution, the next cache state, the 'before' records."""
        tok.ref = out.logits.detach()
        tok.log_ref = F.log_softmax(tok.ref, -1)
        tok.next_state = KVCacheState.from_cache(out.cache)
        if self.config.target_rule == "fixed":
            tok.target = out.target
        rel = out.relevance.detach()
        mod_f, valid_f = tok.modality.to(rel.dtype), tok.valid.to(rel.dtype)
        tok.rec.share_before = modality_share(rel, mod_f, valid_f).tolist()
        tok.rec.focus_before = modality_focus(rel, mod_f, valid_f, self.config.temperature).tolist()
        if self.config.record_relevance:
            tok.rec.relevance_before = rel.cpu()

    def _optimizer(self, lr: float) -> Any:
        """Adam / SGD over the Delta tensors, one lr per tensor where the objective scales it."""
        if not any(d is not None for pair in self._deltas.values() for d in pair):
            raise RuntimeError("no attention call of the perturbed layers went through the scope's attention bridge: "
                               "is a canonizer for this model registered?")
        groups = []
        for idx, pair in self._deltas.items():
            scales = self._lr_scales.get(idx, (1.0, 1.0))
            groups += [{"params": [d], "lr": lr * sc} for d, sc in zip(pair, scales) if d is not None]
        kind = torch.optim.Adam if self.config.optimizer == "adam" else torch.optim.SGD
        return kind(groups, lr=lr, foreach=False)

    def _losses(self, tok: _Token, out: _Step, s: int) -> Tensor:
        """The step's loss per row (graph attached), written to the token's record."""
        cfg, rec = self.config, tok.rec
        rel_loss = checked_relevance_loss(self.objective, out.relevance, tok.modality, tok.valid, cfg.temperature)
        kl = kl_to_reference(tok.log_ref, out.logits, cfg.kl_direction)
        loss = rel_loss + cfg.kl_weight * kl
        rel = out.relevance.detach()
        mod_f, valid_f = tok.modality.to(rel.dtype), tok.valid.to(rel.dtype)
        share, focus = modality_share(rel, mod_f, valid_f), modality_focus(rel, mod_f, valid_f, cfg.temperature)
        rec.losses.append(loss.detach().tolist())
        rec.rel_losses.append(rel_loss.detach().tolist())
        rec.kl.append(kl.detach().tolist())
        rec.share_after, rec.focus_after = share.tolist(), focus.tolist()
        if cfg.record_relevance:
            rec.relevance_after = rel.cpu()
        if cfg.record == "steps":
            rec.step_records.append(step_record(s, out, (loss, rel_loss, kl), self._deltas, share, focus,
                                                cfg.top_k_logits))
        return loss

    def _update(self, tok: _Token, loss: Tensor) -> None:
        """One optimiser update of Delta on the active rows' loss (autograd's double backward)."""
        params = [p for group in tok.opt.param_groups for p in group["params"]]
        grads = torch.autograd.grad((loss * tok.active).sum(), params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.detach()
        tok.opt.step()
        tok.opt.zero_grad(set_to_none=True)
        tok.steps_run += 1

    def _emission(self, tok: _Token, state: KVCacheState, x: Tensor, model_kwargs: dict) -> Tensor:
        """``emit="final"``: one more forward of the current position with the final Delta (no graph);
        ``"last_forward"``: the last inner forward's logits (before the last update)."""
        if self.config.emit_from == "last_forward":
            return tok.last
        self._grad_deltas = False
        return self._forward(state, x, model_kwargs, tok.pick, with_relevance=False).logits


def _current_only(state: KVCacheState, next_state: KVCacheState, x: Tensor,
                  model_kwargs: dict) -> tuple[KVCacheState, Tensor, dict]:
    """After the first forward of a whole prompt ``x [B, n, D]`` (``state`` empty, ``next_state`` holding all
    ``n`` positions): the cache of the first ``n - 1``, the last position and its ``position_ids``. After a
    forward of one position: unchanged."""
    n = x.shape[1]
    if n == 1:
        return state, x, model_kwargs
    kwargs = dict(model_kwargs)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"][..., -1:]
    return next_state.prefix(n - 1), x[:, -1:], kwargs


def _add_pair(idx: int, k: Tensor, v: Tensor, pair: Sequence[Optional[Tensor]],
              placed: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """``k + placed(Delta_K), v + placed(Delta_V)`` (a ``None`` Delta leaves its tensor), shapes checked."""
    out = []
    for t, d in zip((k, v), pair):
        if d is not None:
            if d.shape != t.shape:
                raise RuntimeError(f"layer {idx}: the current query reads {tuple(t.shape)} keys / values, Delta "
                                   f"has {tuple(d.shape)}")
            t = t + placed(d).to(t.dtype)
        out.append(t)
    return out[0], out[1]


def _record(index: int, batch: int) -> TokenRecord:
    nan = [float("nan")] * batch
    return TokenRecord(index=index, share_before=list(nan), share_after=list(nan), focus_before=list(nan),
                       focus_after=list(nan))
