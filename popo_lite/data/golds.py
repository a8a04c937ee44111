"""Gold answers math-verify misreads, checked when a dataset loads.

The reward pays what math-verify finds equal to the gold. Some golds it reads as a plain number that
their text does not state, and then that number pays: Minerva's `\\hbar\\omega(v+1/2)-\\frac{E_0^2e^2}
{2m\\omega^2}` reads as 2, `\\frac13E_1+\\frac23E_2` as 2/3, a MATH matrix with `\\phantom -1` as -1,
`2007 + \\frac\\pi 2` as 2, OlympiadBench's `(-\\infty, 0) \\cup\\{1\\}$.` as 0.

The check: a gold that reads as a number must state a number (digits, fractions, roots, units, no
variable or constant). When it does not, the gold is tried rewritten as written, no meaning changed
(without `\\phantom`, a trailing `$` or period, or in `canonical` form); the first rewrite math-verify
reads right replaces it. A gold no rewrite fixes is ungradable: its problem is left out of training and
evaluation, and `load_problems` prints how many.
"""

from __future__ import annotations

import functools
import re

from popo_lite.core import answer_forms, verification

# Commands a gold that states a number may write; any other command or letter names a variable or a
# constant (\pi, E_1, \hbar), which no plain number equals.
_NUMERIC_COMMANDS_RE = re.compile(
    r"\\(?:[dtc]?frac|sqrt|times|cdot|div|circ|approx|pm|mp|ne|le|ge|%|\$)(?![a-zA-Z])"
)
_WORDS_RE = re.compile(r"\\(?:text|textrm|textbf|textit|textnormal|mathrm|mbox|hbox)\{[^{}]*\}")
_UNIT_RE = re.compile(r"(?<=[\d}])[a-zA-Z .]+$")  # `5 cm`, `6m`, `2s` after the number: a unit


def states_a_number(gold: str) -> bool:
    """True when the gold's text writes nothing but a number: digits, fractions, roots, units (`5\\text{
    cm}`, `864 \\mbox{ inches}^2`), degrees, base subscripts (`52_8`), ratios (`3:5`)."""
    text = _WORDS_RE.sub("", answer_forms.canonical(gold))
    text = _UNIT_RE.sub("", _NUMERIC_COMMANDS_RE.sub("", text))
    return not re.search(r"[a-zA-Z]", text)


@functools.lru_cache(maxsize=65_536)
def misread_as(gold: str) -> str | None:
    """The number math-verify reads this gold as when its text does not state a number, else None."""
    if states_a_number(gold):
        return None  # nothing to misread (and most golds never reach the slow parse)
    number = verification.read_gold(gold)
    return number or None


def _reads_right(gold: str) -> bool:
    """math-verify reads this gold as something: a number only where the text states one."""
    reading = verification.read_gold(gold)
    return reading is not None if states_a_number(gold) else reading == ""


@functools.lru_cache(maxsize=65_536)
def gold_reading(gold: str) -> str | None:
    """The gold as the reward should compare it: itself when math-verify reads it right, else the first
    rewrite of it that it reads right, else None (ungradable)."""
    if misread_as(gold) is None:
        return gold
    plain = re.sub(r"\\phantom\s*(?:\{[^{}]*\}|[^\s{}])", "", gold).strip().rstrip(".$ ").strip()
    for rewrite in dict.fromkeys((plain, answer_forms.canonical(plain))):
        if rewrite and rewrite != gold and _reads_right(rewrite):
            return rewrite
    return None
