"""Held-out accuracy of the demo models: the numbers written on their model cards.

This is a small, self-contained measurement used by the training script and the tests; the full
benchmark scorers (POPE / CHAIR / audio QA with all metrics and decoding configurations) live in
:mod:`lime_attr.evaluation`.

Decoding: greedy (``do_sample=False``), prompts in the demo format
(:func:`~lime_attr.models.processing.format_prompt`). Yes/no answers: at most 2 new tokens; the answer
is ``"yes"`` when the first generated word is ``yes`` and ``"no"`` otherwise. Descriptions: at most 8
new tokens up to ``</s>``; every generated word that names an object is a mention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, ProcessorMixin

from .probes import PROBE_CONDITIONS, prior_descriptions, prior_probe
from .heldout import (
    POPE_SPLITS,
    DescriptionItem,
    PopeQuestion,
    description_items,
    object_names,
    pope_questions,
    resolve_task,
    task_prior,
)

__all__ = ["generate_answers", "first_answer_tokens", "probe_accuracy", "pope_metrics", "description_metrics", "evaluate_heldout", "parse_yes_no", "partner_hallucination_rate", "evaluate_probes"]


def _media_kwargs(items: Sequence[PopeQuestion | DescriptionItem]) -> dict[str, Any]:
    if items[0].image is not None:
        return {"images": [it.image for it in items]}
    return {"audio": [it.audio for it in items], "sampling_rate": items[0].sampling_rate}


def _encode(model: PreTrainedModel, processor: ProcessorMixin, items: Sequence[Any]) -> Any:
    """Processor outputs of a batch of items on the model's device, perceptual features in its dtype."""
    enc = processor(text=[it.prompt for it in items], return_tensors="pt", padding=True, **_media_kwargs(items))
    enc = enc.to(model.device)
    for key in ("pixel_values", "input_features"):
        if key in enc:
            enc[key] = enc[key].to(model.dtype)
    return enc


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    items: Sequence[PopeQuestion | DescriptionItem],
    max_new_tokens: int = 2,
    batch_size: int = 64,
) -> list[str]:
    """Greedy answers of a demo model to held-out items.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        ``digits-llava`` or ``tones-qwen2audio`` (or any model accepting the same processor outputs).
    processor : transformers.ProcessorMixin
        Its processor.
    items : sequence of PopeQuestion or DescriptionItem
        Items with ``prompt`` and ``image`` or ``audio``.
    max_new_tokens : int
        Generation budget.
    batch_size : int
        Items per forward batch.

    Returns
    -------
    list of str
        Decoded answers (special tokens removed), one per item.
    """
    answers: list[str] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(items), batch_size):
        enc = _encode(model, processor, items[start : start + batch_size])
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        answers.extend(t.strip() for t in processor.batch_decode(new_tokens, skip_special_tokens=True))
    model.train(was_training)
    return answers


@torch.no_grad()
def first_answer_tokens(
    model: PreTrainedModel, processor: ProcessorMixin, items: Sequence[Any], batch_size: int = 128
) -> list[str]:
    """The greedy first answer word of each item, from one forward pass per batch.

    This is the first token :meth:`~transformers.GenerationMixin.generate` would emit greedily (the
    argmax of the next-token logits after the prompt, left padding), decoded; for the word-level demo
    tokenizers it is the first answer word, which is all :func:`parse_yes_no` reads.

    Parameters
    ----------
    model, processor
        A demo model and its processor (tokenizer padding side ``"left"``).
    items : sequence
        Items with ``prompt`` and ``image`` or ``audio`` (POPE questions, probe items).
    batch_size : int
        Items per forward pass.

    Returns
    -------
    list of str
    """
    words: list[str] = []
    for start in range(0, len(items), batch_size):
        logits = model(**_encode(model, processor, items[start : start + batch_size])).logits[:, -1]
        words.extend(processor.tokenizer.convert_ids_to_tokens(logits.argmax(dim=-1).tolist()))
    return words


def probe_accuracy(model: PreTrainedModel, processor: ProcessorMixin, items: Sequence[Any]) -> float:
    """Greedy accuracy on yes/no items (first answer word, :func:`first_answer_tokens`)."""
    if not items:
        raise ValueError("probe_accuracy needs at least one item")
    words = first_answer_tokens(model, processor, items)
    return float(np.mean([parse_yes_no(w) == it.label for w, it in zip(words, items)]))


def parse_yes_no(answer: str) -> str:
    """``"yes"`` if the first word of ``answer`` is *yes* (case-insensitive), else ``"no"``."""
    words = answer.lower().replace(".", " ").replace(",", " ").split()
    return "yes" if words and words[0] == "yes" else "no"


def pope_metrics(labels: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive class "yes") and yes-ratio of yes/no answers.

    Parameters
    ----------
    labels : sequence of str
        Ground truth, ``"yes"`` / ``"no"``.
    answers : sequence of str
        Raw model answers (parsed with :func:`parse_yes_no`).

    Returns
    -------
    dict of str to float
    """
    pred = np.array([parse_yes_no(a) == "yes" for a in answers])
    gold = np.array([lab == "yes" for lab in labels])
    tp = float((pred & gold).sum())
    precision = tp / max(float(pred.sum()), 1.0)
    recall = tp / max(float(gold.sum()), 1.0)
    return {
        "n": float(len(gold)),
        "accuracy": float((pred == gold).mean()),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / max(precision + recall, 1e-12),
        "yes_ratio": float(pred.mean()),
        "invalid": float(sum(a.lower().split()[:1] not in (["yes"], ["no"]) for a in answers)),
    }


def description_metrics(
    references: Sequence[Sequence[str]], answers: Sequence[str], vocabulary: Sequence[str]
) -> dict[str, float]:
    """Exact match, per-object precision / recall / F1 and CHAIR of generated descriptions.

    Parameters
    ----------
    references : sequence of sequence of str
        Ground-truth object sets.
    answers : sequence of str
        Generated descriptions.
    vocabulary : sequence of str
        Object names; other words are ignored.

    Returns
    -------
    dict of str to float
        ``exact_match`` (set equality), micro ``precision`` / ``recall`` / ``f1`` over unique
        mentions, ``chair_i`` (hallucinated mentions / mentions), ``chair_s`` (answers with at least one
        hallucination / answers).
    """
    vocab = set(vocabulary)
    exact = tp = n_pred = n_gold = mentions_total = halluc_mentions = halluc_answers = 0
    for ref, ans in zip(references, answers):
        mentions = [w for w in ans.lower().split() if w in vocab]
        gold, pred = set(ref), set(mentions)
        exact += pred == gold
        tp += len(pred & gold)
        n_pred += len(pred)
        n_gold += len(gold)
        mentions_total += len(mentions)
        bad = sum(m not in gold for m in mentions)
        halluc_mentions += bad
        halluc_answers += bad > 0
    n = max(len(answers), 1)
    precision, recall = tp / max(n_pred, 1), tp / max(n_gold, 1)
    return {
        "n": float(len(answers)),
        "exact_match": exact / n,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / max(precision + recall, 1e-12),
        "chair_i": halluc_mentions / max(mentions_total, 1),
        "chair_s": halluc_answers / n,
    }


def evaluate_heldout(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    task: str,
    n_pope_items: int = 150,
    n_description_items: int = 200,
    corruption: Any = None,
) -> dict[str, dict[str, float]]:
    """POPE (three splits) and description metrics of a demo model on the default held-out sets.

    Parameters
    ----------
    model, processor
        The demo model and its processor.
    task : str
        ``"digits-llava"`` / ``"vision"`` or ``"tones-qwen2audio"`` / ``"audio"``.
    n_pope_items : int
        Items per POPE split (about 3.2 questions each).
    n_description_items : int
        Items of the description set.
    corruption : str, Corruption, mapping or None
        Degrade the held-out images / clips (:func:`lime_attr.models.parse_corruption`; ``"degraded"``
        for the model's default). ``None``: clean data.

    Returns
    -------
    dict
        ``{"pope_random": {...}, "pope_popular": {...}, "pope_adversarial": {...},
        "prior_breaking_negatives": {"n", "accuracy"}, "description": {...}}``; the prior-breaking entry is
        the accuracy on the adversarial negatives that name the absent partner of a present object.
    """
    name = resolve_task(task)
    results: dict[str, dict[str, float]] = {}
    prior = task_prior(name)
    for split in POPE_SPLITS:
        questions = pope_questions(name, split, n_items=n_pope_items, corruption=corruption)
        answers = generate_answers(model, processor, questions, max_new_tokens=2)
        results[f"pope_{split}"] = pope_metrics([q.label for q in questions], answers)
        if split == "adversarial":
            # negatives that name the absent co-occurrence partner of a present object: where the prior lies
            breaking = [
                a
                for q, a in zip(questions, answers)
                if q.label == "no" and any(prior.partner_of(o) == q.object for o in q.present)
            ]
            results["prior_breaking_negatives"] = {
                "n": float(len(breaking)),
                "accuracy": float(np.mean([parse_yes_no(a) == "no" for a in breaking])) if breaking else float("nan"),
            }
    items = description_items(name, n_items=n_description_items, corruption=corruption)
    answers = generate_answers(model, processor, items, max_new_tokens=8)
    results["description"] = description_metrics([it.objects for it in items], answers, object_names(name))
    return results


def partner_hallucination_rate(items: Sequence[Any], answers: Sequence[str]) -> float:
    """Share of broken-pair descriptions that name the absent partner (``item.partner``).

    Parameters
    ----------
    items : sequence of ProbeItem
        Description items of :func:`~lime_attr.models.prior_descriptions` (each with ``partner``).
    answers : sequence of str
        Generated descriptions, one per item.

    Returns
    -------
    float
    """
    if len(items) != len(answers) or not items:
        raise ValueError(f"need one answer per item and at least one item, got {len(items)} / {len(answers)}")
    return float(np.mean([it.partner in a.lower().split() for it, a in zip(items, answers)]))


def evaluate_probes(
    model: PreTrainedModel, processor: ProcessorMixin, task: str, n: int = 200, seed: int = 0, split: str = "test"
) -> dict[str, dict[str, float]]:
    """Greedy results on the prior probes (:func:`~lime_attr.models.prior_probe`) and broken-pair descriptions.

    Parameters
    ----------
    model, processor
        The demo model and its processor.
    task : str
        ``"digits-llava"`` / ``"vision"`` or ``"tones-qwen2audio"`` / ``"audio"``.
    n : int
        Items per condition (and descriptions).
    seed : int
        Probe seed.
    split : {"test", "validation"}
        Probe split.

    Returns
    -------
    dict
        ``{condition: {"n", "accuracy", "yes_ratio"}}`` for every condition of
        :data:`~lime_attr.models.probes.PROBE_CONDITIONS`, and ``"description"`` with ``n``,
        ``partner_hallucination``, ``chair_i``, ``chair_s``, ``exact_match``, ``recall``.
    """
    name = resolve_task(task)
    results: dict[str, dict[str, float]] = {}
    for condition in PROBE_CONDITIONS:
        items = prior_probe(name, condition, n=n, seed=seed, split=split)
        answers = generate_answers(model, processor, items, max_new_tokens=2)
        m = pope_metrics([it.label for it in items], answers)
        results[condition] = {"n": m["n"], "accuracy": m["accuracy"], "yes_ratio": m["yes_ratio"]}
    items = prior_descriptions(name, n=n, seed=seed, split=split)
    answers = generate_answers(model, processor, items, max_new_tokens=8)
    d = description_metrics([it.present for it in items], answers, task_prior(name).names)
    results["description"] = {
        "n": d["n"],
        "partner_hallucination": partner_hallucination_rate(items, answers),
        "chair_i": d["chair_i"],
        "chair_s": d["chair_s"],
        "exact_match": d["exact_match"],
        "recall": d["recall"],
    }
    return results
