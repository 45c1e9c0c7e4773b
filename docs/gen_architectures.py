"""Write ``docs/generated/architectures_table.rst``: the supported architectures, from the canonizer registry.

Run by ``docs/conf.py`` at import (``import gen_architectures``) or by hand: ``python docs/gen_architectures.py``.
The table is generated, so adding a canonizer file (and its import) is all it takes to list a family.
"""
from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "/")


def _first_sentence(doc: str) -> str:
    doc = " ".join((doc or "").split())
    return doc.split(". ")[0].rstrip(".") if doc else ""


def architectures_rows() -> list[tuple[str, ...]]:
    """One row per registered ``model_type``: type, canonizer, attention, MLP / experts, notes."""
    from lime_attr.canonizers import base, get_canonizer

    rows = []
    for model_type in base.available_canonizers():
        canon = get_canonizer(model_type)
        cls = type(canon)
        attention = ", ".join(f"``{a}``" for a in getattr(canon, "attention", ())) or "--"
        mlp = [f"``{k}`` (gated)" for k in getattr(canon, "gated_mlps", {})]
        mlp += [f"``{k}`` (op mode)" for k in getattr(canon, "op_modules", ())]
        comps = ", ".join(getattr(canon, "components", ()))
        module_doc = _first_sentence(inspect.getmodule(cls).__doc__ or cls.__doc__ or "")
        notes = module_doc + (f" (components: {comps})" if comps else "")
        rows.append((f"``{model_type}``", f":class:`{cls.__module__}.{cls.__name__}`", attention,
                     ", ".join(mlp) or "--", notes))
    return rows


def architectures_table() -> str:
    """The reST ``list-table`` of :func:`architectures_rows`."""
    head = ("model_type", "canonizer", "attention modules", "MLP / experts", "notes")
    lines = [".. list-table::", "   :header-rows: 1", "   :widths: 12 22 22 22 40", ""]
    for row in (head, *architectures_rows()):
        lines.append("   * - " + _cell(row[0]))
        lines.extend("     - " + _cell(c) for c in row[1:])
    return "\n".join(lines) + "\n"


def write(path: os.PathLike = HERE / "generated" / "architectures_table.rst") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(architectures_table())
    return path


write()

if __name__ == "__main__":
    print(write())
