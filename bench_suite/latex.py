"""LaTeX tables a paper includes as they are: booktabs rules, an escaped caption without a "Table N:" of its
own (LaTeX numbers tables itself), a label, numbers right-aligned. Needs ``\\usepackage{booktabs}``."""
from __future__ import annotations

import re

import pandas as pd

__all__ = ["latex_escape", "latex_table"]

_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
             "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}
_UNICODE = {"Δ": r"$\Delta$", "–": "--", "—": "---", "±": r"$\pm$", "≤": r"$\le$", "≥": r"$\ge$", "×": r"$\times$"}


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped and a few Unicode symbols spelled in LaTeX."""
    out = "".join(_SPECIALS.get(c, c) for c in str(text))
    for uni, tex in _UNICODE.items():
        out = out.replace(uni, tex)
    return out


def latex_table(display: pd.DataFrame, caption: str, label: str, left: int = 1) -> str:
    """A ``table`` environment with a booktabs ``tabular`` of ``display`` (its cells already formatted as
    text), ``caption`` (a leading ``"Table N:"`` or ``"Table:"`` is dropped) and ``label``.

    Args:
        display: the rows to print, cells as strings; its column names are the headers.
        caption: the caption text (escaped here).
        label: the ``\\label`` (e.g. ``tab:pareto-mini``).
        left: how many leading columns are left-aligned (the others, numbers, right-aligned).
    """
    caption = re.sub(r"^\s*Table(\s+\d+)?\s*:\s*", "", str(caption))
    align = "l" * left + "r" * (len(display.columns) - left)
    head = " & ".join(latex_escape(c) for c in display.columns) + r" \\"
    body = [" & ".join(latex_escape(v) for v in row) + r" \\" for row in display.astype(str).itertuples(index=False)]
    return "\n".join([r"\begin{table}[t]", r"\centering", r"\small", f"\\caption{{{latex_escape(caption)}}}",
                      f"\\label{{{label}}}", f"\\begin{{tabular}}{{{align}}}", r"\toprule", head, r"\midrule", *body,
                      r"\bottomrule", r"\end{tabular}", r"\end{table}", ""])
