"""The benchmark registry: a benchmark is data -- an items loader, a scorer and an answer parser.

:func:`~lime_attr.evaluation.harness.run_benchmark` and ``lime-attr eval`` read their benchmarks from
here, so that a new benchmark is one file (its loader and scorer) plus one :func:`register_benchmark`
call; POPE, CHAIR and audio hallucination QA are registered the same way
(:mod:`lime_attr.evaluation.standard`).

.. code-block:: python

    import functools
    from lime_attr.evaluation import Benchmark, BenchmarkItems, register_benchmark, score_pope

    register_benchmark(Benchmark(
        name="my-pope",
        load_items=lambda request: BenchmarkItems(my_questions(request.split)),
        make_scorer=lambda request, items: functools.partial(score_pope, parser=request.parser),
        parser="llava_pope",
        description="POPE on my images",
        splits=("random",),
    ))
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from lime_attr.errors import UnknownNameError
from lime_attr.evaluation.results import EvalResult

__all__ = [
    "Benchmark",
    "BenchmarkItems",
    "BenchmarkRequest",
    "UnknownBenchmarkError",
    "register_benchmark",
    "unregister_benchmark",
    "get_benchmark",
    "available_benchmarks",
]


class UnknownBenchmarkError(UnknownNameError, ValueError):
    """A benchmark name that is not registered; the message lists the registered ones.

    Also a ``ValueError``, which :func:`~lime_attr.evaluation.harness.run_benchmark` raised for an
    unknown benchmark before the registry existed.
    """


@dataclass(frozen=True)
class BenchmarkRequest:
    """What a benchmark's loader and scorer factory are asked for: one split of one run.

    Attributes
    ----------
    benchmark
        The registered benchmark name.
    model_spec
        ``builtin:<name>``, a checkpoint folder or a hub id.
    split
        The split to load (one of :attr:`Benchmark.splits`), ``None`` for a benchmark without splits.
    files
        The benchmark files given by the user (``questions``, ``image_dir``, ``annotations`` ...; see
        :data:`~lime_attr.evaluation.harness.BENCHMARK_FILES`), absent keys meaning not given.
    corruption
        The parsed corruption of the builtin demo models' held-out sets (``None``: clean data).
    parser
        The yes/no answer parser to score with: the caller's, else
        :data:`~lime_attr.evaluation.harness.BUILTIN_PARSER` on the builtin models, else
        :attr:`Benchmark.parser`.
    """

    benchmark: str
    model_spec: str
    split: Optional[str] = None
    files: Mapping[str, Any] = field(default_factory=dict)
    corruption: Any = None
    parser: Optional[str] = None

    @property
    def builtin(self) -> Optional[str]:
        """The demo model name of a ``builtin:<name>`` spec, else ``None``."""
        return self.model_spec.split(":", 1)[1] if self.model_spec.startswith("builtin:") else None

    def file(self, key: str, flag: Optional[str] = None) -> Any:
        """The benchmark file ``key``; a ``ValueError`` naming the command-line flag when it is missing."""
        value = self.files.get(key)
        if not value:
            flag = flag or "--" + key.replace("_", "-")
            raise ValueError(f"{self.benchmark} on a non-builtin model needs {flag}")
        return value


@dataclass(frozen=True)
class BenchmarkItems:
    """The items of one split, and how the harness turns each into a prompt.

    Attributes
    ----------
    items
        The questions / images. For the builtin demo models each item carries ``prompt`` (the question
        in the model's format) and ``image`` or ``audio`` + ``sampling_rate`` (arrays); for other models
        ``image`` / ``audio_path`` name a file under ``media_root`` and the question is the
        ``question_field`` attribute, wrapped in the processor's chat template.
    media_root
        Folder of the media files named by the items.
    question_field
        Attribute of an item that holds the question.
    config
        Extra entries of the result's ``config`` (e.g. CHAIR's ``prompt``).
    """

    items: Sequence[Any]
    media_root: Optional[str] = None
    question_field: str = "question"
    config: Mapping[str, Any] = field(default_factory=dict)


#: ``load_items(request) -> BenchmarkItems``
ItemsLoader = Callable[[BenchmarkRequest], BenchmarkItems]
#: ``make_scorer(request, items) -> scorer``, the scorer being ``scorer(items, answers, config=...) -> EvalResult``
ScorerFactory = Callable[[BenchmarkRequest, Sequence[Any]], Callable[..., EvalResult]]


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark.

    Attributes
    ----------
    name
        The name ``run_benchmark`` and ``lime-attr eval`` take.
    load_items
        ``load_items(request) -> BenchmarkItems``: the items of ``request.split``; a ``ValueError`` for
        missing files or a model the benchmark cannot run on.
    make_scorer
        ``make_scorer(request, items) -> scorer``, called once per split after ``--limit`` was applied;
        the scorer is called as ``scorer(items, answers, config=config)`` and returns an
        :class:`~lime_attr.evaluation.EvalResult` (e.g. a ``functools.partial`` of
        :func:`~lime_attr.evaluation.score_pope` with ``parser=request.parser``).
    parser
        Default yes/no answer parser on user files (:func:`~lime_attr.evaluation.get_parser`);
        ``None`` for a benchmark that does not parse yes/no answers.
    description
        One line for ``lime-attr eval --help`` and the docs.
    splits
        The splits ``split="all"`` runs, in order; ``()`` for a benchmark without splits (one run).
    """

    name: str
    load_items: ItemsLoader
    make_scorer: ScorerFactory
    parser: Optional[str] = None
    description: str = ""
    splits: tuple[str, ...] = ()

    def resolve_splits(self, split: str = "all") -> tuple[Optional[str], ...]:
        """The splits one run covers: all of them for ``"all"``, ``(None,)`` without splits.

        Raises
        ------
        ValueError
            A split this benchmark does not have.
        """
        if not self.splits:
            return (None,)
        if split == "all":
            return self.splits
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; use {', '.join(self.splits)} or all")
        return (split,)


_REGISTRY: dict[str, Benchmark] = {}


def register_benchmark(benchmark: Benchmark, *, overwrite: bool = False) -> Benchmark:
    """Register ``benchmark`` under its name, for :func:`get_benchmark`, the harness and the CLI.

    Parameters
    ----------
    benchmark
        The benchmark to register.
    overwrite
        Replace an existing benchmark of the same name instead of raising ``ValueError``.

    Returns
    -------
    Benchmark
        ``benchmark`` (so that the call can be used as an expression).
    """
    if not isinstance(benchmark, Benchmark):
        raise TypeError(f"register_benchmark expects a Benchmark, got {type(benchmark).__name__}")
    if not benchmark.name or benchmark.name.startswith("-"):
        raise ValueError(f"a benchmark name must be non-empty and not start with '-', got {benchmark.name!r}")
    if benchmark.name in _REGISTRY and not overwrite and _REGISTRY[benchmark.name] is not benchmark:
        raise ValueError(f"a benchmark named {benchmark.name!r} is already registered; pass overwrite=True")
    _REGISTRY[benchmark.name] = benchmark
    return benchmark


def unregister_benchmark(name: str) -> None:
    """Remove a registered benchmark (a no-op for an unknown name); for tests and notebooks."""
    _REGISTRY.pop(name, None)


def available_benchmarks() -> list[str]:
    """Names of the registered benchmarks, in registration order."""
    return list(_REGISTRY)


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark ``name``.

    Raises
    ------
    UnknownBenchmarkError
        (an :class:`~lime_attr.errors.UnknownNameError` and a ``ValueError``) for an unregistered name;
        the message lists the registered ones.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownBenchmarkError(
            f"unknown benchmark {name!r}; use {', '.join(available_benchmarks())}. Register your own with "
            "lime_attr.evaluation.register_benchmark()."
        ) from None
