"""Hallucination benchmarks: POPE, audio hallucination QA, CHAIR, and a torchrun-ready runner.

* :mod:`~lime_attr.evaluation.parsing` -- yes/no answer parsers (LLaVA/POPE rule, strict, Kuan et al.);
* :mod:`~lime_attr.evaluation.binary` -- confusion counts and metrics with a choosable positive class;
* :mod:`~lime_attr.evaluation.pope` -- POPE question files and scoring ("yes" positive);
* :mod:`~lime_attr.evaluation.audio_qa` -- Kuan et al. audio QA files and scoring ("no" positive);
* :mod:`~lime_attr.evaluation.chair` -- CHAIR_S / CHAIR_I / recall / length, COCO and generic;
* :mod:`~lime_attr.evaluation.results` -- result objects, JSON / CSV writers;
* :mod:`~lime_attr.evaluation.registry` -- the benchmark registry (:class:`Benchmark`: items loader,
  scorer, parser) that :func:`~lime_attr.evaluation.harness.run_benchmark` and ``lime-attr eval`` read;
  :mod:`~lime_attr.evaluation.standard` registers POPE, CHAIR and audio-QA;
* :mod:`~lime_attr.evaluation.sharding`, :mod:`~lime_attr.evaluation.runner` -- :func:`run_eval`
  in one process or under ``torchrun``.

Every result records the full configuration passed by the caller and, for yes/no benchmarks, the
answer parser, because published numbers differ by several points with either.
"""
from lime_attr.evaluation._common import EvaluationDataError
from lime_attr.strict_json import jsonable
from lime_attr.evaluation.audio_qa import (
    AUDIO_QA_SAMPLINGS,
    AudioQAItem,
    load_audio_qa,
    load_audio_qa_responses,
    score_audio_qa,
)
from lime_attr.evaluation.binary import (
    ConfusionCounts,
    align_answers,
    binary_metrics,
    confusion_counts,
    load_answers,
    normalize_label,
)
from lime_attr.evaluation.chair import (
    CocoChair,
    ObjectMention,
    ObjectVocabulary,
    coco_phrase_rules,
    load_generated_captions,
    load_synonyms,
    score_chair,
)
from lime_attr.evaluation.parsing import (
    AnswerParser,
    available_parsers,
    get_parser,
    parse_yes_no,
    register_parser,
)
from lime_attr.evaluation.pope import (
    POPE_DATASETS,
    POPE_SPLITS,
    PopeQuestion,
    find_pope_file,
    load_pope_questions,
    score_pope,
)
from lime_attr.evaluation.results import (
    BinaryQAResult,
    ChairResult,
    EvalResult,
    result_from_dict,
    write_csv,
    write_json,
)
from lime_attr.evaluation.registry import (
    Benchmark,
    BenchmarkItems,
    BenchmarkRequest,
    UnknownBenchmarkError,
    available_benchmarks,
    get_benchmark,
    register_benchmark,
    unregister_benchmark,
)
from lime_attr.evaluation.runner import run_eval
from lime_attr.evaluation import standard as standard  # noqa: F401 - registers POPE, CHAIR and audio-QA
from lime_attr.evaluation.sharding import (
    DistInfo,
    from_pretrained_kwargs,
    init_distributed,
    load_model_distributed,
    shard_indices,
    shutdown_distributed,
)

__all__ = [
    # errors
    "EvaluationDataError",
    # strict JSON
    "jsonable",
    # parsing
    "AnswerParser",
    "available_parsers",
    "get_parser",
    "parse_yes_no",
    "register_parser",
    # yes/no metrics
    "ConfusionCounts",
    "confusion_counts",
    "binary_metrics",
    "normalize_label",
    "load_answers",
    "align_answers",
    # POPE
    "POPE_DATASETS",
    "POPE_SPLITS",
    "PopeQuestion",
    "find_pope_file",
    "load_pope_questions",
    "score_pope",
    # audio QA
    "AUDIO_QA_SAMPLINGS",
    "AudioQAItem",
    "load_audio_qa",
    "load_audio_qa_responses",
    "score_audio_qa",
    # CHAIR
    "CocoChair",
    "ObjectMention",
    "ObjectVocabulary",
    "coco_phrase_rules",
    "load_generated_captions",
    "load_synonyms",
    "score_chair",
    # results
    "EvalResult",
    "BinaryQAResult",
    "ChairResult",
    "result_from_dict",
    "write_json",
    "write_csv",
    # the benchmark registry
    "Benchmark",
    "BenchmarkItems",
    "BenchmarkRequest",
    "UnknownBenchmarkError",
    "register_benchmark",
    "unregister_benchmark",
    "get_benchmark",
    "available_benchmarks",
    # running
    "run_eval",
    "DistInfo",
    "init_distributed",
    "shutdown_distributed",
    "shard_indices",
    "from_pretrained_kwargs",
    "load_model_distributed",
]
