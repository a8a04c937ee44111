"""What a final answer says, up to LaTeX formatting: normal forms, values and the operations it applies.

The reward (`rewards.py`) uses these to tell an evaluated answer from an unevaluated form of it or an
echo of the question: `canonical` drops spacing and sizing commands, `\\left`/`\\right`, `\\displaystyle`,
`\\dfrac`/`\\dbinom` and grouping braces; `operations` counts the operations an answer applies;
`plain_text` rewrites numbers a human reads as numbers (e-notation, thin-space thousands, fullwidth
and other scripts' digits). Pure functions of strings.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from fractions import Fraction

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
_MAX_DEPTH = 100  # brace nesting followed by canonical; deeper text is kept as written

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
RELATION_RE = re.compile(r"=|<|>|\\(?:le|ge|leq|geq|lt|gt|ne|neq)(?![a-zA-Z])")
INEQUALITY_RE = re.compile(r"<|>|\\(?:le|ge|leq|geq|lt|gt|ne|neq)(?![a-zA-Z])")
_APPLICATION_RE = re.compile(
    r"\\(sqrt|binom|frac|log|ln|lg|exp|sin|cos|tan|cot|sec|csc|arcsin|arccos|arctan|sinh|cosh|tanh|lfloor"
    r"|lceil)(?![a-zA-Z])"
)


def plain_text(text: str) -> str:
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


_INFIX_RE = re.compile(r"\{([^{}]*?)\\(over|choose)(?![a-zA-Z])([^{}]*)\}")
_NUMBER_ZEROS_RE = re.compile(r"(?<![\d.])0+(?=\d)|(?<=\d\.)(\d*?)0+(?!\d)")


def _infix_fractions(text: str) -> str:
    """TeX's infix `{a \\over b}` and `{n \\choose k}` as `\\frac{a}{b}` and `\\binom{n}{k}`, innermost group
    first; a whole answer `a \\over b` too."""
    for _ in range(_MAX_DEPTH):
        if "\\over" not in text and "\\choose" not in text:
            break
        rewritten = _INFIX_RE.sub(
            lambda m: f"{{\\{'frac' if m[2] == 'over' else 'binom'}{{{m[1]}}}{{{m[3]}}}}}", text
        )
        if rewritten == text:
            rewritten = _INFIX_RE.sub(
                lambda m: f"\\{'frac' if m[2] == 'over' else 'binom'}{{{m[1]}}}{{{m[3]}}}", "{" + text + "}"
            )
            if rewritten == "{" + text + "}":
                break
        text = rewritten
    return text


def same_number_forms(text: str) -> str:
    """A canonical form with its numbers as a reader writes them: no leading zeros (`03`, `01.45`), no
    trailing decimal zeros (`1.450`), and `a/b` of integers as `\\frac{a}{b}`. For telling an echo of the
    question (`\\frac{03}{20}`, `3/20`) from the question's own `\\frac{3}{20}`."""
    text = re.sub(r"(?<=\d)\.(?![\d.])", "", _NUMBER_ZEROS_RE.sub(lambda m: m[1] or "", text))
    return re.sub(r"(?<![\w.#}])(-?\d+)/(\d+)(?![\w.{])", r"\\frac{\1}{\2}", text)


def canonical(text: str) -> str:
    """`text` up to LaTeX formatting: no spacing or sizing commands (\\quad, \\,, ~, \\left, \\displaystyle),
    no whitespace but between two letters, \\dfrac and \\tfrac as \\frac, \\dbinom as \\binom, every argument
    of \\frac, \\binom, \\sqrt, ^ and _ braced and grouping braces dropped, numbers as in `plain_text`.
    `17\\quad+25`, `{17}+{25}` and `17 + 25` are all `17+25`; `\\dfrac34` is `\\frac{3}{4}`."""
    text = _infix_fractions(_SIZING_RE.sub("", plain_text(text)))
    text = re.sub(r"\\sqrt\s*\[\s*2\s*\]", r"\\sqrt", text)  # the square root's own index
    text = re.sub(r"\\[dtc]frac(?![a-zA-Z])", r"\\frac", text)
    text = re.sub(r"\\[dt]binom(?![a-zA-Z])", r"\\binom", text)
    text = re.sub(r"(?<=[a-zA-Z])\s+(?=[a-zA-Z])", "\x00", _SPACING_RE.sub(" ", text))  # `\pi r` stays two
    return _braced(re.sub(r"\s+", "", text).replace("\x00", " "))[0]


def split_top(text: str, separator: str) -> list[str]:
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


def unwrapped(text: str) -> str:
    """A canonical form without the parentheses around all of it: `(\\sqrt{2})` is `\\sqrt{2}`."""
    while text.startswith("(") and text.endswith(")") and split_top(text[1:-1], ")") == [text[1:-1]]:
        text = text[1:-1]
    return text


def value(text: str, units: bool = False) -> Fraction | None:
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


def same_answer(first: str, second: str) -> bool:
    """Two stated answers say the same thing: equal canonical forms (without $, %, degrees and the \\text
    wrappers) or equal numbers (`\\frac{1}{2}` and 0.5, `5\\text{ cm}` and 5 cm)."""
    first, second = canonical(first), canonical(second)
    loose = [_IGNORED_RE.sub("", _WRAPPED_RE.sub(r"\1", text)).replace(" ", "") for text in (first, second)]
    if loose[0] == loose[1]:
        return True
    values = value(first, units=True), value(second, units=True)
    return values[0] is not None and values[0] == values[1]


def _fraction_token(match: re.Match) -> str:
    numerator, denominator = (int(group) for group in match.groups() if group is not None)
    reduced = denominator not in (0, 1, -1) and math.gcd(numerator, denominator) == 1
    return "#" if reduced else "#÷#"  # 84/2 is a division still to do, 1/2 a number


def operations(text: str) -> Counter:
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


def adds_operations(answer: str, gold: str) -> bool:
    """True when the (canonical) answer applies an operation more often than the gold does: an
    unevaluated form. Lists are compared element by element, against the most any gold element applies."""
    allowed: Counter = Counter()
    for element in split_top(gold, ","):
        allowed |= operations(element)
    return any(operations(element) - allowed for element in split_top(answer, ","))


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


def applications(text: str) -> set[str]:
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
        if not (name == "frac" and value(application) is not None):
            found.add(application)
    return found
