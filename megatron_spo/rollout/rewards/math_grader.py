"""Math answer grading: extract the final answer from a response and decide if it is correct.

Reward (DESIGN.md, "Reward (math)"; the authors use verl's DAPO math scorer with strict box
verification, seed 001):

    r = 0                                  if thinking is on and count("</think>") != 1
    r = 1[ answer(response) ≡ ground_truth ]  otherwise, binary {0, 1}

`answer(response)` is read in the last `answer_tail_chars` characters (default 100, DAPO's strict
window) of the text after `</think>`: the argument of the last `\\boxed{...}` (braces nested to
any depth; an escaped `\\{` / `\\}` does not nest); when there is none, the last `\\fbox{...}`;
when there is none, the `\\boxed x` form. A `\\boxed` with no argument (a bare word in the
prose, a trailing `\\boxed`) is not a box. A last box whose braces never close (a truncated
response) is no answer. With `strict_box` off, a last "Answer: ..." line is accepted when
there is no box (the Minerva-style fallback of DAPO's non-strict path).

Equivalence `≡`, cheapest first:
  0. identical: the box holds exactly the ground-truth string (all DAPO's strict path checks);
  1. exact: the normalised strings are equal (spaces, `\\left`/`\\right`, `\\dfrac`/`\\tfrac`,
     `\\text{}` units and unit words after a number, `^\\circ`, `\\%`, `\\$`, thousands separators
     in the strict `d{1,3}(,ddd)+` form, a trailing ".", a variable-name prefix `x = `, unicode
     minus/times/pi/sqrt and full-width digits are normalised);
  2. numeric: both normalised strings are decimal or scientific numbers (`1.5e3`,
     `1.5\\times10^{3}`), compared exactly as decimals (a percentage may also be read as /100);
     this path decides, so two different 12-digit integers never meet a tolerance;
  3. symbolic: `math-verify` (HF's LaTeX -> SymPy grader) parses both and compares them
     (fractions vs decimals, radicals, intervals, sets, matrices, percentages), under its own
     per-call time limit, and only where its verdict is sound: both sides list the same number
     of items with no repeats (it reads "3, 3" as the set {3}), an equation on one side only
     has a variable name on the left (it reads "3 = 5" as 5), and no letter we kept as a
     variable ends in a unit word (it reads "x + 2m" as x + 2).

Deliberate differences from DAPO's strict scorer (verl `utils/reward_score/math_dapo.py`,
`compute_score(..., strict_box_verify=True)`), which accepts a response only when its last
`\\boxed{` argument in the last 100 characters equals the ground truth string: we accept
everything it accepts, plus equivalent answers (paths 1-3), except where its extraction is
wrong. Those DAPO false positives are:
  - a later box written `\\boxed {x}` (whitespace before the brace) is the final answer; DAPO
    only searches for `\\boxed{` and grades the earlier box;
  - DAPO counts escaped braces `\\{` `\\}` as grouping braces, so on unbalanced set notation it
    cuts the box at the wrong place; we match LaTeX grouping;
  - a blank ground truth matches a blank box in DAPO; a blank answer is never correct here;
  - with `thinking` on (not DAPO's setting), a box inside the thoughts does not count.
`tests/reward_cases.py` generates the fuzz that checks this against DAPO's own code.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import unicodedata
from decimal import Decimal, InvalidOperation


@dataclasses.dataclass(kw_only=True)
class GradeResult:
    score: float
    """1.0 correct, 0.0 otherwise."""
    prediction: str | None
    """The extracted answer (None when nothing could be extracted)."""
    format_ok: bool = True
    """False when the thinking-format check failed (then score is 0 and nothing was graded)."""
    path: str = "none"
    """Which stage decided: "exact", "numeric", "math_verify", or "none"."""


_BOX_RE = re.compile(r"\\(boxed|fbox)(?![A-Za-z])\s*")  # the command and the whitespace after it
_BARE_ARGUMENT_RE = re.compile(r"[^\s$]+")  # "$\boxed 5$": up to a space or "$"


def _braced_argument(text: str, open_brace: int) -> str | None:
    """The text inside the group that opens at `text[open_brace] == "{"`, or None if it never
    closes. A backslash escapes the next character, so `\\{` / `\\}` never nest."""
    depth, j = 0, open_brace
    while j < len(text):
        char = text[j]
        if char == "\\":
            j += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1 : j]
        j += 1
    return None


def last_boxed(text: str) -> str | None:
    """The final answer's box in `text` (module docstring): the last `\\boxed{...}`, else the last
    `\\fbox{...}`, else the last `\\boxed x`; None when there is none or the chosen box never
    closes. Whitespace between the command and its brace is allowed, as in LaTeX."""
    last_boxed_brace = last_fbox_brace = last_bare_token = None
    for match in _BOX_RE.finditer(text):
        if text.startswith("{", match.end()):
            if match.group(1) == "boxed":
                last_boxed_brace = match.end()
            else:
                last_fbox_brace = match.end()
        elif match.group(1) == "boxed" and text.startswith(" ", match.start() + len("\\boxed")):
            token = _BARE_ARGUMENT_RE.match(text, match.end())
            if token:
                last_bare_token = token.group()
    if last_boxed_brace is not None:
        return _braced_argument(text, last_boxed_brace)
    if last_fbox_brace is not None:
        return _braced_argument(text, last_fbox_brace)
    return last_bare_token


def answer_line(text: str) -> str | None:
    """The last "Answer: ..." (case-insensitive) up to the end of its line, or None."""
    matches = re.findall(r"(?i)answer\s*(?:is)?\s*[:：]\s*(.+)", text)
    if not matches:
        return None
    answer = matches[-1].strip()
    boxed = last_boxed(answer)
    return (boxed if boxed is not None else answer).rstrip(".").strip() or None


_UNICODE = {
    "\u2212": "-", "\u2013": "-", "\u00d7": "\\times", "\u22c5": "\\cdot", "\u00b7": "\\cdot",
    "\u03c0": "\\pi", "\u221e": "\\infty", "\u221a": "\\sqrt", "\u2264": "\\le", "\u2265": "\\ge",
    "\u00b0": "^\\circ", "\u2205": "\\emptyset", "\u222a": "\\cup",
}
_UNIT_WORDS = (
    "degrees", "degree", "cm", "mm", "km", "m", "meters", "meter", "inches", "inch", "feet", "foot",
    "ft", "units", "unit", "dollars", "dollar", "cents", "seconds", "second", "minutes", "minute",
    "hours", "hour", "days", "day", "sq", "square", "cubic", "miles", "mph", "kg", "g", "pounds", "lbs",
)
_UNITS_RE = re.compile(r"(?<=[\d}.])\s*(?:\\,|\\ |~)?\s*(?:" + "|".join(_UNIT_WORDS) + r")(?:\^\{?\d\}?|\^\d)?\s*$")
_TEXT_UNITS_RE = re.compile(r"(?<=[\d}])\s*\\(?:text|mbox|mathrm)\s*\{\s*[a-zA-Z\s]+\}(?:\^\{?\d\}?)?\s*$")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mbox|mathrm|textrm|operatorname)\s*\{([^{}]*)\}")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SCI_RE = re.compile(r"^(-?\d+(?:\.\d+)?)(?:\\times|\\cdot|\*|x)10\^\{?(-?\d+)\}?$")
# what may stand left of "=" in an answer like "x = 5": a letter or Greek command, an optional
# subscript, an optional single-letter argument ("f(x)")
_VARIABLE_RE = re.compile(r"(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?[A-Za-z0-9]+\}?)?(?:\([A-Za-z]\))?")
_EQUALS_RE = re.compile(r"(?<![<>!=])=(?!=)")  # "=", not "<=", ">=", "!=" or "=="


def _strip_unit(s: str, unit_re: re.Pattern) -> str:
    """`s` without a trailing unit, when what remains has no free letters ("5 m" -> "5", but
    "x + 2m" stays: there the "m" is a variable)."""
    stripped = unit_re.sub("", s)
    if stripped != s and not re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", stripped)):
        return stripped
    return s


def normalize_answer(answer: str) -> str:
    """Canonical string form of an answer for the exact-match path (see module docstring)."""
    s = unicodedata.normalize("NFKC", answer)  # full-width digits and letters -> ASCII
    for char, latex in _UNICODE.items():
        s = s.replace(char, latex)
    s = s.strip().strip("$").strip()
    s = s.replace("\\displaystyle", "").replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for space in ("\\!", "\\,", "\\;", "\\:", "\\quad", "\\qquad"):
        s = s.replace(space, "")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    # units: "\text{ cm}" after a number is dropped; other \text{...} keep their content
    s = _strip_unit(s, _TEXT_UNITS_RE)
    s = _TEXT_RE.sub(r"\1", s)
    s = _strip_unit(s, _UNITS_RE).strip()
    # "x = 5", "\theta = 5" -> "5"; "3 = 5" and "x + y = 5" stay (not a variable name on the left)
    sides = _EQUALS_RE.split(s)
    if len(sides) == 2 and _VARIABLE_RE.fullmatch(sides[0].strip()):
        s = sides[1]
    s = s.strip().rstrip(".").strip()
    # "1,234" is a number only in the strict form, before spaces go: "32, 349" is a list
    s = s.replace("{,}", ",")
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    s = re.sub(r"\s+", "", s)
    # \frac12 -> \frac{1}{2}, \sqrt3 -> \sqrt{3}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    s = re.sub(r"(?<![\d])\.(\d)", r"0.\1", s)  # ".5" -> "0.5"
    return s


def _as_number(s: str) -> Decimal | None:
    """The exact decimal value of a normalised number ("12", "-0.5", "1.5e3", "1.5\\times10^{3}")."""
    sci = _SCI_RE.match(s)
    if sci:
        s = f"{sci.group(1)}e{sci.group(2)}"
    if not re.fullmatch(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


def _readings(value: Decimal, is_percentage: bool) -> set[Decimal]:
    """A number, and for a percentage also the number / 100 (exact: only the exponent moves)."""
    if not is_percentage:
        return {value}
    sign, digits, exponent = value.as_tuple()
    return {value, Decimal((sign, digits, exponent - 2))}


def _is_one_set(s: str) -> bool:
    """Whether `s` is a single `\\{...\\}` (not "\\{1\\}\\cup\\{2\\}")."""
    if not (s.startswith("\\{") and s.endswith("\\}")):
        return False
    depth = 0
    for match in re.finditer(r"\\[{}]", s):
        depth += 1 if match.group() == "\\{" else -1
        if depth == 0:
            return match.end() == len(s)
    return False


def _top_level_items(s: str) -> list[str]:
    """A normalised answer split at commas outside brackets; a whole `\\{...\\}` set is split
    inside. "(1,2]" is one item, "1,2" and "\\{1,2\\}" are two."""
    if _is_one_set(s):
        s = s[2:-2]
    items, depth, start = [], 0, 0
    for i, char in enumerate(s):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(s[start:i])
            start = i + 1
    items.append(s[start:])
    return items


def _math_verify_is_sound(prediction: str, ground_truth: str) -> bool:
    """Whether math-verify's verdict on this pair can be trusted (module docstring, path 3)."""
    def items(answer: str) -> list[str]:
        # "x = 1 \text{ or } x = 2" lists two answers, as "x = 1, x = 2" does
        return _top_level_items(normalize_answer(re.sub(r"\\text\s*\{\s*(?:or|and)\s*\}", ",", answer)))

    pred_items, gold_items = items(prediction), items(ground_truth)
    if len(pred_items) != len(gold_items):
        return False  # "3, 3" vs "3": math-verify compares the sets {3} and {3}
    if len(set(pred_items)) != len(pred_items) or len(set(gold_items)) != len(gold_items):
        return False  # "3, 4, 4" vs "3, 3, 4": the same set, not the same answer
    if any(_UNITS_RE.search(item) for item in pred_items + gold_items):
        return False  # "x + 2m": a variable we kept, math-verify would drop as a unit (metres)
    for these, others in ((pred_items, gold_items), (gold_items, pred_items)):
        if any(_EQUALS_RE.search(item) for item in others):
            continue  # equations on both sides: math-verify compares the equations
        for item in these:
            sides = _EQUALS_RE.split(item)
            if len(sides) > 1 and (len(sides) != 2 or not _VARIABLE_RE.fullmatch(sides[0])):
                return False  # "3 = 5", "x^2 = 4": math-verify would grade the right-hand side
    return True


def math_verify_equal(prediction: str, ground_truth: str, timeout_s: int) -> bool:
    """Symbolic equivalence by math-verify; False when it cannot parse either side.

    math-verify's time limit is `signal.alarm`, which only works in a main thread; in other
    threads it runs without one (the scoring pool's per-item timeout is the backstop there).
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    limit = timeout_s if threading.current_thread() is threading.main_thread() else None
    targets = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold = parse(f"${ground_truth}$", extraction_config=targets, parsing_timeout=limit)
    pred = parse(f"${prediction}$", extraction_config=targets, parsing_timeout=limit)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=limit))


def grade_math(
    response: str,
    ground_truth: str,
    *,
    strict_box: bool = True,
    thinking: bool = False,
    use_math_verify: bool = True,
    math_verify_timeout_s: int = 5,
    answer_tail_chars: int = 100,
) -> GradeResult:
    """Score one response against its ground truth (see module docstring)."""
    text = response
    if thinking:
        if response.count("</think>") != 1:
            return GradeResult(score=0.0, prediction=None, format_ok=False)
        text = response.split("</think>", 1)[1]
    text = text[-answer_tail_chars:] if answer_tail_chars > 0 else text
    prediction = last_boxed(text)
    if prediction is None and not strict_box:
        prediction = answer_line(text)
    if prediction is None or not prediction.strip():
        return GradeResult(score=0.0, prediction=prediction)
    ground_truth = str(ground_truth)
    if prediction.strip() == ground_truth.strip():
        return GradeResult(score=1.0, prediction=prediction, path="exact")
    pred_norm, gold_norm = normalize_answer(prediction), normalize_answer(ground_truth)
    if pred_norm == gold_norm and pred_norm:
        return GradeResult(score=1.0, prediction=prediction, path="exact")
    pred_num, gold_num = _as_number(pred_norm), _as_number(gold_norm)
    if pred_num is not None and gold_num is not None:
        # "50\%" normalises to 50 but also means 0.5: accept either reading of a percentage
        equal = not _readings(pred_num, "%" in prediction).isdisjoint(_readings(gold_num, "%" in ground_truth))
        return GradeResult(score=float(equal), prediction=prediction, path="numeric")
    if (
        use_math_verify
        and _math_verify_is_sound(prediction, ground_truth)
        and math_verify_equal(prediction, ground_truth, math_verify_timeout_s)
    ):
        return GradeResult(score=1.0, prediction=prediction, path="math_verify")
    return GradeResult(score=0.0, prediction=prediction, path="math_verify" if use_math_verify else "exact")
