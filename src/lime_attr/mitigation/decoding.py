"""Decoding methods as data: a name, a config dataclass and a ``generate`` function, behind one registry.

A decoding method is a :class:`DecodingMethod`: its ``name``, its ``config_type`` (a frozen, picklable
dataclass validated in ``__post_init__``) and ``generate(model, processor, inputs, config) ->``
:class:`GenerationResult`. greedy, sample, VCD and LIME are registered the same way, one module each
(:mod:`~lime_attr.mitigation.greedy`, :mod:`~lime_attr.mitigation.sampling`,
:mod:`~lime_attr.mitigation.vcd_method`, :mod:`~lime_attr.mitigation.lime_method`).
:func:`lime_attr.generation.generate`, the evaluation harness, ``lime-attr generate`` / ``eval`` and the
hallucination report read their choices from :func:`available_decoding_methods`, so that a new method
is one file plus one :func:`register_decoding_method` call.

.. code-block:: python

    from dataclasses import dataclass
    from lime_attr.mitigation import DecodingMethod, DecodingMethodConfig, GenerationResult, register_decoding_method

    @dataclass(frozen=True)
    class EchoConfig(DecodingMethodConfig):
        pass

    def echo(model, processor, inputs, config):   # repeats the prompt's first token
        first = inputs["input_ids"][:, :1].repeat(1, config.max_new_tokens)
        return GenerationResult(texts=["" for _ in first], tokens=first.tolist())

    register_decoding_method(DecodingMethod("echo", EchoConfig, echo, description="the first prompt token"))

A method whose set-up is costly per call can also give a ``session``: a factory of a context manager,
entered once for many inputs (:func:`decoding_session`; the evaluation harness runs each benchmark in
one). LIME's installs its LRP scope once (:class:`~lime_attr.mitigation.session.LimeSession`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from ..errors import UnknownNameError

__all__ = [
    "GenerationResult",
    "DecodingMethodConfig",
    "DecodingMethod",
    "UnknownDecodingMethodError",
    "register_decoding_method",
    "unregister_decoding_method",
    "get_decoding_method",
    "available_decoding_methods",
    "decode",
    "decoding_session",
    "config_to_dict",
]


@dataclass
class GenerationResult:
    """Answers of one batch: ``texts``, generated ``tokens`` (lists of ids), wall ``seconds``, and
    method-specific ``details`` (LIME: per-token modality shares before/after).

    A method's ``generate`` may leave ``seconds`` at 0: :func:`decode` (and
    :func:`lime_attr.generation.generate`) set it to the wall-clock time of the call.
    """

    texts: list
    tokens: list
    seconds: float = 0.0
    details: dict = field(default_factory=dict)


def _jsonable(value: Any) -> Any:
    """``value`` with NaN / infinite floats as ``None`` and tuples / mappings as lists / dicts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def config_to_dict(config: Any) -> dict:
    """The strict-JSON form of a method's config dataclass (NaN and infinities become ``None``).

    Parameters
    ----------
    config
        An instance of a :class:`DecodingMethod`'s ``config_type``.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config_to_dict expects a dataclass instance, got {type(config).__name__}")
    return {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}


@dataclass(frozen=True)
class DecodingMethodConfig:
    """A convenient base of method configs: ``max_new_tokens`` (>= 1) and :meth:`to_dict`.

    Subclasses are frozen dataclasses too; they extend ``__post_init__`` (calling ``super()``) to check
    their own fields.

    Parameters
    ----------
    max_new_tokens : int
        How many tokens to generate at most.
    """

    max_new_tokens: int = 8

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {n!r}")

    def to_dict(self) -> dict:
        """The strict-JSON form (:func:`config_to_dict`)."""
        return config_to_dict(self)


#: ``generate(model, processor, inputs, config) -> GenerationResult``
GenerateFn = Callable[[nn.Module, Any, Mapping[str, Any], Any], GenerationResult]


@dataclass(frozen=True)
class DecodingMethod:
    """A registered decoding method.

    Parameters
    ----------
    name : str
        The registered name (``--method`` of the CLI, ``DecodingConfig.method``).
    config_type : type
        A frozen dataclass whose fields all have defaults, validated in ``__post_init__``.
    generate : callable
        ``generate(model, processor, inputs, config) -> GenerationResult`` for a left-padded batch of
        processor outputs.
    description : str
        One line for ``--help`` and the docs.
    from_options : callable, optional
        ``options -> config``: builds the config from the flat options of
        :class:`lime_attr.generation.DecodingConfig` (``max_new_tokens``, ``temperature``, ``top_k``,
        ``top_p``, ``do_sample``, ``seed``, ``vcd_*``, ``lime_*``). Default: the options named like a field
        of ``config_type``.
    session : callable, optional
        ``session(model, processor, config)`` -> a context manager whose ``__enter__`` returns
        ``run(inputs) -> GenerationResult``, the same answers as ``generate`` with its set-up done once
        for all the inputs of the block (:func:`decoding_session`). Default: none (every call is
        ``generate``).
    """

    name: str
    config_type: type
    generate: GenerateFn
    description: str = ""
    from_options: Optional[Callable[[Mapping[str, Any]], Any]] = None
    session: Optional[Callable[[nn.Module, Any, Any], Any]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name.startswith("-"):
            raise ValueError(f"a decoding method name must be a non-empty str not starting with '-', got "
                             f"{self.name!r}")
        ct = self.config_type
        if not (isinstance(ct, type) and dataclasses.is_dataclass(ct) and ct.__dataclass_params__.frozen):
            raise TypeError(f"decoding method {self.name!r}: config_type must be a frozen dataclass, got {ct!r}")
        if not callable(self.generate):
            raise TypeError(f"decoding method {self.name!r}: generate must be callable, got {self.generate!r}")
        if self.session is not None and not callable(self.session):
            raise TypeError(f"decoding method {self.name!r}: session must be callable as session(model, processor, "
                            f"config) -> context manager, got {self.session!r}")

    def make_config(self, options: Optional[Mapping[str, Any]] = None, **overrides: Any) -> Any:
        """The method's config from flat decoding options (see ``from_options``) and ``overrides``."""
        opts = {**dict(options or {}), **overrides}
        if self.from_options is not None:
            return self.from_options(opts)
        names = {f.name for f in dataclasses.fields(self.config_type)}
        return self.config_type(**{k: v for k, v in opts.items() if k in names})

    def check_config(self, config: Any) -> Any:
        """``config`` if it is a ``config_type`` instance (``None``: the defaults), else ``TypeError``."""
        if config is None:
            return self.config_type()
        if not isinstance(config, self.config_type):
            raise TypeError(f"decoding method {self.name!r} takes a {self.config_type.__name__}, got "
                            f"{type(config).__name__}")
        return config


class UnknownDecodingMethodError(UnknownNameError, ValueError):
    """A decoding method name that is not registered; the message lists the registered ones.

    Also a ``ValueError``, which :class:`lime_attr.generation.DecodingConfig` raised for an unknown
    method before the registry existed.
    """


_REGISTRY: dict[str, DecodingMethod] = {}


def register_decoding_method(method: DecodingMethod, *, overwrite: bool = False) -> DecodingMethod:
    """Register ``method`` under its name, for :func:`get_decoding_method`, the harness and the CLI.

    Parameters
    ----------
    method
        The method to register.
    overwrite
        Replace an existing method of the same name instead of raising ``ValueError``.

    Returns
    -------
    DecodingMethod
        ``method`` (so that the call can be used as an expression).
    """
    if not isinstance(method, DecodingMethod):
        raise TypeError(f"register_decoding_method expects a DecodingMethod, got {type(method).__name__}")
    if method.name in _REGISTRY and not overwrite and _REGISTRY[method.name] is not method:
        raise ValueError(f"a decoding method named {method.name!r} is already registered; pass overwrite=True")
    _REGISTRY[method.name] = method
    return method


def unregister_decoding_method(name: str) -> None:
    """Remove a registered decoding method (a no-op for an unknown name); for tests and notebooks."""
    _REGISTRY.pop(name, None)


def available_decoding_methods() -> list[str]:
    """Names of the registered decoding methods, in registration order."""
    return list(_REGISTRY)


def get_decoding_method(name: str) -> DecodingMethod:
    """The registered decoding method ``name``.

    Raises
    ------
    UnknownDecodingMethodError
        (an :class:`~lime_attr.errors.UnknownNameError` and a ``ValueError``) for an unregistered name;
        the message lists the registered ones.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownDecodingMethodError(
            f"unknown decoding method {name!r}; choose one of {', '.join(available_decoding_methods())}. "
            "Register your own with lime_attr.mitigation.register_decoding_method()."
        ) from None


def decode(model: nn.Module, processor: Any, inputs: Mapping[str, Any], method: str,
           config: Any = None) -> GenerationResult:
    """Generate with the registered decoding ``method``; the registry's entry point.

    Parameters
    ----------
    model, processor
        The model and its processor (or tokenizer).
    inputs : Mapping
        Processor outputs of a left-padded batch (:func:`lime_attr.generation.prepare_inputs`).
    method : str
        A name of :func:`available_decoding_methods`.
    config : optional
        An instance of the method's ``config_type``; default: its defaults.

    Returns
    -------
    GenerationResult
        With ``seconds`` the wall-clock time of the method's ``generate``.
    """
    spec = get_decoding_method(method)
    config = spec.check_config(config)
    return _timed(spec, lambda: spec.generate(model, processor, inputs, config))


def _timed(spec: DecodingMethod, generate: Callable[[], Any]) -> GenerationResult:
    """``generate()``'s result, checked to be a :class:`GenerationResult`, with ``seconds`` its wall-clock time."""
    start = time.perf_counter()
    result = generate()
    if not isinstance(result, GenerationResult):
        raise TypeError(f"decoding method {spec.name!r} returned {type(result).__name__}, not a GenerationResult")
    result.seconds = time.perf_counter() - start
    return result


@contextlib.contextmanager
def decoding_session(model: nn.Module, processor: Any, method: str,
                     config: Any = None) -> Iterator[Callable[[Mapping[str, Any]], GenerationResult]]:
    """Many generations with one registered decoding ``method``, its set-up done once.

    Parameters
    ----------
    model, processor, method, config
        As for :func:`decode`.

    Yields
    ------
    callable
        ``run(inputs) -> GenerationResult`` (``seconds``: that call's wall-clock time): the method's
        ``session`` where it has one, else :func:`decode` per call.
    """
    spec = get_decoding_method(method)
    config = spec.check_config(config)
    with contextlib.ExitStack() as stack:
        generate = (stack.enter_context(spec.session(model, processor, config)) if spec.session is not None
                    else lambda inputs: spec.generate(model, processor, inputs, config))

        def run(inputs: Mapping[str, Any]) -> GenerationResult:
            return _timed(spec, lambda: generate(inputs))

        yield run
