"""Tests of the hallucination scorers: parsers, POPE, audio QA, CHAIR, result writers.

Expected values are computed by hand from the fixture files in ``tests/fixtures/eval`` (the
derivation is written next to each assertion); property tests check bounds, the yes/no polarity
symmetry and CHAIR invariances.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lime_attr.errors import UnknownNameError
from lime_attr.evaluation import (
    AnswerParser,
    AudioQAItem,
    BinaryQAResult,
    ChairResult,
    CocoChair,
    EvaluationDataError,
    ObjectVocabulary,
    PopeQuestion,
    available_parsers,
    binary_metrics,
    coco_phrase_rules,
    confusion_counts,
    find_pope_file,
    get_parser,
    load_answers,
    load_audio_qa,
    load_audio_qa_responses,
    load_generated_captions,
    load_pope_questions,
    load_synonyms,
    normalize_label,
    parse_yes_no,
    register_parser,
    result_from_dict,
    score_audio_qa,
    score_chair,
    score_pope,
    write_csv,
    write_json,
)
from lime_attr.evaluation.chair import singular_candidates, tokenize
from lime_attr.evaluation.parsing import parse_kuan2024, parse_llava_pope, parse_strict

FIX = Path(__file__).parent / "fixtures" / "eval"

FAST = settings(max_examples=60, deadline=None)


# ---------------------------------------------------------------------------------------------
# parsers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("No.", "no"),
        ("no", "no"),
        ("No, there is no bench.", "no"),
        ("There is not a car in the image.", "no"),
        ("There is a snowboard. No other objects.", "yes"),  # only the first sentence counts
        ("NO", "yes"),  # case sensitive: LLaVA's quirk, reproduced
        ("Not at all. It is not there.", "yes"),  # "Not" is not in the list
        ("no!", "yes"),  # punctuation other than , and . stays attached
        ("", "yes"),
        ("No\nthere is none", "yes"),  # newline is not a separator
        ("Sure, no,", "no"),  # commas are deleted before splitting
    ],
)
def test_llava_pope_parser(text: str, expected: str) -> None:
    assert parse_llava_pope(text) == expected
    assert parse_yes_no(text) == expected
    assert parse_yes_no(text, "pope") == expected  # alias


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        ("  **Yes**, there is.", "yes"),
        ('"No." ', "no"),
        ("NO", "no"),
        ("no, a cat", "no"),
        ("There is no dog.", None),
        ("Yeah", None),
        ("Nope", None),
        ("yesterday", None),
        ("", None),
    ],
)
def test_strict_parser(text: str, expected: str | None) -> None:
    assert parse_strict(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes, there is a sound of dog barking.", "yes"),
        ("No, there is no sound of speech.", "no"),
        ("The audio contains a car engine.", "yes"),
        ("The audio does not contain a siren.", "no"),
        ("the audio doesn't contain it", "no"),
        ("I am unable to hear that.", "no"),
        ("I can't tell", "no"),
        ("there is no siren", "no"),
        ("There is no siren", None),  # case sensitive, as released
        ("I can hear birds.", None),
        ("The eyes of the cat", "yes"),  # substring 'yes' in 'eyes', as released
    ],
)
def test_kuan2024_parser(text: str, expected: str | None) -> None:
    assert parse_kuan2024(text) == expected


def test_parser_registry_and_errors() -> None:
    assert {"llava_pope", "strict", "kuan2024"} <= set(available_parsers())
    p = get_parser("strict")
    assert p.info() == {"name": "strict", "description": p.description}
    with pytest.raises(UnknownNameError, match="registered: "):
        get_parser("does-not-exist")
    with pytest.raises(TypeError):
        get_parser("llava_pope")(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already registered"):
        register_parser(AnswerParser("strict", "other", parse_llava_pope))


def _always_yes(text: str) -> str:
    return "yes"


def test_custom_parser_is_recorded() -> None:
    parser = AnswerParser("always_yes_test", "answers yes to everything", _always_yes)
    register_parser(parser, overwrite=True)
    q = load_pope_questions(FIX / "coco_pope_random.json")
    r = score_pope(q, ["No"] * len(q), parser="always_yes_test")
    assert r.parser == {"name": "always_yes_test", "description": "answers yes to everything"}
    assert r.yes_ratio == 1.0 and r.recall == 1.0 and r.precision == 0.5


# ---------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------

def test_load_pope_questions() -> None:
    q = load_pope_questions(FIX / "coco_pope_random.json")
    assert len(q) == 10
    assert q[0] == PopeQuestion(1, "COCO_val2014_000000000001.jpg", "Is there a dog in the image?", "yes", "coco", "random")
    assert [x.label for x in q].count("yes") == 5
    assert find_pope_file(FIX, "coco", "random") == FIX / "coco_pope_random.json"
    with pytest.raises(FileNotFoundError, match="tried"):
        find_pope_file(FIX, "gqa", "popular")
    with pytest.raises(EvaluationDataError, match="unknown POPE split"):
        find_pope_file(FIX, "coco", "easy")


def test_pope_file_layouts(tmp_path: Path) -> None:
    records = [json.loads(line) for line in (FIX / "coco_pope_random.json").read_text().splitlines()]
    (tmp_path / "gqa").mkdir()
    as_array = tmp_path / "gqa" / "gqa_pope_adversarial.json"
    as_array.write_text(json.dumps(records))  # some forks store one JSON array
    found = find_pope_file(tmp_path, "gqa", "adversarial")
    assert found == as_array
    q = load_pope_questions(found)
    assert len(q) == 10 and q[0].dataset == "gqa" and q[0].split == "adversarial"
    assert load_pope_questions(found, split="popular")[0].split == "popular"
    plain = tmp_path / "questions.jsonl"
    plain.write_text((FIX / "coco_pope_random.json").read_text())
    assert load_pope_questions(plain)[0].dataset is None


def test_pope_llava_parser_hand_computed() -> None:
    q = load_pope_questions(FIX / "coco_pope_random.json")
    # answers (matched by question_id; the file is shuffled) parsed with LLaVA's rule:
    # labels yes: 1 yes, 2 yes, 3 yes ("There is a snowboard"), 4 no, 5 yes ("NO")  -> TP 4, FN 1
    # labels no:  6 no, 7 no ("not"), 8 yes, 9 no, 10 yes ("Not at all")             -> TN 3, FP 2
    r = score_pope(q, FIX / "pope_answers.jsonl", config={"model": "toy", "temperature": 0})
    assert isinstance(r, BinaryQAResult)
    assert (r.counts["TP"], r.counts["FP"], r.counts["TN"], r.counts["FN"]) == (4, 2, 3, 1)
    assert r.accuracy == pytest.approx(7 / 10)
    assert r.precision == pytest.approx(4 / 6)
    assert r.recall == pytest.approx(4 / 5)
    assert r.f1 == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))
    assert r.yes_ratio == pytest.approx(6 / 10)
    assert r.parser["name"] == "llava_pope"
    assert r.metadata["dataset"] == "coco" and r.metadata["split"] == "random"
    assert r.metadata["positive_class"] == "yes"
    d = r.to_dict()
    assert list(d["metrics"]) == ["accuracy", "precision", "recall", "f1", "yes_ratio"]
    assert d["config"] == {"model": "toy", "temperature": 0}
    json.dumps(d, allow_nan=False)
    assert "items" not in d and len(r.to_dict(include_items=True)["items"]) == 10


def test_pope_strict_parser_and_unparsed_policies() -> None:
    q = load_pope_questions(FIX / "coco_pope_random.json")
    answers = load_answers(FIX / "pope_answers.jsonl")
    # strict: 1 yes, 2 yes, 3 -, 4 no, 5 no | 6 no, 7 -, 8 yes, 9 no, 10 -   (- = unparsed)
    # labels yes: TP 2, FN 2, unparsed 1 ; labels no: TN 2, FP 1, unparsed 2
    r = score_pope(q, answers, parser="strict")
    assert (r.counts["TP"], r.counts["FP"], r.counts["TN"], r.counts["FN"]) == (2, 1, 2, 2)
    assert r.counts["unparsed"] == 3 and r.counts["n"] == 10
    assert r.accuracy == pytest.approx(4 / 10)
    assert r.precision == pytest.approx(2 / 3)
    assert r.recall == pytest.approx(2 / (2 + 2 + 1))  # unparsed positives count as misses
    assert r.f1 == pytest.approx(2 * 2 / (2 * 2 + 1 + 2 + 1))
    assert r.yes_ratio == pytest.approx(3 / 10)
    assert any("unparsed" in n for n in r.notes)

    ex = score_pope(q, answers, parser="strict", unparsed="exclude")
    assert ex.counts["n"] == 7 and ex.counts["excluded"] == 3
    assert ex.accuracy == pytest.approx(4 / 7) and ex.recall == pytest.approx(2 / 4)
    assert ex.yes_ratio == pytest.approx(3 / 7)

    as_no = score_pope(q, answers, parser="strict", unparsed="no")
    # 3 -> FN, 7 -> TN, 10 -> TN
    assert (as_no.counts["TP"], as_no.counts["FP"], as_no.counts["TN"], as_no.counts["FN"]) == (2, 1, 4, 3)

    with pytest.raises(EvaluationDataError, match="could not be parsed"):
        score_pope(q, answers, parser="strict", unparsed="error")


def test_pope_answer_alignment() -> None:
    q = load_pope_questions(FIX / "coco_pope_random.json")
    by_id = load_answers(FIX / "pope_answers.jsonl")
    assert isinstance(by_id, dict) and by_id["10"].startswith("Not at all")
    ordered = [by_id[str(x.question_id)] for x in q]
    a = score_pope(q, ordered).to_dict()
    b = score_pope(q, {x.question_id: by_id[str(x.question_id)] for x in q}).to_dict()
    c = score_pope(q, FIX / "pope_answers.jsonl").to_dict()
    assert a == b == c
    with pytest.raises(EvaluationDataError, match="10 questions but 9 answers"):
        score_pope(q, ordered[:-1])
    with pytest.raises(EvaluationDataError, match="have no answer"):
        score_pope(q, {x.question_id: "yes" for x in q[:-1]})
    with pytest.raises(EvaluationDataError, match="belong to no item"):
        score_pope(q, {**{x.question_id: "yes" for x in q}, 99: "no"})


def test_pope_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(EvaluationDataError, match="unknown label 'maybe'"):
        load_pope_questions(FIX / "pope_bad_label.jsonl")
    with pytest.raises(FileNotFoundError, match="POPE question file not found"):
        load_pope_questions(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="answer file not found"):
        score_pope(load_pope_questions(FIX / "coco_pope_random.json"), tmp_path / "none.jsonl")
    bad = tmp_path / "coco_pope_popular.json"
    bad.write_text('{"question_id": 1, "image": "a.jpg", "text": "q"}\n')
    with pytest.raises(EvaluationDataError, match="missing field"):
        load_pope_questions(bad)
    bad.write_text('{"question_id": 1, "image": "a.jpg", "text": "q", "label": "no"}\nnot json\n')
    with pytest.raises(EvaluationDataError, match="line 2"):
        load_pope_questions(bad)
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"question_id": 1, "image": "a", "text": "q", "label": "no"}\n' * 2)
    with pytest.raises(EvaluationDataError, match="duplicate question_id"):
        load_pope_questions(dup)
    with pytest.raises(EvaluationDataError, match="unknown label"):
        score_pope(["yes", "perhaps"], ["yes", "no"])
    with pytest.raises(EvaluationDataError, match="no items"):
        score_pope([], [])


def test_pope_zero_predicted_positives_documented_value() -> None:
    labels = ["yes", "no", "no", "yes"]
    r = score_pope(labels, ["No"] * 4)
    # TP = FP = 0: precision 0/0 -> zero_division (0.0), recall 0/2 = 0, F1 = 2*0/(0+0+2) = 0
    assert r.precision == 0.0 and r.recall == 0.0 and r.f1 == 0.0 and r.accuracy == 0.5
    assert any("precision" in n and "undefined" in n for n in r.notes)
    nan = score_pope(labels, ["No"] * 4, zero_division=float("nan"))
    assert math.isnan(nan.precision) and nan.f1 == 0.0
    assert nan.to_dict()["metrics"]["precision"] is None  # strict JSON
    json.dumps(nan.to_dict(), allow_nan=False)
    only_neg = score_pope(["no", "no"], ["No", "No"])
    # no positive labels and no predicted positives: recall and F1 undefined too
    assert only_neg.accuracy == 1.0 and only_neg.recall == 0.0 and only_neg.f1 == 0.0
    assert sum("undefined" in n for n in only_neg.notes) == 3


def test_labels_normalisation() -> None:
    assert normalize_label(" Yes ") == "yes" and normalize_label("NO") == "no"
    assert normalize_label(True) == "yes" and normalize_label(0) == "no"
    for bad in ("y", 2, None, "true", 1.0):
        with pytest.raises(EvaluationDataError):
            normalize_label(bad)
    with pytest.raises(EvaluationDataError, match="different lengths"):
        confusion_counts(["yes"], ["yes", "no"])
    with pytest.raises(EvaluationDataError, match="prediction 0"):
        confusion_counts(["yes"], ["maybe"])


# ---------------------------------------------------------------------------------------------
# audio hallucination QA
# ---------------------------------------------------------------------------------------------

def test_load_audio_qa() -> None:
    items = load_audio_qa(FIX / "audio_qa_random.jsonl", audio_root="/data/audiocaps")
    assert len(items) == 8
    assert items[0] == AudioQAItem(
        0, "Y7fmOlUlwoNg", "/data/audiocaps/Y7fmOlUlwoNg.wav",
        "Is there a sound of dog barking in the audio?", "yes", "dog barking", "positive", "random",
    )
    assert load_audio_qa(FIX / "audio_qa_random.jsonl")[0].audio_path is None
    mixed = load_audio_qa(FIX / "audio_qa_mixed.csv")
    assert [x.sampling for x in mixed] == ["popular", "popular", "adversarial", "adversarial"]
    adv = load_audio_qa(FIX / "audio_qa_mixed.csv", sampling="adversarial")
    assert [x.entry_id for x in adv] == ["2", "3"] and [x.label for x in adv] == ["yes", "no"]
    with pytest.raises(EvaluationDataError, match="unknown sampling"):
        load_audio_qa(FIX / "audio_qa_mixed.csv", sampling="hard")


def test_audio_qa_no_positive_hand_computed() -> None:
    items = load_audio_qa(FIX / "audio_qa_random.jsonl")
    _, answers = load_audio_qa_responses(FIX / "audio_qa_responses.csv")
    # kuan2024 parses: 0 yes, 1 no, 2 yes, 3 -, 4 no, 5 no, 6 yes, 7 no
    # positive = "no". labels no (4-7): preds no, no, yes, no -> TP 3, FN 1
    #                  labels yes (0-3): preds yes, no, yes, -  -> TN 2, FP 1, unparsed 1
    r = score_audio_qa(items, answers, config={"model": "toy"})
    assert r.positive_class == "no"
    assert (r.counts["TP"], r.counts["FP"], r.counts["TN"], r.counts["FN"]) == (3, 1, 2, 1)
    assert r.counts["unparsed"] == 1
    assert r.accuracy == pytest.approx(5 / 8)
    assert r.precision == pytest.approx(3 / 4)
    assert r.recall == pytest.approx(3 / 4)
    assert r.f1 == pytest.approx(3 / 4)
    assert r.metrics["yes_rate"] == pytest.approx(3 / 8) == r.yes_ratio
    assert r.metadata["split"] == "random" and r.parser["name"] == "kuan2024"
    # The released script counts the unparsed answer (label yes) among the "no" answers for precision:
    # 3 / 5. unparsed="no" reproduces that here (its unparsed answer has label "yes").
    k = score_audio_qa(items, answers, unparsed="no")
    assert k.precision == pytest.approx(3 / 5) and k.recall == pytest.approx(3 / 4)
    assert k.accuracy == pytest.approx(5 / 8) and k.metrics["yes_rate"] == pytest.approx(3 / 8)


def test_audio_qa_response_csv_matches_items() -> None:
    items = load_audio_qa(FIX / "audio_qa_random.jsonl")
    rows, answers = load_audio_qa_responses(FIX / "audio_qa_responses.csv")
    assert [r["label"] for r in rows] == [i.label for i in items]
    a = score_audio_qa(items, answers).to_dict()
    b = score_audio_qa(rows, answers).to_dict()
    del a["metadata"]["split"]  # the response CSV has no sampling column
    assert a == b
    by_id = {str(i.entry_id): ans for i, ans in zip(items, answers)}
    assert score_audio_qa(items, by_id).metrics == score_audio_qa(items, answers).metrics


def test_audio_qa_parquet_needs_pyarrow(tmp_path: Path) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        f = tmp_path / "split.parquet"
        f.write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pyarrow"):
            load_audio_qa(f)
    else:  # pragma: no cover - depends on the environment
        pytest.skip("pyarrow installed")


def test_audio_qa_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_audio_qa(tmp_path / "nope.jsonl")
    f = tmp_path / "bad.jsonl"
    f.write_text('{"audio_index": "Y1", "prompt_text": "q", "label": "Unsure"}\n')
    with pytest.raises(EvaluationDataError, match="unknown label 'Unsure'"):
        load_audio_qa(f)
    f.write_text('{"audio_index": "Y1", "prompt_text": "q", "label": "Yes", "attribute": "negative"}\n')
    with pytest.raises(EvaluationDataError, match="contradicts"):
        load_audio_qa(f)
    f.write_text('{"audio_index": "Y1", "label": "Yes"}\n')
    with pytest.raises(EvaluationDataError, match="prompt_text"):
        load_audio_qa(f)
    items = load_audio_qa(FIX / "audio_qa_random.jsonl")
    with pytest.raises(EvaluationDataError, match="8 questions but 7 answers"):
        score_audio_qa(items, ["No"] * 7)
    g = tmp_path / "resp.csv"
    g.write_text("entry_id,audio_index,label\n0,Y1,Yes\n")
    with pytest.raises(EvaluationDataError, match="response"):
        load_audio_qa_responses(g)


# ---------------------------------------------------------------------------------------------
# yes/no properties
# ---------------------------------------------------------------------------------------------

_LABEL = st.sampled_from(["yes", "no"])
_PRED = st.sampled_from(["yes", "no", None])
_FLIP = {"yes": "no", "no": "yes", None: None}


@st.composite
def _labels_preds(draw, allow_unparsed=True):
    n = draw(st.integers(1, 40))
    labels = draw(st.lists(_LABEL, min_size=n, max_size=n))
    preds = draw(st.lists(_PRED if allow_unparsed else _LABEL, min_size=n, max_size=n))
    return labels, preds


@FAST
@given(_labels_preds(), st.sampled_from(["yes", "no"]), st.sampled_from(["wrong", "exclude", "yes", "no"]))
def test_binary_metric_bounds_and_identities(lp, positive, policy) -> None:
    labels, preds = lp
    c = confusion_counts(labels, preds, positive=positive, unparsed=policy)
    if c.n == 0:
        with pytest.raises(EvaluationDataError):
            binary_metrics(c)
        return
    m, _ = binary_metrics(c)
    for v in m.values():
        assert 0.0 <= v <= 1.0
    assert m["accuracy"] == pytest.approx((c.TP + c.TN) / c.n)
    assert c.n + c.excluded == len(labels)
    assert c.pred_yes + c.pred_no + c.unparsed == c.n
    assert c.label_yes + c.label_no == c.n
    if c.TP + c.FP > 0 and c.TP + c.FN + c.unparsed_pos > 0 and m["precision"] + m["recall"] > 0:
        p, r = m["precision"], m["recall"]
        assert m["f1"] == pytest.approx(2 * p * r / (p + r))
    assert min(m["precision"], m["recall"]) - 1e-12 <= m["f1"] <= max(m["precision"], m["recall"]) + 1e-12


@FAST
@given(_labels_preds())
def test_polarity_symmetry(lp) -> None:
    """Swapping yes/no in labels and predictions swaps the positive class and nothing else."""
    labels, preds = lp
    a = confusion_counts(labels, preds, positive="yes")
    b = confusion_counts([_FLIP[x] for x in labels], [_FLIP[x] for x in preds], positive="no")
    assert (a.TP, a.FP, a.TN, a.FN, a.unparsed_pos, a.unparsed_neg) == (
        b.TP, b.FP, b.TN, b.FN, b.unparsed_pos, b.unparsed_neg
    )
    ma, _ = binary_metrics(a)
    mb, _ = binary_metrics(b)
    for k in ("accuracy", "precision", "recall", "f1"):
        assert ma[k] == pytest.approx(mb[k])
    assert mb["yes_ratio"] == pytest.approx(a.pred_no / a.n)
    if a.unparsed == 0:
        assert mb["yes_ratio"] == pytest.approx(1 - ma["yes_ratio"])


@FAST
@given(_labels_preds(allow_unparsed=False))
def test_pope_vs_audio_polarity_end_to_end(lp) -> None:
    """POPE on (labels, answers) equals audio QA on the swapped labels and answers."""
    labels, preds = lp
    words = {"yes": "Yes", "no": "No"}
    pope = score_pope(labels, [words[p] for p in preds], parser="strict")
    audio = score_audio_qa([_FLIP[x] for x in labels], [words[_FLIP[p]] for p in preds], parser="strict")
    for k in ("accuracy", "precision", "recall", "f1"):
        assert pope.metrics[k] == pytest.approx(audio.metrics[k])
    assert audio.metrics["yes_rate"] == pytest.approx(1 - pope.yes_ratio)


@FAST
@given(
    st.text(alphabet=st.characters(blacklist_characters="."), max_size=30),
    st.text(max_size=30),
)
def test_llava_parser_reads_first_sentence_only(first: str, rest: str) -> None:
    assert parse_llava_pope(first + ". " + rest) == parse_llava_pope(first)


# ---------------------------------------------------------------------------------------------
# CHAIR
# ---------------------------------------------------------------------------------------------

def test_tokenize_and_singular() -> None:
    assert tokenize("A man's hot-dog, 2 cats!") == ["a", "man's", "hot", "dog", "2", "cats"]
    assert tokenize("It\u2019s") == ["it's"]
    assert singular_candidates("ties") == ["ty", "tie"]
    assert singular_candidates("knives")[0] == "knife"
    assert singular_candidates("glass") == []
    assert singular_candidates("buses") == ["bus", "buse"]


def test_load_synonyms() -> None:
    syn = load_synonyms(FIX / "synonyms_mini.txt")
    assert len(syn) == 12
    assert syn["person"][:3] == ["girl", "boy", "man"]
    assert syn["bird"] == []
    assert syn["traffic light"] == ["stop light", "traffic signal"]


def test_vocabulary_matching_rules() -> None:
    rules, drops = coco_phrase_rules()
    v = ObjectVocabulary(load_synonyms(FIX / "synonyms_mini.txt"), phrase_rules=rules, drop_if_present=drops)

    def cats(text: str) -> list[tuple[str, str]]:
        return [(m.text, m.category) for m in v.extract(text)]

    # multi-word synonyms (longest match first), plurals on the last word, possessive 's
    assert cats("Two stop lights and a traffic light.") == [("stop lights", "traffic light"), ("traffic light", "traffic light")]
    assert cats("the women's puppies") == [("women's", "person"), ("puppies", "dog")]
    assert cats("hot-dogs") == [("hot dogs", "hot dog")]
    assert cats("A hot bath") == []  # 'hot' alone is nothing
    # COCO rules: baby animal is the animal, passenger jet the vehicle, bow tie a tie,
    # toilet seat a toilet, and 'seat' is dropped when 'toilet' is mentioned
    assert cats("a baby bird") == [("baby bird", "bird")]
    assert cats("a baby") == [("baby", "person")]
    assert cats("passenger jets") == [("passenger jets", "airplane")]
    assert cats("a bow tie") == [("bow tie", "tie")]
    assert cats("a seat near the toilet") == [("toilet", "toilet")]
    assert cats("a seat near the door") == [("seat", "chair")]
    plain = ObjectVocabulary(load_synonyms(FIX / "synonyms_mini.txt"))
    assert [(m.text, m.category) for m in plain.extract("a baby bird")] == [("baby", "person"), ("bird", "bird")]
    no_plural = ObjectVocabulary({"dog": ["puppy"]}, plural_handling=False)
    assert no_plural.extract("dogs and a puppy")[0].text == "puppy"


def test_coco_chair_hand_computed() -> None:
    chair = CocoChair.from_files(
        FIX / "instances_mini.json", FIX / "captions_mini.json", FIX / "synonyms_mini.txt"
    )
    # ground truth = instances U reference-caption objects
    assert chair.ground_truth(1) == {"person", "dog"}
    assert chair.ground_truth(2) == {"cat", "couch"}  # couch only from "sofa" in a caption
    assert chair.ground_truth(3) == {"toilet"}
    assert chair.ground_truth(4) == {"person", "hot dog", "dining table"}  # no instances at all
    r = chair.score_file(FIX / "generated_captions.json", config={"model": "toy"})
    assert isinstance(r, ChairResult)
    # img1: man, dog, cat*, chair*   img2: cat, cats   img3: toilet seat->toilet, toilet
    # img4: people, hotdogs, baby bird*, table           (* hallucinated)
    assert r.counts["n_mentions"] == 12 and r.counts["n_hallucinated_mentions"] == 3
    assert r.chair_i == pytest.approx(3 / 12)
    assert r.chair_s == pytest.approx(2 / 4)
    # recalled: {person, dog} + {cat} + {toilet} + {person, hot dog, dining table} = 7 of 8
    assert r.recall == pytest.approx(7 / 8)
    assert r.length == pytest.approx((12 + 10 + 10 + 10) / 4)
    assert r.items[0]["hallucinated"] == [["cat", "cat"], ["chair", "chair"]]
    d = r.to_dict()
    assert list(d["metrics"]) == ["chair_s", "chair_i", "recall", "length"]
    assert d["config"] == {"model": "toy"} and d["parser"] is None
    json.dumps(d, allow_nan=False)


def test_coco_chair_without_coco_rules() -> None:
    chair = CocoChair.from_files(
        [FIX / "instances_mini.json"], [FIX / "captions_mini.json"], FIX / "synonyms_mini.txt",
        coco_rules=False, image_ids=[1, 2, 3, 4],
    )
    r = chair.score_file(FIX / "generated_captions.json")
    # img3: toilet, seat* (chair), toilet; img4: people, hotdogs, baby (person, in gt), bird*, table
    assert r.counts["n_mentions"] == 4 + 2 + 3 + 5
    assert r.counts["n_hallucinated_mentions"] == 2 + 0 + 1 + 1
    assert r.chair_s == pytest.approx(3 / 4)


def test_coco_chair_errors(tmp_path: Path) -> None:
    chair = CocoChair.from_files(FIX / "instances_mini.json", FIX / "captions_mini.json", FIX / "synonyms_mini.txt")
    with pytest.raises(EvaluationDataError, match="image_id 5"):
        chair.score([5], ["a dog"])
    with pytest.raises(EvaluationDataError, match="different lengths"):
        chair.score([1, 2], ["a dog"])
    with pytest.raises(FileNotFoundError, match="synonyms file"):
        CocoChair.from_files(FIX / "instances_mini.json", None, tmp_path / "syn.txt")
    syn = tmp_path / "syn.txt"
    syn.write_text("person, man\ndog\n")
    with pytest.raises(EvaluationDataError, match="COCO category 'cat'"):
        CocoChair.from_files(FIX / "instances_mini.json", None, syn)
    restricted = CocoChair.from_files(
        FIX / "instances_mini.json", FIX / "captions_mini.json", FIX / "synonyms_mini.txt", image_ids=[1]
    )
    with pytest.raises(EvaluationDataError, match="image_id 2"):
        restricted.ground_truth(2)


def test_generated_caption_layouts(tmp_path: Path) -> None:
    ids, caps = load_generated_captions(FIX / "generated_captions.json")
    assert ids == [1, 2, 3, 4] and caps[1].startswith("A cat")
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps({"image_id": i, "caption": c}) + "\n" for i, c in zip(ids, caps)))
    b = tmp_path / "b.json"
    b.write_text(json.dumps({str(i): c for i, c in zip(ids, caps)}))
    c = tmp_path / "c.json"
    c.write_text(json.dumps({"overall": {}, "imgToEval": {str(i): {"image_id": i, "caption": x} for i, x in zip(ids, caps)}}))
    for f in (a, b, c):
        assert load_generated_captions(f) == (ids, caps)
    d = tmp_path / "d.json"
    d.write_text(json.dumps([{"image_id": 1}]))
    with pytest.raises(EvaluationDataError, match="needs 'image_id' and 'caption'"):
        load_generated_captions(d)


def test_generic_chair_digits_and_errors() -> None:
    digits = {"3": ["three"], "7": ["seven"], "1": ["one"]}
    r = score_chair(["a three and a 7", "seven sevens", "nothing here"], [["3"], ["one"], []], digits)
    # mentions: [3, 7*], [7*, 7*], [] -> chair_i 3/4, chair_s 2/3; recall: {3} of {3} + {} of {1} = 1/2
    assert r.chair_i == pytest.approx(3 / 4) and r.chair_s == pytest.approx(2 / 3)
    assert r.recall == pytest.approx(1 / 2)
    assert r.length == pytest.approx((5 + 2 + 2) / 3)
    with pytest.raises(EvaluationDataError, match="not a category or synonym"):
        score_chair(["a three"], [["eight"]], digits)
    with pytest.raises(EvaluationDataError, match="different lengths"):
        score_chair(["a three"], [["3"], ["7"]], digits)
    with pytest.raises(EvaluationDataError, match="no captions"):
        score_chair([], [], digits)
    with pytest.raises(EvaluationDataError, match="is a string"):
        score_chair(["a three"], ["3"], digits)
    empty = score_chair(["nothing"], [[]], digits)
    assert empty.chair_i == 0.0 and empty.recall == 0.0 and len(empty.notes) == 2


_DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_DIGITS = {str(i): [w] for i, w in enumerate(_DIGIT_WORDS)}
_FILLER = ["a", "the", "and", "image", "shows", "big", "red"]


@st.composite
def _digit_corpus(draw):
    n = draw(st.integers(1, 8))
    caps, gts = [], []
    for _ in range(n):
        words = draw(st.lists(st.sampled_from(_DIGIT_WORDS + _FILLER), max_size=12))
        caps.append(" ".join(words))
        gts.append(sorted(draw(st.sets(st.sampled_from(list(_DIGITS)), max_size=5))))
    return caps, gts


@FAST
@given(_digit_corpus(), st.randoms(use_true_random=False))
def test_chair_explicit_formula_and_invariances(corpus, rnd) -> None:
    caps, gts = corpus
    r = score_chair(caps, gts, _DIGITS)
    # explicit formula, written out
    mentions = [[str(_DIGIT_WORDS.index(w)) for w in c.split() if w in _DIGIT_WORDS] for c in caps]
    hall = [[d for d in ms if d not in gt] for ms, gt in zip(mentions, gts)]
    total = sum(map(len, mentions))
    assert r.counts["n_mentions"] == total
    assert r.chair_i == pytest.approx(sum(map(len, hall)) / total if total else 0.0)
    assert r.chair_s == pytest.approx(sum(bool(h) for h in hall) / len(caps))
    n_gt = sum(map(len, gts))
    rec = sum(len(set(ms) & set(gt)) for ms, gt in zip(mentions, gts))
    assert r.recall == pytest.approx(rec / n_gt if n_gt else 0.0)
    assert r.length == pytest.approx(sum(len(c.split()) for c in caps) / len(caps))
    for k in ("chair_s", "chair_i", "recall"):
        assert 0.0 <= r.metrics[k] <= 1.0
    # permutation invariance
    order = list(range(len(caps)))
    rnd.shuffle(order)
    p = score_chair([caps[i] for i in order], [gts[i] for i in order], _DIGITS)
    for k in r.metrics:
        assert p.metrics[k] == pytest.approx(r.metrics[k])
    # duplicating the corpus changes no ratio
    d = score_chair(caps * 2, gts * 2, _DIGITS)
    for k in r.metrics:
        assert d.metrics[k] == pytest.approx(r.metrics[k])
    # more ground truth never adds hallucinations; all objects present -> no hallucination
    full = score_chair(caps, [list(_DIGITS)] * len(caps), _DIGITS)
    assert full.chair_s == 0.0 and full.chair_i == 0.0
    assert full.chair_s <= r.chair_s and full.chair_i <= r.chair_i


# ---------------------------------------------------------------------------------------------
# results and writers
# ---------------------------------------------------------------------------------------------

def test_write_json_and_csv(tmp_path: Path) -> None:
    q = load_pope_questions(FIX / "coco_pope_random.json")
    pope = score_pope(q, FIX / "pope_answers.jsonl", config={"model": "toy", "seed": 0, "path": tmp_path})
    chair = CocoChair.from_files(FIX / "instances_mini.json", FIX / "captions_mini.json", FIX / "synonyms_mini.txt")
    ch = chair.score_file(FIX / "generated_captions.json")
    pope.to_json(tmp_path / "one.json")
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["metrics"]["accuracy"] == pytest.approx(0.7)
    assert one["config"]["path"] == str(tmp_path)  # converted to a string
    assert result_from_dict(one).to_dict() == json.loads(json.dumps(pope.to_dict(), default=str))
    assert isinstance(result_from_dict(one), BinaryQAResult)
    write_json({"pope": pope, "chair": ch}, tmp_path / "sub" / "all.json", include_items=True)
    both = json.loads((tmp_path / "sub" / "all.json").read_text())
    assert set(both) == {"pope", "chair"} and len(both["chair"]["items"]) == 4
    write_json([pope, ch], tmp_path / "list.json")
    assert [x["benchmark"] for x in json.loads((tmp_path / "list.json").read_text())] == ["pope", "chair"]
    write_csv({"pope": pope, "chair": ch}, tmp_path / "all.csv")
    with (tmp_path / "all.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["name"] == "pope" and float(rows[0]["f1"]) == pytest.approx(pope.f1)
    assert rows[0]["parser"] == "llava_pope" and rows[0]["TP"] == "4"
    assert json.loads(rows[0]["config"])["model"] == "toy"
    assert float(rows[1]["chair_i"]) == pytest.approx(0.25) and rows[1]["f1"] == ""
    assert pope["f1"] == pope.f1
    with pytest.raises(KeyError, match="no metric"):
        pope["chair_s"]
