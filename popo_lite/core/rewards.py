"""Binary math reward: 1.0 when the model's FINAL answer equals the gold answer, per math-verify.

Why this module is more than `verify(parse(gold), parse(completion))`:

1. Reward hacking (measured, docs/measurements.md section 3.3). math-verify's default extraction scans the
   whole text, so a completion that merely restates the question ("... the equation 17 + 25.") verifies
   against 42, and `\\boxed{17+25}` verifies too. We therefore extract the model's final answer ourselves
   (`extract_final_answer`) and, when the gold is a plain number, reject answers that are unevaluated
   arithmetic of numbers.
2. Extraction decides whether a small model sees any signal at all (same measurement): the last
   non-empty `\\boxed{}`, else a clearly marked final answer, else the last number.
3. math-verify bounds its time with `signal.alarm`, which raises off the main thread (a web UI worker).
   Off the main thread we verify in a helper process instead, see `math_reward` for the bound.

Rewards are plain functions over lists of strings returning per-sample scores; no exception escapes.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
import unicodedata
from collections import Counter
from fractions import Fraction

logger = logging.getLogger(__name__)

# Answers longer than this are not verified (score 0): no real final answer is that long, and sympy's cost
# grows with the input, so this is the first bound on verification time.
MAX_ANSWER_CHARS = 300
_MAX_CANDIDATES = 20  # trailing \boxed / "answer is" occurrences tried before falling back
_MAX_BOX_SCAN = 1000  # characters scanned for a closing brace: keeps extraction linear on junk

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_MARKED_RE = re.compile(
    r"(?:(?:final\s+answer|the\s+answer)\s*(?:is\b\s*:?|:)|\banswer\s*:)(?=[ \t*]*([^\n]{0,500}))",
    re.IGNORECASE,
)
_NUMBER_RE = re.compile(r"(?<![\w)\]}.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|(?<![\w)\]}.])-?\d+(?:\.\d+)?")
_WORD_RE = re.compile(r"(?<![\\a-zA-Z{])[a-zA-Z]{3,}")


def _boxed_span(text: str, start: int) -> tuple[str, int] | None:
    """(content, end) of the \\boxed{...} / \\fbox{...} / brace-less `\\boxed 2` whose command ends at
    `start`; `end` is the index just past it."""
    i = start
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":  # MATH has `$\boxed 2$`: the answer is the next token
        token = re.match(r"[^\s${}]+", text[i:])
        return (token.group(0).rstrip(".,;"), i + token.end()) if token else None
    depth = 0
    for j in range(i, min(len(text), i + _MAX_BOX_SCAN)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j], j + 1
    return None  # unbalanced or absurdly long


def _boxed_content(text: str, start: int) -> str | None:
    """Content of the \\boxed{...} / \\fbox{...} / brace-less `\\boxed 2` whose command ends at `start`."""
    span = _boxed_span(text, start)
    return span[0] if span else None


def _boxes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, stripped content) of the last non-empty boxes (at most _MAX_CANDIDATES), in order."""
    boxes = []
    for match in list(_BOX_RE.finditer(text))[-_MAX_CANDIDATES:]:
        span = _boxed_span(text, match.end())
        if span and span[0].strip():
            boxes.append((match.start(), span[1], span[0].strip()))
    return boxes


def last_boxed(text: str) -> str | None:
    """Content of the last non-empty \\boxed{} or \\fbox{} (balanced braces), or None."""
    boxes = _boxes(text)
    return boxes[-1][2] if boxes else None


def _clean_marked(answer: str) -> str:
    """Trim the text after 'the answer is' down to the answer: a $...$ block, else up to the sentence end."""
    answer = answer.strip().strip("*").strip()
    math_block = re.match(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", answer)
    if math_block:
        return next(group for group in math_block.groups() if group is not None).strip()
    answer = re.split(r"\.(?:\s|$)", answer, maxsplit=1)[0]
    word = _WORD_RE.search(answer)  # "42 apples", "5 because ..." -> keep what precedes the prose
    if word:
        answer = answer[: word.start()]
    return answer.strip().lstrip("$").strip(" .,;:*")


def extract_final_answer(completion: str) -> str | None:
    """The model's FINAL answer, or None.

    In order: the content of the last non-empty `\\boxed{}`/`\\fbox{}`; else the last clearly marked answer
    ("final answer is X", "the answer is X", "Answer: X"); else the last number in the text. Taking the
    LAST one is what stops a restated question from counting as the answer.
    """
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    for match in reversed(list(_MARKED_RE.finditer(completion))[-_MAX_CANDIDATES:]):
        answer = _clean_marked(match.group(1))
        if answer:
            return answer
    numbers = _NUMBER_RE.findall(completion)
    return numbers[-1] if numbers else None


# ---- what an answer says, up to LaTeX formatting: normal forms and the operations they apply -----------

_FULLWIDTH_RE = re.compile("[\uff01-\uff5e]")  # fullwidth ASCII: ４２, ＋
_OTHER_DIGIT_RE = re.compile(r"(?![0-9])\d")  # other scripts' decimal digits: ٤٢, ४२
_SYMBOLS = str.maketrans(
    {
        "\u2212": "-",
        "\u00d7": "\\times ",
        "\u00f7": "\\div ",
        "\u00b7": "\\cdot ",
        "\u22c5": "\\cdot ",
        "\u066b": ".",  # Arabic decimal separator
        "\u066c": ",",  # Arabic thousands separator
        "\u00b0": "^\\circ ",
    }
)
_THOUSANDS_RE = re.compile(r"(?<![\d.])\d{1,3}(?:(?:\\[,;: ]|~|[\u00a0\u2009\u202f])\d{3})+(?!\d)")
_SPACED_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?: \d{3})+(?:\.\d+)?")
_E_NOTATION_RE = re.compile(r"(?<![\w.\\])(-?\d+(?:\.\d+)?)[eE]([-+]?)(\d{1,3})(?![\w.])")
_SPACING_RE = re.compile(
    r"\\(?:qquad|quad|enspace|enskip|thinspace|medspace|thickspace|negthinspace|negmedspace|negthickspace)"
    r"(?![a-zA-Z])|\\hspace\*?\{[^{}]*\}|\\[,;:! ]|~|[\u00a0\u2000-\u200b\u202f\u205f\u3000]"
)
_SIZING_RE = re.compile(
    r"\\(?:left|right)\s*\.|\\(?:left|right|[bB]igg?[lrm]?|displaystyle|textstyle|scriptstyle)(?![a-zA-Z])"
)
_COMMAND_RE = re.compile(r"\\(?:[a-zA-Z]+|.?)", re.DOTALL)
_ARGUMENTS = {"frac": 2, "binom": 2, "sqrt": 1}
_MAX_DEPTH = 100  # brace nesting followed by _canonical; deeper text is kept as written

# Operations, by the name they are counted under. \frac of two integers in lowest terms, `a/b` likewise,
# and scientific notation are numbers; \frac of anything else is a division.
_FUNCTIONS = {"frac": "div", "dfrac": "div", "sqrt": "sqrt", "binom": "binom", "choose": "binom"}
_FUNCTIONS.update(
    (name, name)
    for name in "log ln lg exp sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh sum prod int "
    "iint oint lim max min gcd lcm det lfloor lceil mod bmod pmod".split()
)
_BINARY_COMMANDS = {"times": "*", "cdot": "*", "ast": "*", "div": "÷", "pm": "±", "mp": "±"}
_SEPARATORS = frozenset(
    "le leq ge geq lt gt ne neq cup cap in notin subset subseteq supset supseteq to rightarrow Rightarrow "
    "approx equiv sim mid setminus colon".split()
)
_WRAPPED_RE = re.compile(
    r"\\(?:text|textrm|textbf|textit|mathrm|mathbf|mathit|operatorname|mbox)\{([^{}]*)\}(?:\^\{\d\})?"
)
_IGNORED_RE = re.compile(r"\^\{\\circ\}|\\circ|\\%|%|\\\$|\$|\\prime|'")
_SCIENTIFIC_FORM_RE = re.compile(
    r"(?<![\w.}#])-?\d+(?:\.\d+)?(?:\\times|\\cdot|\*)10\^\{[-+]?\d+\}|(?<![\w.}#^{])10\^\{[-+]?\d+\}"
)
_FRACTION_RE = re.compile(r"\\frac\{(-?\d+)\}\{(-?\d+)\}|(?<![\w.#}])(-?\d+)/(-?\d+)(?![\w.#{])")
_BARE_FUNCTION_RE = re.compile(r"(?<![a-zA-Z])(log|ln|sin|cos|tan|sqrt|gcd|lcm|exp)(?![a-zA-Z])")
_RELATION_RE = re.compile(r"=|<|>|\\(?:le|ge|leq|geq|lt|gt|ne|neq)(?![a-zA-Z])")
_APPLICATION_RE = re.compile(
    r"\\(sqrt|binom|frac|log|ln|lg|exp|sin|cos|tan|cot|sec|csc|arcsin|arccos|arctan|sinh|cosh|tanh|lfloor"
    r"|lceil)(?![a-zA-Z])"
)


def _plain_text(text: str) -> str:
    """Number forms math-verify misreads, rewritten as it reads them: other scripts' digits (`٤٢`, `４２`),
    thin-space thousands separators (`1\\,234`, `1 234`), e-notation (`4.2e1`), Unicode `−`, `×`, `°`."""
    text = _FULLWIDTH_RE.sub(lambda m: chr(ord(m.group()) - 0xFEE0), text)
    text = _OTHER_DIGIT_RE.sub(lambda m: str(unicodedata.decimal(m.group())), text).translate(_SYMBOLS)
    text = _THOUSANDS_RE.sub(lambda m: re.sub(r"\D", "", m.group()), text)
    if _SPACED_THOUSANDS_RE.fullmatch(text.strip()):
        text = text.replace(" ", "")
    return _E_NOTATION_RE.sub(lambda m: f"{m[1]}\\times10^{{{'-' if m[2] == '-' else ''}{m[3]}}}", text)


def _argument(text: str, i: int, depth: int) -> tuple[str, int]:
    """The normal form of the argument at text[i] (a {group}, a command or one character), and its end."""
    if i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return "", i
    if text[i] == "{":
        return _braced(text, i + 1, depth + 1)
    if text[i] == "\\":
        command = _COMMAND_RE.match(text, i)
        return command.group(), command.end()
    return text[i], i + 1


def _braced(text: str, i: int = 0, depth: int = 0) -> tuple[str, int]:
    """Normal form of text[i:] up to the `}` that closes the group (or the end), and the index after it:
    arguments of \\frac, \\binom, \\sqrt, ^ and _ braced, other commands' arguments kept, other braces
    (grouping only) dropped."""
    if depth > _MAX_DEPTH:
        return text[i:], len(text)
    out = []
    while i < len(text):
        char = text[i]
        if char == "}":
            return "".join(out), i + 1
        if char == "\\":
            command = _COMMAND_RE.match(text, i)
            out.append(command.group())
            i, name = command.end(), command.group()[1:]
            if name == "sqrt" and text.startswith("[", i):
                close = text.find("]", i)
                if close > 0:
                    out.append(text[i : close + 1])
                    i = close + 1
            for _ in range(_ARGUMENTS.get(name, 0)):
                argument, i = _argument(text, i, depth)
                out.append("{" + argument + "}")
            if name.isalpha() and name not in _ARGUMENTS and text.startswith("{", i):  # \text{..}
                argument, i = _braced(text, i + 1, depth + 1)
                out.append("{" + argument + "}")
        elif char in "^_":
            argument, i = _argument(text, i + 1, depth)
            out.append(char + "{" + argument + "}")
        elif char == "{":
            group, i = _braced(text, i + 1, depth + 1)
            out.append("{" + group + "}" if text.startswith(("^", "_"), i) else group)
        else:
            out.append(char)
            i += 1
    return "".join(out), i


def _canonical(text: str) -> str:
    """`text` up to LaTeX formatting: no spacing or sizing commands (\\quad, \\,, ~, \\left, \\displaystyle),
    no whitespace but between two letters, \\dfrac and \\tfrac as \\frac, \\dbinom as \\binom, every argument
    of \\frac, \\binom, \\sqrt, ^ and _ braced and grouping braces dropped, numbers as in `_plain_text`.
    `17\\quad+25`, `{17}+{25}` and `17 + 25` are all `17+25`; `\\dfrac34` is `\\frac{3}{4}`."""
    text = _SIZING_RE.sub("", _plain_text(text))
    text = re.sub(r"\\[dtc]frac(?![a-zA-Z])", r"\\frac", text)
    text = re.sub(r"\\[dt]binom(?![a-zA-Z])", r"\\binom", text)
    text = re.sub(r"(?<=[a-zA-Z])\s+(?=[a-zA-Z])", "\x00", _SPACING_RE.sub(" ", text))  # `\pi r` stays two
    return _braced(re.sub(r"\s+", "", text).replace("\x00", " "))[0]


def _split_top(text: str, separator: str) -> list[str]:
    """`text` split at each `separator` outside braces, parentheses and brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "{([":
            depth += 1
        elif char in "})]":
            depth -= 1
        elif char == separator and depth <= 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _unwrapped(text: str) -> str:
    """A canonical form without the parentheses around all of it: `(\\sqrt{2})` is `\\sqrt{2}`."""
    while text.startswith("(") and text.endswith(")") and _split_top(text[1:-1], ")") == [text[1:-1]]:
        text = text[1:-1]
    return text


def _value(text: str, units: bool = False) -> Fraction | None:
    """The number a canonical form writes (`42`, `-3.5`, `1,000`, `\\frac{1}{2}`, `1/2`), else None; with
    `units`, letters after the number (`5cm`) are ignored too."""
    text = _IGNORED_RE.sub("", _WRAPPED_RE.sub(r"\1", text)).replace(" ", "")
    if units:
        text = re.sub(r"(?<=[\d}])[a-zA-Z]+$", "", text)
    fraction = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", text)
    try:
        if fraction:
            return Fraction(int(fraction[2]), int(fraction[3])) * (-1 if fraction[1] else 1)
        if re.fullmatch(r"-?\d+(?:\.\d+)?|-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+/-?\d+", text):
            return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        pass
    return None


def _same_answer(first: str, second: str) -> bool:
    """Two stated answers say the same thing: equal canonical forms (without $, %, degrees and the \\text
    wrappers) or equal numbers (`\\frac{1}{2}` and 0.5, `5\\text{ cm}` and 5 cm)."""
    first, second = _canonical(first), _canonical(second)
    loose = [_IGNORED_RE.sub("", _WRAPPED_RE.sub(r"\1", text)).replace(" ", "") for text in (first, second)]
    if loose[0] == loose[1]:
        return True
    values = _value(first, units=True), _value(second, units=True)
    return values[0] is not None and values[0] == values[1]


def _fraction_token(match: re.Match) -> str:
    numerator, denominator = (int(group) for group in match.groups() if group is not None)
    reduced = denominator not in (0, 1, -1) and math.gcd(numerator, denominator) == 1
    return "#" if reduced else "#÷#"  # 84/2 is a division still to do, 1/2 a number


def _operations(text: str) -> Counter:
    """The operations a canonical form applies, counted: functions (sqrt, binom, log, sin, ...),
    `add` (binary + and -, \\pm), `mul` (\\times, \\cdot, *, `2(3)`, `(a)(b)`), `div` (a/b, \\frac, \\div),
    `pow`, `factorial`, `abs`, and `group` (a parenthesised sum: `(x+1)^2`, `(-k+4)+(-2+3k)`). Numbers are
    not operations: integers, decimals, reduced fractions, scientific notation; units, $, % and degrees
    are ignored."""
    counts: Counter = Counter()

    def command(match: re.Match) -> str:
        name = match.group()[1:]
        if name in _FUNCTIONS:
            counts[_FUNCTIONS[name]] += 1
            return "@"
        if name in _BINARY_COMMANDS:
            return _BINARY_COMMANDS[name]
        return ";" if name in _SEPARATORS or not name.isalpha() else "a"  # \pi, \infty, \alpha: operands

    def bare(match: re.Match) -> str:
        counts[_FUNCTIONS[match[1]]] += 1
        return "@"

    text = _WRAPPED_RE.sub(lambda m: f"\\{m[1].lower()} " if m[1].lower() in _FUNCTIONS else "", text)
    text = _FRACTION_RE.sub(_fraction_token, _SCIENTIFIC_FORM_RE.sub("#", _IGNORED_RE.sub("", text)))
    text = _BARE_FUNCTION_RE.sub(bare, _COMMAND_RE.sub(command, text)).replace(" ", "")
    frames: list[list] = []  # per open (, [ or {: [closing char, holds a binary +/-, holds a comma]
    for i, char in enumerate(text):
        before, after = text[i - 1 : i], text[i + 1 : i + 2]
        operand_before = before.isalnum() or before in ("#", ")", "}", "]", "|", "!", ".")
        if char in "+-±" and operand_before:
            counts["add"] += 1
            if frames:
                frames[-1][1] = True
        elif char == "*" or (char == "(" and (before.isdigit() or before in ("#", ")"))):
            counts["mul"] += 1
        elif char == ")" and (after.isdigit() or after == "#"):
            counts["mul"] += 1
        elif char == "÷" or (char == "/" and operand_before and (after.isalnum() or after in tuple("#({@-"))):
            counts["div"] += 1
        elif char == "^":
            counts["pow"] += 1
        elif char == "!" and after != "=":
            counts["factorial"] += 1
        elif char == "|":
            counts["abs"] += 1
        elif char == ",":
            if frames:
                frames[-1][2] = True
        if char in "([{":
            frames.append([")]}"["([{".index(char)], False, False])
        elif char in ")]}" and frames and frames[-1][0] == char:
            closing, has_sum, has_comma = frames.pop()
            counts["group"] += closing != "}" and has_sum and not has_comma
    counts["abs"] //= 2
    return +counts


def _adds_operations(answer: str, gold: str) -> bool:
    """True when the (canonical) answer applies an operation more often than the gold does: an
    unevaluated form. Lists are compared element by element, against the most any gold element applies."""
    allowed: Counter = Counter()
    for element in _split_top(gold, ","):
        allowed |= _operations(element)
    return any(_operations(element) - allowed for element in _split_top(answer, ","))


def _group_end(text: str, i: int, opening: str, closing: str) -> int:
    """Index after the group that opens at text[i], or i when none opens there."""
    if not text.startswith(opening, i):
        return i
    depth = 0
    for j in range(i, len(text)):
        depth += (text[j] == opening) - (text[j] == closing)
        if depth == 0:
            return j + 1
    return len(text)


def _applications(text: str) -> set[str]:
    """The function applications a canonical form writes, as written: `\\sqrt{242}`, `\\binom{31}{28}`,
    `\\log_{2}64`, `\\frac{x}{2}` (not a reduced fraction of integers, which is a number)."""
    found = set()
    for match in _APPLICATION_RE.finditer(text):
        name, end = match[1], match.end()
        if name == "sqrt":
            end = _group_end(text, end, "[", "]")
        for _ in range(2 if name in ("frac", "binom") else 1 if name == "sqrt" else 0):
            end = _group_end(text, end, "{", "}")
        if name in ("lfloor", "lceil"):
            close = text.find("\\r" + name[1:], end)
            end = close + len(name) + 1 if close >= 0 else len(text)
        elif name not in ("sqrt", "frac", "binom"):
            for mark in "_^":
                if text.startswith(mark, end):
                    end = _group_end(text, end + 1, "{", "}")
            token = re.match(r"\{|\(|\\[a-zA-Z]+|[\w.]+", text[end:])
            if token:
                group = {"{": ("{", "}"), "(": ("(", ")")}.get(token.group())
                end = _group_end(text, end, *group) if group else end + token.end()
        application = text[match.start() : end]
        if not (name == "frac" and _value(application) is not None):
            found.add(application)
    return found


_MATH_BLOCK_RE = re.compile(r"\$\$(.+?)\$\$|(?<!\\)\$(.+?)(?<!\\)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_PLAIN_ARITHMETIC_RE = re.compile(
    r"-?\d+(?:\.\d+)?(?:\s*(?:[-+*/×÷^]|\\times|\\cdot|\\div)\s*-?\d+(?:\.\d+)?)+"
)
_MAX_QUESTION_EXPRESSIONS = 200


@functools.lru_cache(maxsize=1024)
def _question_forms(question: str) -> tuple[frozenset[str], frozenset[str]]:
    """What an echo of the question would write, canonical: its math expressions (each `$...$`,
    `\\(...\\)`, `\\[...\\]`, and arithmetic in its prose such as `17 + 25`), the sides of its equations
    that apply an operation, and the function applications it writes."""
    blocks = _MATH_BLOCK_RE.finditer(question)
    texts = [next(group for group in block.groups() if group is not None) for block in blocks]
    texts += _PLAIN_ARITHMETIC_RE.findall(_MATH_BLOCK_RE.sub(" ", question))
    forms: set[str] = set()
    applications: set[str] = set()
    for text in texts[:_MAX_QUESTION_EXPRESSIONS]:
        if len(text) > 4 * MAX_ANSWER_CHARS:
            continue
        canonical = _canonical(text)
        forms.add(_unwrapped(canonical))
        forms.update(_unwrapped(side) for side in _split_top(canonical, "=") if _operations(side))
        applications |= _applications(canonical)
    return frozenset(forms), frozenset(applications)


def _echoes_question(answer: str, gold: str, question: str) -> bool:
    """True when the (canonical) answer is one of the question's own expressions (other than a plain
    number, and other than the gold as written), or writes a function application of the question that the
    gold does not: `\\sqrt{242}` for "Simplify $\\sqrt{242}$", `\\frac{3}{20}` for "Express $\\frac{3}{20}$
    as a decimal"."""
    forms, applications = _question_forms(question)
    unwrapped = _unwrapped(answer)
    if unwrapped in forms and unwrapped != _unwrapped(gold) and not re.fullmatch(r"-?[\d.,]+", unwrapped):
        return True
    return bool((_applications(answer) & applications) - _applications(gold))


_CONNECTIVES = frozenset(
    "or and either maybe possibly perhaps alternatively also else otherwise vs versus lor vee text mathrm "
    "textbf quad qquad".split()
)


def _hedged(completion: str, boxes: list[tuple[int, int, str]]) -> bool:
    """True when the last box is one of several different boxed answers offered side by side, with
    nothing but a connective between them: `\\boxed{43} or \\boxed{42}`, `\\boxed{1}, \\boxed{2}`. A box after
    other words (`\\boxed{41} no wait, \\boxed{42}`) is a correction, not a hedge."""
    for (_, end, first), (start, _, second) in zip(reversed(boxes[:-1]), reversed(boxes[1:]), strict=True):
        if end > start:  # nested: \boxed{\boxed{42}}
            continue
        between = completion[end:start]
        words = {word.lower() for word in re.findall(r"[a-zA-Z]+", between)}
        if len(between) > 60 or re.search(r"\d", between) or not words <= _CONNECTIVES:
            return False
        if not _same_answer(first, second):
            return True
    return False


def _contradicted(tail: str, answer: str) -> bool:
    """True when the last clearly marked answer after the last box ("Wait... the answer is 43.") states
    something else than the box (numbers are compared by value, other answers as written)."""
    for match in reversed(list(_MARKED_RE.finditer(tail))[-_MAX_CANDIDATES:]):
        later = _clean_marked(match.group(1))
        if later:
            looks_like_answer = re.search(r"[\d\\]", later) or re.fullmatch(r"\(?[A-E]\)?", later)
            return bool(looks_like_answer) and not _same_answer(later, answer)
    return False


def _not_the_answer(completion: str, answer: str, gold: str, question: str | None) -> bool:
    """True when the extracted answer must score 0 whatever math-verify says (the rule in the module
    docstring): hedged or contradicted boxes, an equation that states another number, an operation the gold
    does not apply, or an echo of the question."""
    boxes = _boxes(completion)
    if boxes and boxes[-1][2] == answer:
        if _hedged(completion, boxes) or _contradicted(completion[boxes[-1][1] :], answer):
            return True
    canonical, gold_canonical = _canonical(answer), _canonical(gold)
    sides = [canonical] if _RELATION_RE.search(gold_canonical) else _split_top(canonical, "=")
    final = _value(sides[-1])
    if final is not None and any(_value(side) not in (None, final) for side in sides[:-1]):
        return True  # `43 = 42`: which one is the answer?
    if _adds_operations(sides[-1], gold_canonical):
        return True
    return bool(question) and _echoes_question(sides[-1], gold_canonical, question)


def _exponent(text: str, start: int) -> str:
    """The exponent written after the `^` that ends at `start`: a balanced {...} group or one token."""
    group = re.match(r"\s*(-?\d+|\\?[a-zA-Z]+|[^{])", text[start:])
    if not text[start:].lstrip().startswith("{"):
        return group.group(1) if group else ""
    return _boxed_content(text, start) or text[start:]  # unbalanced: the rest, to be judged whole


def _too_costly(answer: str) -> bool:
    """True for answers whose verification could run for minutes: towers like `9^{9^{9}}`, giant
    exponents or factorials, high powers of symbolic expressions (`(1+x)^{1000}` took 11 s here)."""
    if len(answer) > MAX_ANSWER_CHARS:
        return True
    text = answer.replace("**", "^")
    for match in re.finditer(r"\^", text):
        exponent = _exponent(text, match.end())
        if "^" in exponent or "!" in exponent:
            return True
        numeric_base = text[: match.start()].rstrip().endswith(tuple("0123456789"))
        if any(int(digits) > (100_000 if numeric_base else 200) for digits in re.findall(r"\d+", exponent)):
            return True
    if any(int(digits) > 100_000 for digits in re.findall(r"(\d+)\s*!", text)):
        return True
    return bool(re.search(r"[)}]\s*!", text) and "^" in text)  # like (10^{9})!


def _wrap(answer: str) -> str:
    """Box an answer so math-verify parses bare `42`, `\\frac{1}{2}`, `(1,2)` and `x^2+1` as LaTeX."""
    return "\\boxed{" + answer + "}"


def _verify_texts(gold: str, answer: str, timeout: int | None) -> bool:
    """math-verify on two answer strings; `timeout` is math-verify's own (signal-based) limit."""
    from math_verify import parse, verify  # imported here: it pulls in sympy, which is slow to import

    gold_parsed = parse(_wrap(gold), parsing_timeout=timeout)
    answer_parsed = parse(_wrap(answer), parsing_timeout=timeout)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=timeout))


# ---- off-main-thread verification: a helper process whose main thread may use signal.alarm ----------

_worker: subprocess.Popen | None = None
_worker_broken = False
_worker_buffer = b""
_worker_lock = threading.Lock()
_WORKER_START_S = 120.0
# Load this file as a module without importing the package (whose __init__ may import torch).
_WORKER_CODE = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_popo_rewards_worker', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "module._serve()\n"
)


def _serve() -> None:
    """Helper-process loop: one JSON request per stdin line, one '1'/'0' per stdout line."""
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but answers may reach the protocol stream
    import math_verify  # noqa: F401  fail before "ready" if missing; the caller then verifies in-thread

    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            ok = _verify_texts(request["gold"], request["answer"], request["timeout"])
        except Exception:
            ok = False
        out.write("1\n" if ok else "0\n")
        out.flush()


def _read_line(proc: subprocess.Popen, deadline: float) -> str | None:
    """One line from the helper, or None when `deadline` (time.monotonic) passes first."""
    global _worker_buffer
    fd = proc.stdout.fileno()
    while b"\n" not in _worker_buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        _worker_buffer += chunk
    line, _worker_buffer = _worker_buffer.split(b"\n", 1)
    return line.decode()


def _stop_worker() -> None:
    """Kill the helper process (it also exits by itself when our end of its stdin closes)."""
    global _worker, _worker_buffer
    if _worker is not None:
        _worker.kill()
        _worker.wait()
    _worker, _worker_buffer = None, b""


def _start_worker() -> subprocess.Popen | None:
    """The running helper, started if needed; None where it cannot run (then verify in-thread)."""
    global _worker, _worker_broken
    if _worker is not None and _worker.poll() is None:
        return _worker
    _stop_worker()
    if _worker_broken or os.name != "posix":
        return None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        _worker = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE, os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        if _read_line(_worker, time.monotonic() + _WORKER_START_S) == "ready":
            return _worker
    except OSError:
        pass
    logger.warning("math reward helper process did not start; verifying in-thread without time limits")
    _stop_worker()
    _worker_broken = True
    return None


def _verify_off_main_thread(gold: str, answer: str, timeout_s: float) -> bool:
    """Verify in the helper process; kill it (score 0) when it overruns the hard deadline."""
    seconds = max(1, math.ceil(timeout_s))
    with _worker_lock:
        proc = _start_worker()
        if proc is None:  # no helper (non-POSIX or spawn failed): only the input guards bound the time
            return _verify_texts(gold, answer, None)
        request = json.dumps({"gold": gold, "answer": answer, "timeout": seconds}) + "\n"
        proc.stdin.write(request.encode())
        proc.stdin.flush()
        line = _read_line(proc, time.monotonic() + 3 * seconds + 1)
        if line is None:
            logger.warning("math verification overran %.0f s; helper process restarted", 3 * seconds + 1)
            _stop_worker()
            return False
        return line == "1"


atexit.register(_stop_worker)


def score(
    completion: str, gold: str, timeout_s: float = 5.0, question: str | None = None
) -> tuple[float, str | None]:
    """(reward, extracted answer) for one completion; the trainer logs both. Never raises.

    With `question` (the problem text), an answer that echoes one of its expressions also scores 0."""
    try:
        answer = extract_final_answer(completion)
        if answer is None or _too_costly(answer):
            return 0.0, answer
        if _not_the_answer(completion, answer, gold, question):
            return 0.0, answer
        gold_text, answer_text = _plain_text(gold), _plain_text(answer)
        if os.name != "posix":  # math-verify's non-POSIX timeout pickles a local function: it would fail
            ok = _verify_texts(gold_text, answer_text, None)
        elif threading.current_thread() is threading.main_thread():
            ok = _verify_texts(gold_text, answer_text, max(1, math.ceil(timeout_s)))
        else:
            ok = _verify_off_main_thread(gold_text, answer_text, timeout_s)
        return (1.0 if ok else 0.0), answer
    except ImportError:  # math-verify missing is a broken install, not a wrong answer: say so
        raise
    except Exception:  # a reward must never crash training
        logger.debug("scoring failed", exc_info=True)
        return 0.0, None


def math_reward(
    completions: list[str], golds: list[str], timeout_s: float = 5.0, questions: list[str] | None = None
) -> list[float]:
    """1.0 where math-verify says the completion's final answer equals the gold, else 0.0 (and 0.0 for
    the answers the module docstring's rule excludes; `questions`, one per completion, adds the echo check).

    Time bound per sample: answers over MAX_ANSWER_CHARS characters, power towers, giant exponents and
    giant factorials are scored 0 without verification (everywhere, so the score does not depend on the
    thread). On the main thread math-verify's own `signal.alarm` limits apply: ceil(timeout_s) for each
    of parse(gold), parse(answer) and verify. Off the main thread (where `signal.alarm` raises) the same
    runs in a helper process, whose main thread can use those limits, and the caller kills it after
    3 * ceil(timeout_s) + 1 seconds: a hard bound. Its first use costs the helper's start (1-2 s).
    """
    if len(completions) != len(golds):
        raise ValueError(f"math_reward got {len(completions)} completions but {len(golds)} gold answers")
    if questions is not None and len(questions) != len(golds):
        raise ValueError(f"math_reward got {len(golds)} gold answers but {len(questions)} questions")
    questions = [None] * len(golds) if questions is None else questions
    return [
        score(completion, gold, timeout_s, question)[0]
        for completion, gold, question in zip(completions, golds, questions, strict=True)
    ]
