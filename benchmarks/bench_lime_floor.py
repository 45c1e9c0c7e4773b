"""Cost floors of a relevance-guided update against greedy and the shipped incremental LIME variants, per
one-token answer, as ratios to greedy in the same run (design: ``docs/lime_evaluation.rst``, "Cost floors
of a relevance-guided update").

On the trained demo models (eager attention, fp32, one CPU thread), ``--items`` validation prior probes
per condition, one generated token each, decoders interleaved in rounds
(:func:`benchmarks.bench_lime_session.time_rounds`):

* ``greedy``: one no-grad forward of the prompt, the argmax of its last logits;
* ``floor/first-order``: the pass structure of any relevance-guided update in plain autograd (no LRP rule,
  no scope, no LIME bookkeeping): the language model's input embeddings (no grad), one forward of the
  prompt with grad that fills the cache, one backward of the answer logit to the embeddings, one no-grad
  emission forward of the last position over the cache of the others;
* ``floor/second-order``: the same, the backward with ``create_graph=True`` plus one backward of
  ``<g, u>`` (a Hessian-vector product, the pass a gradient of the rule-gradient term needs);
* ``SETTING/session``: the shipped incremental variant inside one ``LimeSession`` (as
  ``bench_lime_session.py``).

Run: ``python -m benchmarks.bench_lime_floor [--models ...] [--items 5] [--rounds 7] [--json out.json]``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from benchmarks.bench_lime_session import _items, decoders, parser, run_and_report, time_rounds


SETTINGS = ("logprob:10:frozen", "logprob:10:autograd", "scaled:10:autograd")


def _prompt(model: Any, enc: dict) -> tuple:
    """``(embeddings [1, S, D] detached, attention mask, position ids)`` of one processor output."""
    from lime_attr.mitigation.generate import prompt_embeddings

    ids, mask = enc["input_ids"], enc["attention_mask"]
    positions = mask.long().cumsum(-1) - 1
    rest = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        embeds = prompt_embeddings(model, ids, mask, positions, rest)
    return embeds.detach(), mask, positions


def floor_update(model: Any, enc: dict, second_order: bool) -> Tensor:
    """One answer with the floor pass structure; returns the emitted token id ``[1]``."""
    from lime_attr.mitigation.cache import cache_kwargs, output_cache

    embeds, mask, positions = _prompt(model, enc)
    x = embeds.requires_grad_(True)
    out = model(inputs_embeds=x, attention_mask=mask, position_ids=positions, use_cache=True)
    z = out.logits[:, -1].max()
    (g,) = torch.autograd.grad(z, x, create_graph=second_order)
    if second_order:
        torch.autograd.grad((g * embeds.detach()).sum(), x, allow_unused=True)
    cache = output_cache(out)
    cache.crop(-1)
    with torch.no_grad():
        last = model(inputs_embeds=x[:, -1:].detach(), attention_mask=mask, position_ids=positions[:, -1:],
                     **cache_kwargs(cache))
    return last.logits[:, -1].argmax(-1)


def floor_decoders(model: Any, items: list) -> dict[str, Callable[[], None]]:
    """``{"floor/first-order": run, "floor/second-order": run}``, each one round over ``items``."""
    def run(second_order: bool) -> Callable[[], None]:
        def one_round() -> None:
            for enc in items:
                floor_update(model, enc, second_order)

        return one_round

    return {"floor/first-order": run(False), "floor/second-order": run(True)}


def run_model(name: str, n: int, rounds: int, settings: Sequence[str]) -> dict[str, Any]:
    """Interleaved rounds of greedy, both floors and the session decoders of ``settings`` on one model."""
    from lime_attr.models import load_builtin

    model, processor = load_builtin(name, attn_implementation="eager")
    model.eval()
    items = _items(model, processor, name, n)
    lime = decoders(model, processor, items, settings, session=True)
    runs = {"greedy": lime.pop("greedy"), **floor_decoders(model, items),
            **{k: v for k, v in lime.items() if k.endswith("/session")}}
    return {"model": name, **time_rounds(runs, len(items), rounds)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser(__doc__.splitlines()[0], SETTINGS).parse_args(argv)
    run_and_report(args, lambda m: run_model(m, args.items, args.rounds, args.settings))

if __name__ == "__main__":
    main()
