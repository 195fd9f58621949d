"""DAPO's math scorer as a test oracle, and a seeded generator of math responses to fuzz the
grader against it (tests/unit/test_reward_dapo.py, bench/grader_vs_dapo.py).

The oracle is verl's own `verl/utils/reward_score/math_dapo.py` (verl==0.9.1, installed with
`--no-deps` by `make install`). That file imports only `re` and `typing`, so it is loaded by
path without importing the rest of verl (whose `__init__` needs Ray and more).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import random
import re
from types import ModuleType

from megatron_spo.rollout.rewards import last_boxed

DAPO_VERSION = "0.9.1"
DAPO_WINDOW = 100  # is_correct_strict_box reads pred[-100:] of the 300 characters compute_score keeps


def load_dapo() -> tuple[ModuleType | None, str]:
    """verl's math_dapo module, or None and the reason it is missing."""
    try:
        dist = importlib.metadata.distribution("verl")
    except importlib.metadata.PackageNotFoundError:
        return None, f"verl is not installed (make install runs: pip install --no-deps verl=={DAPO_VERSION})"
    path = dist.locate_file("verl/utils/reward_score/math_dapo.py")
    if not path.exists():
        return None, f"verl {dist.version} has no verl/utils/reward_score/math_dapo.py"
    spec = importlib.util.spec_from_file_location("verl_math_dapo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, ""


def dapo_accepts(dapo: ModuleType, response: str, ground_truth: str) -> bool:
    """DAPO's strict-box verdict, the authors' setting."""
    return bool(dapo.compute_score(response, ground_truth, strict_box_verify=True)["acc"])


# The responses DAPO's strict scorer accepts and our grader rejects on purpose; each is a wrong
# extraction on DAPO's side (math_grader's module docstring lists them too).
DAPO_FALSE_POSITIVES = {
    "spaced-box": "a later `\\boxed {x}` (whitespace before the brace) is the final answer; DAPO "
    "searches only for `\\boxed{` and grades an earlier box",
    "escaped-brace": "DAPO counts `\\{` / `\\}` as grouping braces and cuts the box in the wrong place "
    "when set notation is unbalanced; the text it compares is not the box's LaTeX argument",
    "blank-truth": "a blank ground truth equals a blank box; a blank answer is never correct",
}


def dapo_false_positive(dapo: ModuleType, response: str, ground_truth: str) -> str | None:
    """Which documented DAPO false positive explains DAPO accepting a response we reject, or
    None when none does (a bug in our grader). Decided from the response alone."""
    window = response[-DAPO_WINDOW:]
    if not ground_truth.strip():
        return "blank-truth"
    dapo_box = window.rfind("\\boxed{")
    if any(match.start() > dapo_box for match in re.finditer(r"\\boxed\s+\{", window)):
        return "spaced-box"
    boxed = dapo.last_boxed_only_string(window)
    dapo_answer = dapo.remove_boxed(boxed) if boxed else None
    if dapo_answer is not None and re.search(r"\\[{}]", dapo_answer) and last_boxed(window) != dapo_answer:
        return "escaped-brace"
    return None


# ---------------------------------------------------------------------------------------------
# The generator. Each family draws a ground truth and forms of the answer that are equivalent
# to it and forms that are wrong (the false positives of math_grader's path 2-3 among them).


@dataclasses.dataclass
class Family:
    ground_truth: str
    equivalent: list[str]
    wrong: list[str]


def _integer(rng: random.Random) -> Family:
    n = rng.choice([rng.randint(-99, 99), rng.randint(100, 99_999), rng.randint(10**11, 10**12 - 1)])
    wrong = [str(n + rng.choice([-1, 1])), f"{n}, {n}", f"{rng.randint(1, 9)} = {n}"]
    equivalent = [f"{n}.0", f"x = {n}", f"{n}\\text{{ cm}}", f"{n}^\\circ"]
    if n >= 1000:
        equivalent.append(f"{n:,}")
        wrong.append(f"{n:,}".replace(",", ", "))  # "32, 349": a list, not 32349
    return Family(str(n), equivalent, wrong)


def _large_integer(rng: random.Random) -> Family:
    n = rng.randint(10**11, 10**12 - 1)
    last = n % 10
    other = n - last + (last + rng.randint(1, 9)) % 10  # the same 12 digits but the last
    return Family(str(n), [f"{n:,}", f"{n}.00"], [str(other), f"{other:,}"])


def _decimal(rng: random.Random) -> Family:
    whole, tenths = rng.randint(0, 50), rng.randint(1, 9)
    value = f"{whole}.{tenths}"
    return Family(value, [f"{value}0", f"\\frac{{{whole * 10 + tenths}}}{{10}}"], [f"{whole}.{tenths % 9 + 1}"])


def _fraction(rng: random.Random) -> Family:
    p, q = rng.choice([(1, 2), (3, 4), (2, 3), (5, 6), (7, 8), (3, 5)])
    gt = f"\\frac{{{p}}}{{{q}}}"
    equivalent = [f"\\dfrac{{{p}}}{{{q}}}", f"{p}/{q}", f"\\frac{{{2 * p}}}{{{2 * q}}}", f"\\tfrac{{{p}}}{{{q}}}"]
    return Family(gt, equivalent, [f"\\frac{{{q}}}{{{p}}}", f"\\frac{{{p}}}{{{q + 1}}}"])


def _radical(rng: random.Random) -> Family:
    a, b = rng.choice([(2, 3), (3, 2), (2, 5), (5, 2)])
    return Family(f"{a}\\sqrt{{{b}}}", [f"\\sqrt{{{a * a * b}}}", f"{a} \\sqrt{{{b}}}"], [f"{b}\\sqrt{{{a}}}"])


def _nested(rng: random.Random) -> Family:
    n = rng.choice([2, 3])
    gt = f"\\frac{{\\sqrt{{{n}}}}}{{{n}}}"
    equivalent = [f"\\frac{{1}}{{\\sqrt{{{n}}}}}", f"\\dfrac{{\\sqrt{{{n}}}}}{{{n}}}"]
    return Family(gt, equivalent, [f"\\frac{{\\sqrt{{{n}}}}}{{{n + 1}}}"])


def _set(rng: random.Random) -> Family:
    items = sorted(rng.sample(range(-5, 10), 3))
    a, b, c = items
    gt = f"\\{{{a}, {b}, {c}\\}}"
    equivalent = [f"\\{{{c}, {a}, {b}\\}}", f"\\left\\{{{a},{b},{c}\\right\\}}"]
    wrong = [f"\\{{{a}, {b}\\}}", f"\\{{{a}, {b}, {c + 1}\\}}"]
    return Family(gt, equivalent, wrong)


def _list(rng: random.Random) -> Family:
    a, b = rng.randint(10, 99), rng.randint(100, 999)
    gt = f"{a}, {b}"
    return Family(gt, [f"{b}, {a}", f"x = {a}, x = {b}"], [f"{a}{b}", f"{a}, {a}", f"{a}, {b}, {b}"])


def _interval(rng: random.Random) -> Family:
    a = rng.randint(-5, 5)
    b = a + rng.randint(1, 5)
    gt = f"({a}, {b}]"
    return Family(gt, [f"({a},{b}]", f"\\left({a}, {b}\\right]"], [f"[{a}, {b})", f"({a}, {b + 1}]"])


def _tuple(rng: random.Random) -> Family:
    a, b = rng.randint(1, 9), -rng.randint(1, 9)
    return Family(f"({a}, {b})", [f"({a},{b})", f"\\left( {a}, {b} \\right)"], [f"({b}, {a})"])


def _matrix(rng: random.Random) -> Family:
    a, b, c, d = (rng.randint(0, 9) for _ in range(4))
    if (a, b) == (c, d):
        d = (d + 1) % 10
    gt = f"\\begin{{pmatrix}} {a} & {b} \\\\ {c} & {d} \\end{{pmatrix}}"
    equivalent = [f"\\begin{{pmatrix}}{a}&{b}\\\\{c}&{d}\\end{{pmatrix}}"]
    wrong = [f"\\begin{{pmatrix}} {c} & {d} \\\\ {a} & {b} \\end{{pmatrix}}"]
    return Family(gt, equivalent, wrong)


def _percentage(rng: random.Random) -> Family:
    n = rng.choice([5, 10, 20, 25, 40, 75])
    return Family(f"{n}\\%", [f"{n}", f"{n}%", f"0.{n:02d}"], [f"{n + 1}\\%", f"{n / 10}\\%"])


def _units(rng: random.Random) -> Family:
    n = rng.randint(2, 300)
    unit = rng.choice(["cm", "meters", "degrees", "dollars"])
    return Family(str(n), [f"{n}\\text{{ {unit}}}", f"{n} \\mbox{{{unit}}}"], [f"{n + 1}\\text{{ {unit}}}"])


def _text(rng: random.Random) -> Family:
    answer, other = rng.sample(["yes", "no", "A", "B", "C", "D"], 2)
    return Family(f"\\text{{{answer}}}", [answer, f"\\textbf{{{answer}}}"], [f"\\text{{{other}}}", other])


def _equation(rng: random.Random) -> Family:
    m, c = rng.sample(range(2, 10), 2)  # distinct, so "y = cx + m" differs
    gt = f"y = {m}x + {c}"
    return Family(gt, [f"y={m}x+{c}", f"y = {c} + {m}x"], [f"y = {m}x - {c}", f"y = {c}x + {m}"])


def _thousands(rng: random.Random) -> Family:
    n = rng.randint(1, 999) * 1000 + rng.randint(100, 999)
    return Family(f"{n:,}", [str(n), f"{n}.0"], [str(n + 1), f"{n:,}".replace(",", ", ")])


FAMILIES = [_integer, _large_integer, _decimal, _fraction, _radical, _nested, _set, _list, _interval,
            _tuple, _matrix, _percentage, _units, _text, _equation, _thousands]

_WORDS = ("so", "we", "get", "the", "sum", "of", "both", "terms", "then", "check", "that", "it", "works",
          "for", "all", "cases", "let", "$x$", "$n = 3$", "hence", "which", "gives", "a", "value")


def _prose(rng: random.Random, max_chars: int) -> str:
    words, size = [], 0
    target = rng.randint(0, max_chars)
    while size < target:
        words.append(rng.choice(_WORDS))
        size += len(words[-1]) + 1
    return " ".join(words)


@dataclasses.dataclass
class Case:
    response: str
    ground_truth: str
    expected: int
    """What a careful grader following math_grader's rules says; DAPO is not consulted."""
    kind: str
    """How the final answer was written, then the trailing text: "boxed/prose", ..."""


def generate_cases(count: int, seed: int = 0) -> list[Case]:
    """`count` responses with ground truths, reproducible from `seed`."""
    rng = random.Random(seed)
    return [_case(rng) for _ in range(count)]


def _case(rng: random.Random) -> Case:
    family = rng.choice(FAMILIES)(rng)
    gt = family.ground_truth
    roll = rng.random()
    if roll < 0.65:
        answer, correct = gt, True
    elif roll < 0.82:
        answer, correct = rng.choice(family.equivalent), True
    else:
        answer, correct = rng.choice(family.wrong), False
    wrong = rng.choice(family.wrong)

    form = rng.choices(["boxed", "spaced", "fbox", "bare", "answer-line", "unclosed", "none"],
                       weights=[70, 5, 5, 4, 4, 4, 3])[0]
    if form == "bare" and not re.fullmatch(r"[^\s${}\\]+", answer):
        form = "boxed"
    final = {
        "boxed": rng.choice(["\\boxed{{{}}}", "$\\boxed{{{}}}$", "\\[\\boxed{{{}}}\\]"]),
        "spaced": "$\\boxed {{{}}}$",
        "fbox": "\\fbox{{{}}}",
        "bare": "$\\boxed {}$",
        "answer-line": "Answer: {}",
        "unclosed": "\\boxed{{{}",
        "none": "the answer is {}",
    }[form].format(answer)

    head, earlier_boxes = "", []  # earlier_boxes: where each earlier (wrong) \boxed{...} starts
    if rng.random() < 0.3:  # a thinking block, sometimes with a (wrong) box in it
        head = f"<think>{_prose(rng, 200)}"
        if rng.random() < 0.5:
            earlier_boxes.append(len(head) + len(" maybe "))
            head += f" maybe \\boxed{{{wrong}}}?"
        head += f" {_prose(rng, 80)}</think>"
    lead = head + _prose(rng, 300) + " "
    if rng.random() < 0.25:
        earlier_boxes.append(len(lead) + len("First I got "))
        lead += f"First I got \\boxed{{{wrong}}}, but that fails. "
    lead += f"{rng.choice(['So', 'Therefore', 'Thus'])} the answer is "

    trailing = rng.choices(
        ["none", "period", "prose", "bare-word", "trailing-bare", "fbox-after", "spaced-after", "think-close",
         "filler"],
        weights=[3, 2, 2, 2, 2, 2, 1, 1, 3])[0]
    tail = {
        "none": "",
        "period": ".",
        "prose": " Hope this helps.",
        "bare-word": " I wrote \\boxed to mark it.",
        "trailing-bare": " \\boxed",
        "fbox-after": f" (check: \\fbox{{{wrong}}})",
        "spaced-after": f" Correction: $\\boxed {{{wrong}}}$",
        "think-close": "</think>",
        "filler": " " + _prose(rng, 120),
    }[trailing]
    response = lead + final + tail
    window_start = len(response) - DAPO_WINDOW  # the grader's default window is DAPO's
    box_command = re.search(r"\\(?:boxed|fbox)", final)
    final_box = len(lead) + (box_command.start() if box_command else 0)
    later_box = len(lead) + len(final) + tail.find("\\")  # where a box in the tail starts

    expected = int(correct)
    if form in ("answer-line", "unclosed", "none") or final_box < window_start:
        expected = 0  # no box read (an unclosed last \boxed{ is a truncated response), or a wrong one
    elif form in ("fbox", "bare") and any(start >= window_start for start in earlier_boxes):
        expected = 0  # an earlier \boxed{...} outranks \fbox{...} and the "\boxed x" form
    if trailing == "spaced-after" and later_box >= window_start:
        expected = 0  # the correction is the final answer
    if trailing == "fbox-after" and form in ("fbox", "bare", "none", "answer-line") and later_box >= window_start:
        expected = 0  # the last \fbox is read when there is no \boxed{...}
    if trailing == "bare-word" and form == "bare":
        expected = 0  # "\boxed to": the last "\boxed x" form reads "to"
    return Case(response, gt, expected, f"{form}/{trailing}")
