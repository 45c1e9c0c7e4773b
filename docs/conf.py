"""Sphinx configuration for lime_attr."""
import os
import sys

sys.path.insert(0, os.path.abspath("../src"))
sys.path.insert(0, os.path.abspath("."))

project = "lime_attr"
author = "lime_attr developers"
copyright = "2026, lime_attr developers"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options: dict = {}  # each directive names its members (an explicit list must win)
nitpicky = True
# Cross-references must resolve (CI builds with -W -n). Only types of *other* projects are ignored: there is no
# intersphinx (the docs build offline), so torch, numpy, transformers... have no targets here.
_EXTERNAL = r"(torch|numpy|np|collections|typing|types|pathlib|os|io|enum|dataclasses|abc|builtins|transformers|" \
            r"captum|zennit|PIL|matplotlib|tqdm|safetensors|accelerate|tokenizers|huggingface_hub|sklearn|argparse|wave)"
nitpick_ignore_regex = [
    (r"py:.*", _EXTERNAL + r"(\..*)?"),
    (r"py:.*", r"(Tensor|PathLike|Generator|Path|Module|Parameter|LogitsProcessor|PreTrainedModel|"
               r"PretrainedConfig|ProcessorMixin|PreTrainedTokenizerBase|BatchFeature|BatchEncoding|"
               r"GradientAttribution|Attribution|LayerGradientXActivation|Hook|TorchFunctionMode|ndarray|"
               r"Figure|Axes)"),
    (r"py:.*", r"'" + _EXTERNAL + r"\..*'"),   # a string annotation of an external type
    (r"py:class", r"TypeAliasForwardRef"),       # Sphinx's placeholder for an unresolvable external alias
]
# numpy-docstring vocabulary for types, mapped to the (external) types they mean
napoleon_preprocess_types = True
napoleon_attr_annotations = False  # types come from the docstrings; annotations show in signatures
napoleon_type_aliases = {
    "Tensor": "torch.Tensor", "tensor": "torch.Tensor", "nn.Module": "torch.nn.Module",
    "sequence": "collections.abc.Sequence", "mapping": "collections.abc.Mapping", "Mapping": "collections.abc.Mapping",
    "callable": "collections.abc.Callable", "iterable": "collections.abc.Iterable", "array": "numpy.ndarray",
    "numpy array": "numpy.ndarray", "np.ndarray": "numpy.ndarray", "PreTrainedModel": "transformers.PreTrainedModel",
    "PretrainedConfig": "transformers.PretrainedConfig", "ProcessorMixin": "transformers.ProcessorMixin",
}
suppress_warnings = ["autodoc.import_object"]
exclude_patterns = ["_build", "**/README.md"]
html_theme = "alabaster"
html_static_path = ["_static"]
templates_path = ["_templates"]  # autosummary's class page: the class and its documented members only

# Generated pages (tables built from the registries) are written before the build.
try:
    import gen_architectures  # noqa: F401  (writes architectures_table.rst when present)
except ImportError:
    pass


def _resolve_alias(app, env, node, contnode):
    """Resolve a reference to the one place its object is documented.

    ``lime_attr.LRP`` (a re-export), ``lime_attr.evaluation.binary.ConfusionCounts`` (the defining module of an
    object documented where it is re-exported) and short names (``register_rule``) all name one Python object:
    find the documented name that ends like the reference -- the full reference, then its last two parts, then
    its last part -- and that imports as the same object (or is the only candidate, for values such as
    strings and tuples, which cannot be told apart by identity).
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "").lstrip(".~")
    domain = env.get_domain("py")
    obj = _import_object(target, node.get("py:module"))
    ours = (getattr(obj, "__module__", None) or getattr(obj, "__name__", None) or "")
    if not (isinstance(ours, str) and ours.startswith("lime_attr")):
        obj = None  # not one of ours (a value, or e.g. the standard library's ``tokenize`` module)
    parts = target.split(".")
    for k in sorted({len(parts), min(2, len(parts)), 1}, reverse=True):
        suffix = ".".join(parts[-k:])
        names = [n for n in domain.objects if n.startswith("lime_attr") and (n == suffix or n.endswith("." + suffix))]
        if obj is not None:
            names = [n for n in names if _same(_import_object(n), obj)]
        if len(set(names)) == 1 and names[0] != target:
            found = domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], names[0], node, contnode)
            if found is None:
                anyref = domain.resolve_any_xref(env, node["refdoc"], app.builder, names[0], node, contnode)
                found = anyref[0][1] if anyref else None
            if found is not None:
                return found
    return None


def _same(a, b):
    try:
        return a is b or bool(a == b)
    except Exception:  # noqa: BLE001 - objects whose == is not a bool (tensors)
        return False


def _import_object(target, module=None):
    import importlib

    for full in ([f"{module}.{target}"] if module else []) + [target]:
        parts = full.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except Exception:  # noqa: BLE001 - not a module path
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                break
            return obj
    return None


#: pages being rewritten by another issue (the demo-models retraining): their unresolved references render as
#: plain text until that rewrite lands, instead of failing this build; every other page is nitpicky
_NITPICK_EXEMPT_PAGES: set[str] = set()  # none: every page resolves its references


def _resolve_or_exempt(app, env, node, contnode):
    found = _resolve_alias(app, env, node, contnode)
    if found is None and node.get("refdoc") in _NITPICK_EXEMPT_PAGES:
        return contnode
    return found


def setup(app):
    app.connect("missing-reference", _resolve_or_exempt)
