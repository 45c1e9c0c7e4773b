"""The ``lime-attr`` command: demo, explain, generate, eval.

Every command writes JSON (and CSV for tables), draws matplotlib figures into ``--output-dir``, shows
progress bars on long work, and exits with status 2 and a one-line message on bad input.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["main", "build_parser"]

log = logging.getLogger("lime_attr.cli")

BUILTIN_HELP = "builtin:digits-llava | builtin:tones-qwen2audio | a local checkpoint folder | a hub id"


class CLIError(Exception):
    """Bad input: reported as one line, exit status 2."""


# --------------------------------------------------------------------------------------------- helpers


def _load(spec: str, dtype: Optional[str] = None, device_map: Optional[str] = "replica", gpus_per_rank: int = 1,
          max_memory_per_gpu: Optional[str] = None):
    """Load ``spec`` with the placement of :func:`lime_attr.evaluation.sharding.from_pretrained_kwargs`.

    ``replica``: one copy per process on ``cuda:<LOCAL_RANK>`` (CPU without CUDA); ``auto``: accelerate
    spreads a model too large for one GPU over this process's GPUs; ``cpu``: CPU.
    """
    from .evaluation.sharding import from_pretrained_kwargs
    from .models import load_model

    try:
        kwargs = from_pretrained_kwargs(device_map, gpus_per_rank=gpus_per_rank,
                                        max_memory_per_gpu=max_memory_per_gpu)
        if _builtin_name(spec) is not None:  # a few hundred kB: one device, never split
            dm = kwargs.get("device_map")
            device = f"cuda:{dm['']}" if isinstance(dm, dict) and isinstance(dm.get(""), int) else (
                "cpu" if dm == "cpu" else None)
            return load_model(spec, dtype=dtype, device=device)
        return load_model(spec, dtype=dtype, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported to the user with the cause
        raise CLIError(f"cannot load model {spec!r}: {exc}") from exc


def _load_args(args: argparse.Namespace):
    return _load(args.model, args.dtype, device_map=args.device_map, gpus_per_rank=args.gpus_per_rank,
                 max_memory_per_gpu=args.max_memory_per_gpu)


def _builtin_name(spec: str) -> Optional[str]:
    return spec.split(":", 1)[1] if spec.startswith("builtin:") else None


def _media_for(args: argparse.Namespace, processor: Any) -> dict:
    from .generation import load_audio, load_image

    if args.image and args.audio:
        raise CLIError("give either --image or --audio, not both")
    if args.image:
        if not Path(args.image).is_file():
            raise CLIError(f"--image {args.image}: no such file")
        try:
            return {"images": [load_image(args.image)]}
        except Exception as exc:  # noqa: BLE001 - PIL raises several types for unreadable files
            raise CLIError(f"--image {args.image}: not an image file that can be read (PNG/JPEG): {exc}") from exc
    if args.audio:
        if not Path(args.audio).is_file():
            raise CLIError(f"--audio {args.audio}: no such file")
        fe = getattr(processor, "feature_extractor", None)
        sr = int(getattr(fe, "sampling_rate", 16000))
        try:
            return {"audios": [load_audio(args.audio, sr)], "sampling_rate": sr}
        except Exception as exc:  # noqa: BLE001 - wave raises wave.Error, EOFError, ValueError
            raise CLIError(f"--audio {args.audio}: not a PCM WAV file that can be read: {exc}") from exc
    raise CLIError("this command needs --image PATH or --audio PATH (a WAV file)")


def _prompt_text(spec: str, processor: Any, question: str, media: dict) -> str:
    name = _builtin_name(spec)
    if name is not None:
        from .models import format_prompt

        return format_prompt(name, question)
    kind = "image" if "images" in media else "audio"
    messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    raise CLIError("the processor has no chat template: pass a prompt that already contains the model's "
                   "image/audio placeholder token with --raw-prompt")


def _check_media_kind(model: Any, processor: Any, media: dict) -> str:
    """The model must take the kind of media given (``--image`` for image models, ``--audio`` for audio ones)."""
    from .modality import modality_spec

    kind = "image" if "images" in media else "audio"
    try:
        kinds = modality_spec(model, processor).kinds
    except ValueError as exc:
        raise CLIError(f"the model is not an image/audio-text model: {exc}") from exc
    if kind not in kinds:
        other = "--image" if "image" in kinds else "--audio"
        raise CLIError(f"--{kind} given, but the model ({model.config.model_type}) takes {', '.join(kinds)} input: "
                       f"use {other} PATH")
    return kind


def _inputs(model: Any, processor: Any, args: argparse.Namespace) -> dict:
    from .generation import prepare_inputs

    media = _media_for(args, processor)
    kind = _check_media_kind(model, processor, media)
    if getattr(args, "raw_prompt", False):
        prompt = args.prompt
        token = getattr(processor, f"{kind}_token", None) or getattr(getattr(processor, "tokenizer", None),
                                                                    f"{kind}_token", None)
        if token and token not in prompt:
            raise CLIError(f"--raw-prompt: the prompt must contain the model's {kind} placeholder {token!r} where the "
                           f"{kind} goes (or drop --raw-prompt to use the chat template)")
    else:
        prompt = _prompt_text(args.model, processor, args.prompt, media)
    try:
        return prepare_inputs(model, processor, [prompt], images=media.get("images"), audios=media.get("audios"),
                              sampling_rate=media.get("sampling_rate"))
    except (ValueError, TypeError) as exc:
        raise CLIError(f"the processor rejected the prompt and {kind}: {exc}") from exc


def _write_json(path: Path, data: Any) -> None:
    """Strict JSON (NaN / inf become null: every JSON lime_attr writes parses with a strict parser)."""
    from .evaluation import jsonable

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")


def _output_dir(path: str, flag: str = "--output-dir") -> Path:
    """Create ``path`` (a folder the command writes into); a clear error when it cannot be written."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".lime_attr_write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CLIError(f"{flag} {path}: cannot write there ({exc.strerror or exc}); choose a writable folder") from exc
    return out


def _check_positive(value: Optional[int], flag: str) -> None:
    if value is not None and value < 1:
        raise CLIError(f"{flag} must be a positive integer, got {value}")


def _lime_options(args: argparse.Namespace, method: str) -> tuple[dict, dict]:
    """``(lime_overrides, method_options)`` from the ``--lime-*`` flags (clear errors for misuse)."""
    overrides: dict = {}
    for item in args.lime_set:
        field_name, sep, raw = item.partition("=")
        if not sep or not field_name.strip():
            raise CLIError(f"--lime-set {item!r}: expected FIELD=VALUE, e.g. --lime-set lr=3e-3")
        try:
            overrides[field_name.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[field_name.strip()] = raw
    if args.lime_objective is not None:
        overrides["objective"] = args.lime_objective
    used = [flag for flag, on in (("--lime-set", args.lime_set), ("--lime-objective", args.lime_objective),
                                  ("--lime-recommended", args.lime_recommended)) if on]
    if used and method != "lime":
        raise CLIError(f"{', '.join(used)} apply to --method lime only (this run uses --method {method})")
    if overrides:
        from .mitigation import LimeConfig

        try:  # the values are checked now, before a model loads
            LimeConfig(**{"mode": args.lime_mode, **overrides}).validate()
        except (ValueError, TypeError) as exc:
            raise CLIError(f"--lime-set / --lime-objective: {exc}") from exc
    return overrides, ({"recommended": True} if args.lime_recommended else {})


def _decoding(args: argparse.Namespace, method: Optional[str] = None):
    from .generation import DecodingConfig

    method = method or args.method
    overrides, options = _lime_options(args, method)
    try:
        return DecodingConfig(method=method, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              seed=args.seed, lime_mode=args.lime_mode, lime_overrides=overrides,
                              method_options=options)
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from exc


# -------------------------------------------------------------------------------------------- commands


def _check_media_paths(args: argparse.Namespace) -> None:
    for flag in ("image", "audio"):
        path = getattr(args, flag, None)
        if path and not Path(path).is_file():
            raise CLIError(f"--{flag} {path}: no such file")
    if not getattr(args, "image", None) and not getattr(args, "audio", None):
        raise CLIError("this command needs --image PATH or --audio PATH (a WAV file)")


def cmd_explain(args: argparse.Namespace) -> int:
    from . import ModalityAttribution, modality_reliance, top_tokens
    from .metrics import breakdown
    from .visualize import audio_plot, image_overlay, text_html

    from .composites import get_composite

    _check_media_paths(args)
    _check_positive(args.top, "--top")
    try:
        get_composite(args.composite)
    except KeyError as exc:
        raise CLIError(str(exc)) from exc
    out = _output_dir(args.output_dir)
    model, processor = _load_args(args)
    enc = _inputs(model, processor, args)
    tok = getattr(processor, "tokenizer", processor)
    target = None
    if args.target is not None:
        ids = tok.convert_tokens_to_ids(args.target) if not args.target.isdigit() else int(args.target)
        if ids is None or ids == getattr(tok, "unk_token_id", None):
            raise CLIError(f"--target {args.target!r} is not a token of this model's vocabulary")
        target = int(ids)
    attribution = ModalityAttribution(model, processor, composite=args.composite)
    try:
        result = attribution.attribute(enc, target=target)
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from exc
    token = tok.convert_ids_to_tokens(int(result.target_ids.reshape(-1)[0]))
    print(f"explained token: {token!r}")
    print(breakdown(result))
    print(top_tokens(result, k=args.top, tokenizer=tok))
    summary = {"model": args.model, "prompt": args.prompt, "composite": args.composite, "token": token,
               "modality_reliance": float(modality_reliance(result).reshape(-1)[0]),
               "modality_reliance_signed": float(modality_reliance(result, signed=True).reshape(-1)[0]),
               "shares": {k: float(v.reshape(-1)[0]) for k, v in result.shares.items()},
               "shares_abs": {k: float(v.reshape(-1)[0]) for k, v in result.shares_abs.items()},
               "token_relevance": result.token_relevance[0].tolist()}
    figures = []
    for i, hm in enumerate(result.heatmaps[0] if result.heatmaps else []):
        path = out / f"heatmap_{i}.png"
        (image_overlay if hm.kind in ("image", "video") else audio_plot)(hm, path=path)
        figures.append(str(path))
    text_html(result, tokenizer=tok, path=out / "tokens.html")
    summary["figures"] = figures
    _write_json(out / "explain.json", summary)
    print(f"wrote {out / 'explain.json'}, {out / 'tokens.html'}" + (f", {', '.join(figures)}" if figures else ""))
    return 0


def _token_shares(model: Any, processor: Any, enc: dict, tokens: list) -> list:
    """Perceptual share of |relevance| of each generated token (one AttnLRP backward per token)."""
    from . import ModalityAttribution
    from .modality import PERCEPTUAL, modality_share, span_mask

    if not tokens:
        return []
    res = ModalityAttribution(model, processor).attribute(enc, target=[tokens], mode="per_token")
    rel = res.per_token_relevance[0].detach().double()  # [n, seq]: one row per generated token
    mask = span_mask([sp for kind in PERCEPTUAL for sp in res.spans[0].get(kind, ())], rel.shape[-1])
    return [float(v) for v in modality_share(rel, mask.double(), 1.0)]


def generation_figure(labels: list, before: list, after: Optional[list], title: str) -> Any:
    """Bar chart of the perceptual share per generated token (LIME: before and after).

    Tokens LIME's confidence gate left alone are unmeasured (NaN / None): they get a grey hatched bar
    over the full height with its own legend entry, so that no bar is blank without explanation.
    """
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def values(vals: list) -> list:
        return [float("nan") if v is None else float(v) for v in vals]

    before = values(before)
    after = values(after) if after is not None else None
    n = len(labels)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * n + 2), 3.2))
    xs = list(range(n))
    width = 0.4 if after is not None else 0.7
    ax.bar([x - (width / 2 if after is not None else 0) for x in xs], before, width,
           label="before LIME" if after is not None else "perceptual share")
    if after is not None:
        ax.bar([x + width / 2 for x in xs], after, width, label="after LIME")
    gated = [x for x in xs if math.isnan(before[x])]
    if gated:
        ax.bar(gated, [1.0] * len(gated), 0.8, color="0.85", hatch="//", edgecolor="0.6", zorder=0,
               label="gated (confident, not optimised: no share measured)")
    ax.set_xticks(xs, [repr(t)[1:-1] or "''" for t in labels], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("image/audio share of |R|")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _plot_generation(path: Path, labels: list, before: list, after: Optional[list], title: str) -> None:
    """Write :func:`generation_figure` to ``path``."""
    import matplotlib.pyplot as plt

    fig = generation_figure(labels, before, after, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_eval(path: Path, results: list) -> None:
    """Grouped bars of the headline metrics per split (POPE / audio-QA) or of the CHAIR metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dicts = [r.to_dict() for r in results]
    keys = [k for k in ("accuracy", "precision", "recall", "f1", "yes_ratio", "chair_s", "chair_i")
            if k in dicts[0].get("metrics", {})]
    fig, ax = plt.subplots(figsize=(1.2 * len(keys) + 2.5, 3.2))
    width = 0.8 / len(dicts)
    for i, d in enumerate(dicts):
        label = d.get("split") or d.get("config", {}).get("split") or d.get("benchmark", "")
        vals = [float(d["metrics"][k]) for k in keys]
        ax.bar([j + (i - (len(dicts) - 1) / 2) * width for j in range(len(keys))], vals, width, label=str(label))
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylim(0, 1)
    cfg = dicts[0].get("config", {})
    ax.set_title(f"{cfg.get('benchmark', '')} - {cfg.get('model', '')} - {cfg.get('decoding', {}).get('method', '')}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_generate(args: argparse.Namespace) -> int:
    from .generation import generate

    _check_media_paths(args)
    cfg = _decoding(args)
    model, processor = _load_args(args)
    enc = _inputs(model, processor, args)
    res = generate(model, processor, enc, cfg)
    print(res.texts[0])
    record = {"model": args.model, "prompt": args.prompt, "decoding": cfg.to_dict(), "text": res.texts[0],
              "tokens": res.tokens[0], "seconds": res.seconds, "details": res.details}
    if args.output:
        tok = getattr(processor, "tokenizer", processor)
        labels = [tok.decode([t]) for t in res.tokens[0]]
        if "share_before" in res.details:
            before, after = res.details["share_before"][0], res.details["share_after"][0]
        else:
            before, after = _token_shares(model, processor, enc, list(res.tokens[0])), None
        # LIME leaves gated tokens unmeasured (NaN): null in the (strict) JSON, a hatched "gated" bar in the figure
        record["token_shares"] = {"tokens": labels, "before": list(before), "after": None if after is None else
                                  list(after)}
        _write_json(Path(args.output), record)
        figure = Path(args.output).with_suffix(".png")
        _plot_generation(figure, labels, before, after, f"{args.model} - {cfg.method}: {res.texts[0][:60]!r}")
        print(f"wrote {args.output} and {figure}", file=sys.stderr)  # stdout: the answer only
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation.harness import check_benchmark_args, check_corruption, run_benchmark

    decoding = _decoding(args)
    try:
        check_benchmark_args(args.model, args.limit, vars(args))
        check_corruption(args.corruption, args.model)  # cheap checks before the model loads
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    model, processor = _load_args(args)
    try:
        results = run_benchmark(args.benchmark, args.model, decoding, split=args.split, limit=args.limit,
                                files=vars(args), dtype=args.dtype, progress=not args.no_progress,
                                model=model, processor=processor,
                                corruption=args.corruption, parser=args.parser)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise CLIError(str(exc)) from exc
    from .evaluation import write_csv, write_json
    from .evaluation.sharding import current_dist

    if not current_dist().is_main:  # under torchrun every rank holds the merged result; rank 0 reports it
        return 0
    for r in results:
        print(_format_metrics(r))
    if args.output:
        write_json(results if len(results) > 1 else results[0], args.output)
        write_csv(results, str(Path(args.output).with_suffix(".csv")))
        _plot_eval(Path(args.output).with_suffix(".png"), results)
        print(f"wrote {args.output}, {Path(args.output).with_suffix('.csv')} and "
              f"{Path(args.output).with_suffix('.png')}")
    return 0


def _format_metrics(result: Any) -> str:
    d = result.to_dict()
    metrics = d.get("metrics", d)
    keys = [k for k in ("accuracy", "precision", "recall", "f1", "yes_ratio", "chair_s", "chair_i", "length")
            if k in metrics]
    split = d.get("split") or d.get("config", {}).get("split", "")
    return f"{d.get('benchmark', '')} {split}: " + ", ".join(f"{k}={metrics[k]:.4f}" for k in keys)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(_output_dir(args.output_dir), quick=args.quick)


# ---------------------------------------------------------------------------------------------- parser


def _add_model_args(p: argparse.ArgumentParser, media: bool = True) -> None:
    p.add_argument("--model", required=True, help=BUILTIN_HELP)
    p.add_argument("--dtype", default=None, help="float32 (default for builtin models), bfloat16, float16")
    p.add_argument("--device-map", default="replica", choices=["replica", "auto", "cpu"],
                   help="replica (default): one copy per process on cuda:<LOCAL_RANK>, CPU without CUDA; auto: "
                        "accelerate splits a model too large for one GPU over this process's GPUs; cpu")
    p.add_argument("--gpus-per-rank", type=int, default=1,
                   help="with --device-map auto under torchrun: GPUs per process (launch GPUs / this processes)")
    p.add_argument("--max-memory-per-gpu", default=None, help="with --device-map auto: cap per GPU, e.g. 70GiB")
    if media:
        p.add_argument("--image", help="image file (PNG/JPEG)")
        p.add_argument("--audio", help="audio file (PCM WAV; resampled to the processor's rate)")
        p.add_argument("--prompt", required=True, help="the question")
        p.add_argument("--raw-prompt", action="store_true",
                       help="use --prompt verbatim (it must contain the image/audio placeholder)")


def _add_decoding_args(p: argparse.ArgumentParser, method_required: bool = False) -> None:
    from .mitigation import available_decoding_methods, get_decoding_method
    from .mitigation.lime_method import LIME_MODES
    from .mitigation.objectives import available_objectives

    names = available_decoding_methods()  # the registry: a registered method is a choice here
    described = [f"{n}: {get_decoding_method(n).description}" for n in names if get_decoding_method(n).description]
    p.add_argument("--method", default="greedy", choices=names,
                   help="; ".join(["decoding method (default greedy)", *described]).replace("%", "%%"))
    p.add_argument("--lime-mode", default="fast", choices=list(LIME_MODES))
    p.add_argument("--lime-objective", default=None, choices=list(available_objectives()),
                   help="with --method lime: the relevance objective (default: the paper's; docs: lime_objectives)")
    p.add_argument("--lime-recommended", action="store_true",
                   help="with --method lime: start from LimeConfig.recommended(model) instead of the paper's preset "
                        "(docs: lime_evaluation)")
    p.add_argument("--lime-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="with --method lime: set a LimeConfig field, e.g. --lime-set lr=3e-3 --lime-set "
                        "second_order=exact (VALUE is read as JSON, else as a string); repeatable")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``lime-attr``."""
    parser = argparse.ArgumentParser(prog="lime-attr", description="LRP attribution and LIME decoding for multimodal LLMs: demo, explain, generate, eval.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"lime-attr {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the embedded demo: explain, heatmaps, LIME vs greedy, mini-POPE table")
    p.add_argument("--output-dir", default="lime_attr_demo", help="where PNG/JSON/CSV go (default ./lime_attr_demo)")
    p.add_argument("--quick", action="store_true", help="fewer questions (for smoke tests)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("explain", help="explain the next token of a multimodal prompt (modality shares, heatmap)")
    _add_model_args(p)
    p.add_argument("--target", default=None, help="token (or id) to explain; default: the greedy next token")
    p.add_argument("--composite", default="attnlrp")
    p.add_argument("--top", type=int, default=10, help="how many top tokens to print")
    p.add_argument("--output-dir", default="lime_attr_explain")
    p.set_defaults(func=cmd_explain)

    from .mitigation import available_decoding_methods

    p = sub.add_parser("generate", help="answer a multimodal prompt with a registered decoding method: "
                       + " / ".join(available_decoding_methods()))
    _add_model_args(p)
    _add_decoding_args(p)
    p.add_argument("--output", default=None, help="JSON file for the answer and its configuration")
    p.set_defaults(func=cmd_generate)

    _add_eval_parser(sub)
    return parser


def _add_eval_parser(sub: Any) -> None:
    """The ``eval`` subcommand; its benchmarks and splits come from the benchmark registry."""
    from .evaluation import available_benchmarks, get_benchmark

    names = available_benchmarks()
    benches = [get_benchmark(n) for n in names]
    p = sub.add_parser("eval", help="score a registered benchmark: " + ", ".join(names)
                       + " (embedded mini benchmarks or your files)")
    p.add_argument("benchmark", choices=names,
                   help="; ".join(f"{b.name}: {b.description}" for b in benches if b.description) or None)
    _add_model_args(p, media=False)
    _add_decoding_args(p)
    splits = {sp: None for b in benches for sp in b.splits}
    with_splits = [b.name for b in benches if b.splits]
    p.add_argument("--split", default="all",
                   help=" | ".join([*splits, "all"]) + (f" ({' / '.join(with_splits)})" if with_splits else ""))
    p.add_argument("--limit", type=int, default=None, help="at most N questions per split")
    p.add_argument("--output", default=None, help="JSON report (a CSV is written beside it)")
    p.add_argument("--questions", default=None, help="POPE question file / audio-QA file (real benchmarks)")
    p.add_argument("--image-dir", default=None, help="folder of the images named in the POPE/CHAIR files")
    p.add_argument("--audio-dir", default=None, help="folder of the audio files named in the audio-QA file")
    p.add_argument("--annotations", default=None, help="CHAIR: COCO instances_*.json")
    p.add_argument("--captions", default=None, help="CHAIR: COCO captions_*.json")
    p.add_argument("--synonyms", default=None, help="CHAIR: synonyms file")
    p.add_argument("--corruption", default=None, metavar="SPEC",
                   help="builtin models only: degrade the held-out images / clips, e.g. noise:0.35, blur:1, "
                        "contrast:0.5, occlude:0.3 (images), snr:18, attenuate:10, dropout:0.3 (audio); join steps "
                        "with '+', add seed:K for another draw; 'degraded' = the model's default degraded condition "
                        "(lime_attr.models.DEFAULT_CORRUPTION); default: clean")
    p.add_argument("--parser", default=None,
                   help="yes/no answer parser: llava_pope, strict, kuan2024 or one you registered (default: "
                        "llava_pope for POPE files, kuan2024 for audio-QA files, strict for the builtin models)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``lime-attr``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"lime-attr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that cannot be read or written (read-only folder, full disk...)
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"lime-attr {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
