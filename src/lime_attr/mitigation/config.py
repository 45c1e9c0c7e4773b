"""``LimeConfig``: every knob of LIME (Allouche and Keshet, 2026), validated, with per-model presets."""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from .objectives import DEFAULT_OBJECTIVE, Objective, available_objectives, get_objective, objective_name
from .recommended import NOT_EVALUATED, RECOMMENDATIONS, Recommendation, model_key

__all__ = ["LimeConfig", "PRESETS", "FAST_CONFIDENCE_GATE", "FAST_UPDATES", "INCREMENTAL_UPDATES"]

#: Fast mode's default confidence gate (``confidence_gate="auto"``): tokens whose unperturbed top
#: probability is at least this are emitted from the KV cache without optimisation.
FAST_CONFIDENCE_GATE: float = 0.99
#: Fast mode's default number of optimiser updates per token (``fast_updates="auto"``).
FAST_UPDATES: int = 2

#: Incremental mode's default number of optimiser updates per token (``fast_updates="auto"``).
INCREMENTAL_UPDATES: int = 1

#: ``model_type -> (lr, kl_weight)``, paper Table 5 (the reference code's defaults agree).
PRESETS: dict[str, tuple[float, float]] = {
    "llava": (3e-4, 0.1),
    "qwen2_vl": (3e-4, 0.1),
    "qwen2_5_vl": (3e-4, 0.1),
    "qwen2_audio": (5e-4, 7e-3),
}

_ENUMS = {
    "perturb": ("kv", "k", "v"),
    "positions": ("all", "modality"),
    "optimizer": ("adam", "sgd"),
    "kl_direction": ("ref||delta", "delta||ref"),
    "mode": ("reference", "fast", "incremental"),
    "emit": ("auto", "final", "last_forward", "cached"),
    "target": ("auto", "fixed", "per_step"),
    "second_order": ("autograd", "exact", "frozen"),
    "delta_heads": ("auto", "query", "kv"),
    "delta_placement": ("auto", "after_rule", "before_rule"),
    "precision": ("float32", "model"),
    "record": (None, "steps"),
    "prompt_pass": ("separate", "fused"),
}


@dataclass
class LimeConfig:
    r"""Configuration of LIME: per generated token, optimise additive :math:`\Delta_K, \Delta_V`.

    The loss of one inner step is

    .. math::

        L = -\frac{1}{|M|}\sum_{i\in M}\log\operatorname{softmax}(R/\tau)_i
            + \lambda\, \mathrm{KL}(p_\mathrm{ref}\,\|\,p_\Delta)

    with :math:`R` the (signed, differentiable) AttnLRP relevance of each input position for the logit
    of the token being emitted, :math:`M` the perceptual (image / audio) positions.

    Parameters
    ----------
    steps : int
        Inner optimisation steps per generated token (paper: 7). ``0`` is plain decoding.
    lr : float
        Learning rate of the inner optimiser (paper: 3e-4 for LLaVA).
    kl_weight : float
        :math:`\lambda` (paper: 0.1 for LLaVA, 7e-3 for Qwen2-Audio).
    temperature : float
        :math:`\tau` of the relevance softmax (paper: 0.1).
    layers : "all" or sequence of int
        Decoder layers whose attention gets a perturbation (indices of the language model's layers;
        negative indices count from the end). Checked against the model by :meth:`validate_for`.
    perturb : {"kv", "k", "v"}
        Which of keys / values are perturbed (paper ablation: K only, V only, both).
    positions : {"all", "modality"}
        ``"all"``: every position, as in the paper; ``"modality"``: only the perceptual positions M.
    optimizer : {"adam", "sgd"}
        Inner optimiser (paper: Adam). Its state is discarded after each token.
    kl_direction : {"ref||delta", "delta||ref"}
        ``"ref||delta"`` = :math:`\mathrm{KL}(p_\mathrm{ref}\|p_\Delta)`, what the reference code computes
        (``kl_div(log p_delta, p_ref)``); ``"delta||ref"`` is how the paper's text reads.
    mode : {"reference", "fast"}
        ``"reference"`` reproduces the published loop step by step (see ``docs/lime.rst``);
        ``"fast"`` adds KV-cache reuse, the confidence gate (default 0.99), the compressed schedule
        (default 2 updates carrying the reference's total step), optional share gating and early
        stopping; what is exact and what is approximate is listed in ``docs/lime.rst``;
        ``"incremental"`` is the cheap variant (:mod:`lime_attr.mitigation.incremental`): per token one
        position is computed over the unperturbed KV cache, the relevance of an earlier position is what flows
        into its cached keys and values, :math:`\Delta` acts only on what the current query reads, every token is
        optimised (no gate) with fast mode's compressed schedule and emitted after the last update. It
        supports ``second_order="autograd"`` or ``"frozen"`` (one first-order update per token), no
        confidence / share gate, no early stopping, no ``final_relevance``, and ``emit`` ``"auto"`` (=
        ``"final"``) or ``"last_forward"`` (``docs/lime.rst``, "Incremental mode").
    emit : {"auto", "final", "last_forward", "cached"}
        Which logits the emitted token comes from. ``"last_forward"``: the logits of the last inner
        forward, i.e. *before* the last update (the reference code's behaviour); ``"final"``: one more
        forward of the whole sequence with the final perturbation (exact); ``"cached"`` (fast mode with
        ``kv_cache``): one incremental step of the last position over the unperturbed KV cache with
        the final :math:`\Delta` added to the cached keys / values -- an approximation that ignores how
        the perturbation of lower layers changes the cached K/V of higher layers (see ``docs/lime.rst``).
        ``"auto"``: ``"last_forward"`` in reference mode, ``"final"`` in fast mode.
    target : {"auto", "fixed", "per_step"}
        Which token's logit is explained. ``"per_step"``: re-decoded from each inner forward's logits
        (reference code); ``"fixed"``: decoded once from the unperturbed distribution. ``"auto"``:
        ``per_step`` in both modes (fast mode used ``fixed`` before; ``per_step`` follows the reference
        trajectory, measured in ``docs/lime.rst``).
    confidence_gate : float, None or "auto"
        Fast mode: skip the optimisation of a token when the unperturbed probability of the top token is
        at least this (after the logits processors); the token is then the unperturbed one, from the KV
        cache. ``None`` disables; ``"auto"`` (default) is :data:`FAST_CONFIDENCE_GATE` (0.99) in fast
        mode and ``None`` in reference mode (which never gates).
    fast_updates : int, None or "auto"
        Fast mode: optimiser updates actually run per token. Reference mode applies ``steps - 1``
        updates before the token it emits (its last update is discarded); fast mode runs
        ``n = min(fast_updates, steps - 1)`` updates with the learning rate scaled by
        ``(steps - 1) / n``, so that the total step is the same (Adam's first updates are each about
        ``lr * sign(g)``; an approximation, see ``docs/lime.rst``), then emits after the last update.
        ``None``: ``steps`` updates at ``lr`` (the behaviour before this option). ``"auto"`` (default):
        :data:`FAST_UPDATES` (2) in fast mode, :data:`INCREMENTAL_UPDATES` (1) in incremental mode (which
        uses the same schedule). Ignored in reference mode.
    final_relevance : bool
        When the token is emitted from a forward after the last update (``emit="final"``), take the
        relevance in that forward too (one first-order backward), so that ``share_after`` /
        ``focus_after`` describe the perturbation the token was emitted from. Off by default (it costs a
        backward per optimised token); the benchmarks turn it on to measure the effect.
    share_gate : float or None
        Fast mode: stop before the first update when the perceptual share of relevance
        (:math:`\sum_M |R| / \sum |R|`) is already at least this (``None`` disables).
    patience, tol : int, float
        Fast mode early stopping: stop after ``patience`` consecutive steps whose loss improved by less
        than ``tol`` (relative). ``patience=0`` disables.
    kv_cache : bool
        Fast mode: keep a KV cache of the unperturbed model for the prompt and the emitted tokens; it
        gives the reference distribution (and the token of gated / non-optimised steps) at the cost of
        one incremental step.
    attn_implementation : str or None
        Attention implementation used while LIME runs (restored afterwards). The relevance is
        differentiated twice, which fused kernels do not support on every device; default ``"eager"``.
        ``None`` keeps the model's.
    record_relevance : bool
        Keep the relevance vector of each token (before and after) in the result.
    second_order : {"autograd", "exact"}
        How the gradient of the relevance loss w.r.t. :math:`\Delta` is computed. ``"autograd"``
        (default, what the reference code computes): autograd differentiates the rule-modified backward
        pass (``create_graph=True``), which is *not* the derivative of the relevance function for AttnLRP
        (rule-modified values enter later backward formulas). ``"exact"``: the exact derivative of the
        relevance, one reverse-over-forward pass per update (the relevance engine's exact second order,
        :mod:`lime_attr.attribution.exact`; docs: rules, "Differentiating relevance"), about 2.8x the CPU
        time per optimised token on the demo model digits-llava. In both settings the KL term's gradient
        is the same: the scope's rule-modified backward of the KL (as in the reference code), not its true
        gradient (see ``docs/lime.rst``, "Exact second order"). ``"frozen"`` (``mode="incremental"`` only, one
        update per token): no second order at all -- the relevance of a cache entry is taken as that of the
        *perturbed* entry, :math:`R_j = \sum (K_j + \Delta_j) \odot g_j`, and differentiated with the rule
        gradient :math:`g_j` held constant, :math:`\partial L / \partial \Delta_j = (\partial L / \partial R_j)\,
        g_j`, from the one first-order relevance backward (no ``create_graph``, no double backward; the KL
        term's gradient is 0 at :math:`\Delta = 0`); the emission forward runs without gradients. A different
        gradient from ``"autograd"``'s (``docs/lime.rst``, "Incremental mode", "First-order update").
    delta_heads : {"auto", "query", "kv"}
        Layout of :math:`\Delta`: ``"query"`` -- one slice per *query* head, after the grouped-query
        repeat, shape ``[batch, heads, seq, head_dim]``, as in the released code; ``"kv"`` -- one per
        key-value head (a smaller parameterisation; the same as ``"query"`` without grouped-query
        attention). ``"auto"``: ``"query"``.
    delta_placement : {"auto", "after_rule", "before_rule"}
        Where :math:`\Delta` is added: ``"after_rule"`` -- after AttnLRP's gradient scaling of q, k, v
        (1/4, 1/4, 1/2), inside the attention function, so that the gradient reaching :math:`\Delta` is the
        undivided one, as in the released code; ``"before_rule"`` -- before it (the gradient reaching
        :math:`\Delta` is then 1/4 for keys and 1/2 for values; Adam cancels that scale except through its
        eps, SGD does not). ``"auto"``: ``"after_rule"``.
    precision : {"float32", "model"}
        ``"float32"`` (default): relevance, log-softmax, KL and :math:`\Delta` in float32 (float64 for a
        float64 model); ``"model"``: in the model's dtype, as the released code does in bf16.
    record : {None, "steps"}
        ``"steps"``: keep per token and inner step the explained token, the relevance of every position,
        the loss terms, the top-k logits, the norms of :math:`\Delta_K` / :math:`\Delta_V` per layer and
        the modality share and focus (:class:`~lime_attr.mitigation.records.StepRecord`, JSON through
        ``TokenRecord.to_dict``). Off by default (it keeps a relevance vector per step).
    top_k_logits : int
        How many of the largest logits a step record keeps (``record="steps"``).
    activation_checkpoint : bool
        Checkpoint each decoder layer of the inner forward *and* of its relevance backward
        (:mod:`lime_attr.mitigation.checkpoint`): at most one layer's graphs are kept at a time, so the peak
        memory of an inner step no longer grows with the whole sequence's graphs, at the cost of
        recomputing each layer (``docs/lime.rst``, "Memory"). Needs ``second_order="autograd"``. The
        numbers are the same as without it. Off by default.
    release_heap : bool
        With ``activation_checkpoint`` on CPU: before each layer's recomputation, give the pages of freed
        heap memory back to the operating system (:mod:`lime_attr.mitigation.heap`, glibc's
        ``malloc_trim(0)``; it changes no allocator setting, and does nothing where the C library has no
        ``malloc_trim``). Without it glibc keeps about 1 GB of freed recomputation buffers resident on the
        1B benchmark model (``docs/lime.rst``, "Memory"). On by default; no effect without the checkpoint
        or on CUDA.
    prompt_pass : {"separate", "fused"}
        Incremental mode, the first token. ``"separate"`` (default): a no-grad forward of the prompt's
        positions but the last fills the cache, and the first token's inner forward is one position over it,
        so that its backward (and double backward) run along the current position only, in arithmetic too.
        ``"fused"``: the first inner forward computes the whole prompt with grad and fills the cache (the
        earlier positions' keys and values read detached; the same numbers up to rounding), one forward fewer.
        That saves Python overhead on very small models (9-12% for the first-order update on the 0.3M-parameter
        demo models) but runs the backward's matrix products over every prompt position: on the 1.2B
        benchmark model a one-token answer cost 2.17x (first order) and 4.48x (autograd) greedy's CPU time
        fused, 1.25x and 1.29x separate (``docs/lime.rst``, "Incremental mode").
    objective : str or Objective
        What is explained, which relevance loss is minimised and how the inner lr is scaled
        (:mod:`lime_attr.mitigation.objectives`): a name of
        :func:`~lime_attr.mitigation.objectives.available_objectives` (``"paper"``, the default, is
        exactly the released objective above; ``"decision"``, ``"logprob"``, ``"evidence"``,
        ``"scaled"``; docs: ``lime_objectives``) or an
        :class:`~lime_attr.mitigation.objectives.Objective` instance. :meth:`to_dict` writes an instance
        as its name.
    """

    steps: int = 7
    lr: float = 3e-4
    kl_weight: float = 0.1
    temperature: float = 0.1
    layers: Union[str, Sequence[int]] = "all"
    perturb: str = "kv"
    positions: str = "all"
    optimizer: str = "adam"
    kl_direction: str = "ref||delta"
    mode: str = "fast"
    emit: str = "auto"
    target: str = "auto"
    confidence_gate: Union[float, None, str] = "auto"
    share_gate: Optional[float] = None
    fast_updates: Union[int, None, str] = "auto"
    final_relevance: bool = False
    patience: int = 0
    tol: float = 1e-3
    kv_cache: bool = True
    attn_implementation: Optional[str] = "eager"
    record_relevance: bool = False
    second_order: str = "autograd"
    delta_heads: str = "auto"
    delta_placement: str = "auto"
    precision: str = "float32"
    record: Optional[str] = None
    top_k_logits: int = 5
    activation_checkpoint: bool = False
    release_heap: bool = True
    prompt_pass: str = "separate"
    objective: Union[str, Objective] = DEFAULT_OBJECTIVE

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> "LimeConfig":
        """Check every field; raise ``ValueError`` / ``TypeError`` naming the field and the fix."""
        if isinstance(self.steps, bool) or not isinstance(self.steps, int):
            raise TypeError(f"LimeConfig.steps must be an int, got {self.steps!r}")
        if self.steps < 0:
            raise ValueError(f"LimeConfig.steps must be >= 0 (0 = plain decoding), got {self.steps}")
        for name in ("lr", "kl_weight", "temperature", "tol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError(f"LimeConfig.{name} must be a finite number, got {v!r}")
        if self.lr < 0:
            raise ValueError(f"LimeConfig.lr must be >= 0 (a learning rate), got {self.lr}")
        if self.kl_weight < 0:
            raise ValueError(f"LimeConfig.kl_weight must be >= 0, got {self.kl_weight}")
        if self.temperature <= 0:
            raise ValueError(f"LimeConfig.temperature (tau) must be > 0, got {self.temperature}")
        if self.tol < 0:
            raise ValueError(f"LimeConfig.tol must be >= 0, got {self.tol}")
        for name, allowed in _ENUMS.items():
            v = getattr(self, name)
            if v not in allowed:
                raise ValueError(f"LimeConfig.{name} must be one of {', '.join(map(repr, allowed))}; got {v!r}")
        if isinstance(self.layers, str):
            if self.layers != "all":
                raise ValueError(f"LimeConfig.layers must be 'all' or a list of layer indices, got {self.layers!r}")
        else:
            try:
                layers = list(self.layers)
            except TypeError:
                raise TypeError(f"LimeConfig.layers must be 'all' or a list of ints, got {self.layers!r}") from None
            if not layers:
                raise ValueError("LimeConfig.layers is empty: perturb at least one layer (or use 'all')")
            for i in layers:
                if isinstance(i, bool) or not isinstance(i, int):
                    raise TypeError(f"LimeConfig.layers must hold ints, got {i!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"LimeConfig.layers has duplicates: {layers}")
            self.layers = tuple(layers)
        if self.mode == "incremental":
            self._check_incremental()
        elif self.prompt_pass != "separate":
            raise ValueError(f"LimeConfig.prompt_pass={self.prompt_pass!r} needs mode='incremental' (got mode="
                             f"{self.mode!r}): only the incremental mode's first token can fuse the prompt into its "
                             "inner forward; use prompt_pass='separate'")
        elif self.second_order == "frozen":
            raise ValueError(f"LimeConfig.second_order='frozen' needs mode='incremental' (got mode={self.mode!r}): the "
                             "first-order update differentiates the relevance of the cache entries; use "
                             "second_order='autograd' or 'exact' in this mode")
        if self.emit == "cached" and (self.mode != "fast" or not self.kv_cache):
            raise ValueError("LimeConfig.emit='cached' needs mode='fast' and kv_cache=True (it reuses the KV cache)")
        for name in ("confidence_gate", "share_gate"):
            v = getattr(self, name)
            if name == "confidence_gate" and v == "auto":
                continue
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1):
                extra = ", or 'auto'" if name == "confidence_gate" else ""
                raise ValueError(f"LimeConfig.{name} must be None or a number in [0, 1]{extra}, got {v!r}")
        v = self.fast_updates
        if not (v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)):
            raise ValueError("LimeConfig.fast_updates must be 'auto', None (run `steps` updates at `lr`) or an "
                             f"int >= 1, got {v!r}")
        if not isinstance(self.final_relevance, bool):
            raise TypeError(f"LimeConfig.final_relevance must be a bool, got {self.final_relevance!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError("LimeConfig.patience must be an int >= 0 (0 disables early stopping), got "
                             f"{self.patience!r}")
        if isinstance(self.top_k_logits, bool) or not isinstance(self.top_k_logits, int) or self.top_k_logits < 1:
            raise ValueError(f"LimeConfig.top_k_logits must be an int >= 1, got {self.top_k_logits!r}")
        if not isinstance(self.release_heap, bool):
            raise TypeError(f"LimeConfig.release_heap must be a bool, got {self.release_heap!r}")
        if not isinstance(self.activation_checkpoint, bool):
            raise TypeError(f"LimeConfig.activation_checkpoint must be a bool, got {self.activation_checkpoint!r}")
        if self.activation_checkpoint and self.second_order == "exact":
            raise ValueError("LimeConfig.activation_checkpoint supports second_order='autograd' only (the exact "
                             "second order differentiates its own forward-mode pass); set one of them differently")
        if self.attn_implementation is not None and not isinstance(self.attn_implementation, str):
            raise TypeError("LimeConfig.attn_implementation must be a string or None, got "
                            f"{self.attn_implementation!r}")
        self._validate_objective()
        return self

    def _check_incremental(self) -> None:
        """The options ``mode="incremental"`` does not have, refused by name."""
        frozen = self.second_order == "frozen"
        fu = self.fast_updates
        schedule_ok = fu is None or fu == "auto" or (isinstance(fu, int) and not isinstance(fu, bool) and fu >= 1)
        unsupported = {"second_order": (self.second_order == "exact", "the exact second order does not take the "
                                        "cache entries as inputs; use second_order='autograd' or 'frozen', or "
                                        "mode='fast'"),
                       "fast_updates": (frozen and schedule_ok and self.schedule[0] > 1, "second_order='frozen' "
                                        "takes one update per token (its KL gradient is that at Delta = 0, i.e. 0); "
                                        "use fast_updates=1 or 'auto', or second_order='autograd'"),
                       "delta_placement": (frozen and self.delta_placement == "after_rule", "second_order='frozen' "
                                           "adds Delta where its relevance probe is, before the attention rule (the "
                                           "rule only scales gradients); use 'auto' or 'before_rule'"),
                       "confidence_gate": (self.confidence_gate not in ("auto", None), "incremental mode optimises "
                                           "every token; use confidence_gate='auto' or None (or mode='fast')"),
                       "share_gate": (self.share_gate is not None, "incremental mode has no share gate; use None"),
                       "patience": (self.patience != 0, "incremental mode has no early stopping; use 0"),
                       "final_relevance": (self.final_relevance, "not available in incremental mode; use False"),
                       "emit": (self.emit not in ("auto", "final", "last_forward"), "incremental mode emits from "
                                "'final' (auto) or 'last_forward'"),
                       "kv_cache": (not self.kv_cache, "incremental mode runs on the KV cache; use kv_cache=True"),
                       "activation_checkpoint": (self.activation_checkpoint, "incremental mode computes one position "
                                                 "per step and keeps no whole-sequence graph; use False")}
        for name, (bad, fix) in unsupported.items():
            if bad:
                raise ValueError(f"LimeConfig.{name}={getattr(self, name)!r} is not supported with mode='incremental': "
                                 f"{fix}")

    def _validate_objective(self) -> None:
        if isinstance(self.objective, Objective):
            return
        if not isinstance(self.objective, str):
            raise TypeError(f"LimeConfig.objective must be a registered name ({', '.join(available_objectives())}) "
                            f"or an Objective instance, got {type(self.objective).__name__}")
        if self.objective not in available_objectives():
            raise ValueError(f"LimeConfig.objective {self.objective!r} is not registered; available objectives: "
                             f"{', '.join(available_objectives())} (register your own with "
                             "lime_attr.mitigation.register_objective)")

    def validate_for(self, num_layers: int) -> list[int]:
        """The perturbed layer indices for a language model with ``num_layers`` layers (clear error if
        an index does not exist)."""
        if self.layers == "all":
            return list(range(num_layers))
        out = []
        for i in self.layers:
            if not -num_layers <= i < num_layers:
                raise ValueError(f"LimeConfig.layers: layer index {i} does not exist; the language model has "
                                 f"{num_layers} decoder layers (valid: 0..{num_layers - 1}, or negative from the end)")
            out.append(i % num_layers)
        if len(set(out)) != len(out):
            raise ValueError(f"LimeConfig.layers names the same layer twice: {list(self.layers)}")
        return sorted(out)

    # ------------------------------------------------------------------ derived settings
    @property
    def emit_from(self) -> str:
        """``"final"`` or ``"last_forward"`` after resolving ``"auto"``."""
        if self.emit != "auto":
            return self.emit
        return "last_forward" if self.mode == "reference" else "final"

    @property
    def heads(self) -> str:
        """``"query"`` or ``"kv"`` after resolving ``"auto"``."""
        return "query" if self.delta_heads == "auto" else self.delta_heads

    @property
    def placement(self) -> str:
        """``"after_rule"`` or ``"before_rule"`` after resolving ``"auto"``."""
        if self.delta_placement == "auto":  # the frozen first-order update's Delta sits at its probe: before the rule
            return "before_rule" if self.second_order == "frozen" else "after_rule"
        return self.delta_placement

    @property
    def target_rule(self) -> str:
        """``"fixed"`` or ``"per_step"`` after resolving ``"auto"``."""
        if self.target != "auto":
            return self.target
        return "per_step"

    @property
    def gate(self) -> Optional[float]:
        """The confidence gate after resolving ``"auto"`` (``None`` in reference and incremental mode: they
        never gate)."""
        if self.mode != "fast":
            return None
        if self.confidence_gate == "auto":
            return FAST_CONFIDENCE_GATE
        return self.confidence_gate

    @property
    def schedule(self) -> tuple[int, float]:
        """``(updates, lr)``: the optimiser updates run per token and their learning rate.

        Reference mode: ``(steps, lr)`` (the last update is computed and, with ``emit="last_forward"``,
        discarded). Fast and incremental mode with ``fast_updates=None``: ``(steps, lr)``. Otherwise ``n = min(fast_updates,
        steps - 1)`` updates at ``lr * (steps - 1) / n``: the same total step as the ``steps - 1`` updates
        reference mode applies before emitting (``(0, lr)`` when ``steps <= 1``: reference mode emits the
        unperturbed token then).
        """
        if self.mode == "reference" or self.fast_updates is None:
            return self.steps, self.lr
        auto = INCREMENTAL_UPDATES if self.mode == "incremental" else FAST_UPDATES
        k = auto if self.fast_updates == "auto" else int(self.fast_updates)
        budget = max(self.steps - 1, 0)
        n = min(k, budget)
        if n == 0:
            return 0, self.lr
        return n, self.lr * budget / n

    @property
    def objective_impl(self) -> Objective:
        """The :class:`~lime_attr.mitigation.objectives.Objective` that ``objective`` names (or is)."""
        return get_objective(self.objective)

    def to_dict(self) -> dict:
        """Every field as strict JSON: tuples as lists, the objective as its name, non-finite floats as None."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "objective":
                v = objective_name(v)
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, float) and not math.isfinite(v):
                v = None
            out[f.name] = v
        return out

    def replace(self, **changes: Any) -> "LimeConfig":
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def recommended(cls, model: Any, **overrides: Any) -> "LimeConfig":
        """The configuration the docs recommend for ``model`` (``docs/lime_evaluation.rst``).

        For the demo models the evaluation selected it on the prior probes' validation split and judged it
        on the test split; every other model gets the paper's settings (:meth:`for_model`). The evidence
        (or that caveat) is logged at INFO; :meth:`recommendation` returns it with the configuration.

        Parameters
        ----------
        model : PreTrainedModel, PretrainedConfig or str
            A model, its config, a demo model name (``"digits-llava"``) or a ``model_type``.
        **overrides
            Any :class:`LimeConfig` field.
        """
        rec = cls.recommendation(model, **overrides)
        logging.getLogger(__name__).info("LimeConfig.recommended: %s", rec.evidence)
        return rec.config

    @classmethod
    def recommendation(cls, model: Any, **overrides: Any) -> Recommendation:
        """:meth:`recommended`'s configuration with its evidence
        (:class:`~lime_attr.mitigation.recommended.Recommendation`)."""
        key = model_key(model)
        if key in RECOMMENDATIONS:
            model_type, settings, evidence = RECOMMENDATIONS[key]
            return Recommendation(cls.for_model(model_type, **{**settings, **overrides}), evidence, True)
        mt = model if isinstance(model, str) else getattr(getattr(model, "config", model), "model_type", None)
        config = cls.for_model(mt, **overrides) if mt in PRESETS else cls(**overrides)
        return Recommendation(config, NOT_EVALUATED, False)

    @classmethod
    def for_model(cls, model_or_model_type: Any, **overrides: Any) -> "LimeConfig":
        """The paper's hyper-parameters for a model family, with ``overrides`` applied.

        Parameters
        ----------
        model_or_model_type : PreTrainedModel, PretrainedConfig or str
            A model (its ``config.model_type`` is used), a config, or a ``model_type`` string.
        **overrides
            Any :class:`LimeConfig` field.

        Examples
        --------
        >>> LimeConfig.for_model("qwen2_audio").kl_weight
        0.007
        >>> LimeConfig.for_model("llava", steps=3).steps
        3
        """
        if isinstance(model_or_model_type, str):
            mt = model_or_model_type
        else:
            cfg = getattr(model_or_model_type, "config", model_or_model_type)
            mt = getattr(cfg, "model_type", None)
            if mt is None:
                raise TypeError(f"cannot read a model_type from {type(model_or_model_type).__name__}; pass a Hugging "
                                "Face model, its config, or the model_type string")
        if mt not in PRESETS:
            listing = ", ".join(f"{k} (lr={v[0]:g}, kl_weight={v[1]:g})" for k, v in PRESETS.items())
            raise ValueError(f"no LIME preset for model_type {mt!r}. Presets: {listing}. For other models construct "
                             "LimeConfig(lr=..., kl_weight=...) directly")
        lr, kl = PRESETS[mt]
        kwargs: dict[str, Any] = dict(lr=lr, kl_weight=kl)
        kwargs.update(overrides)
        return cls(**kwargs)
