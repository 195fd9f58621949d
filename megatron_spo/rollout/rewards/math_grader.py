"""Math answer grading: extract the final answer from a response and decide if it is correct.

Reward (DESIGN.md, "Reward (math)"; the authors use verl's DAPO math scorer with strict box
verification, seed 001):

    r = 0                                  if thinking is on and count("</think>") != 1
    r = 1[ answer(response) ≡ ground_truth ]  otherwise, binary {0, 1}

`answer(response)` is the content of the last `\\boxed{...}` (or `\\fbox{...}`), braces nested
to any depth, searched in the last `answer_tail_chars` characters of the text after `</think>`.
With `strict_box` off, a last "Answer: ..." line is accepted when there is no box (the
Minerva-style fallback the authors' non-strict path uses).

Equivalence `≡`, cheapest first:
  1. exact: the normalised strings are equal (spaces, `\\left`/`\\right`, `\\dfrac`/`\\tfrac`,
     `\\text{}` units and unit words, `^\\circ`, `\\%`, `\\$`, thousands separators, a trailing
     ".", `x = ` prefixes, unicode minus/times/pi/sqrt and full-width digits are normalised);
  2. numeric: both normalised strings are decimal or scientific numbers (`1.5e3`,
     `1.5\\times10^{3}`) equal to 1e-9 relative (a percentage may also be read as /100);
  3. symbolic: `math-verify` (HF's LaTeX -> SymPy grader) parses both and compares them
     (fractions vs decimals, radicals, intervals, sets, matrices, percentages), under its own
     per-call time limit. Deliberate difference from the upstream scorer: the upstream strict
     path is string equality only; we add 2-3 so `\\frac{1}{2}` and `0.5` agree.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
import unicodedata

_BOX_COMMANDS = ("\\boxed", "\\fbox")


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


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (nested braces), or `\\boxed x` form.

    Returns None when there is no box or the last box's braces never close (malformed LaTeX).
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    command = next(cmd for cmd in _BOX_COMMANDS if text.startswith(cmd, start))
    i = start + len(command)
    rest = text[i:]
    after_spaces = rest.lstrip(" \t")
    if not after_spaces.startswith("{"):
        if not rest.startswith(" "):
            return None  # "\boxed" without an argument
        match = re.match(r"\s*([^\s$]+)", rest)  # "\boxed 5": up to the next space or "$"
        return match.group(1) if match else None
    i += len(rest) - len(after_spaces)
    depth, j = 0, i
    while j < len(text):
        char = text[j]
        if char == "\\":  # a command or an escaped brace (\{ \}): never counts as nesting
            j += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None


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
_TEXT_RE = re.compile(r"\\(?:text|textbf|mbox|mathrm|textrm|operatorname)\s*\{([^{}]*)\}")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SCI_RE = re.compile(r"^(-?\d+(?:\.\d+)?)(?:\\times|\\cdot|\*|x)10\^\{?(-?\d+)\}?$")


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
    s = re.sub(r"(?<=[\d}])\s*\\(?:text|mbox|mathrm)\s*\{\s*[a-zA-Z\s]+\}(?:\^\{?\d\}?)?\s*$", "", s)
    s = _TEXT_RE.sub(r"\1", s)
    s = _UNITS_RE.sub("", s).strip()
    # "x = 5", "k=5" -> "5" (a single short left-hand side only; "x+y=5" stays an equation)
    if s.count("=") == 1 and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=")[1]
    s = s.strip().rstrip(".").strip()
    s = re.sub(r"\s+", "", s)
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    # \frac12 -> \frac{1}{2}, \sqrt3 -> \sqrt{3}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    s = re.sub(r"(?<![\d])\.(\d)", r"0.\1", s)  # ".5" -> "0.5"
    return s


def _as_number(s: str) -> float | None:
    sci = _SCI_RE.match(s)
    if sci:
        s = f"{sci.group(1)}e{sci.group(2)}"
    if not re.fullmatch(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", s):
        return None
    try:
        return float(s)
    except ValueError:
        return None


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
    answer_tail_chars: int = 300,
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
    pred_norm, gold_norm = normalize_answer(prediction), normalize_answer(str(ground_truth))
    if pred_norm == gold_norm and pred_norm:
        return GradeResult(score=1.0, prediction=prediction, path="exact")
    pred_num, gold_num = _as_number(pred_norm), _as_number(gold_norm)
    if pred_num is not None and gold_num is not None:
        # "50\%" normalises to 50 but also means 0.5: accept either reading of a percentage
        pred_values = {pred_num, pred_num / 100} if "%" in prediction else {pred_num}
        gold_values = {gold_num, gold_num / 100} if "%" in str(ground_truth) else {gold_num}
        equal = any(math.isclose(p, g, rel_tol=1e-9, abs_tol=1e-12) for p in pred_values for g in gold_values)
        return GradeResult(score=float(equal), prediction=prediction, path="numeric")
    if use_math_verify and math_verify_equal(prediction, str(ground_truth), math_verify_timeout_s):
        return GradeResult(score=1.0, prediction=prediction, path="math_verify")
    return GradeResult(score=0.0, prediction=prediction, path="math_verify" if use_math_verify else "exact")
