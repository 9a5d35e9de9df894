"""The rule-based verifier: R_i = 1 if response i's final answer equals the gold answer.

SDPG's outcome term needs only a scalar reward per response. For math with a single
final answer that reward is a rule: pull the final answer out of the completion, put
both it and the gold answer in a canonical form, compare.

Extraction, first rule that finds something wins:
  1. the last balanced \\boxed{...} (or \\fbox{...}), nested braces allowed, braces that
     wrap the whole answer dropped (\\boxed{{5}} is 5);
  2. GSM8K's "#### 42";
  3. "... the answer is 42";
  4. optionally (on by default, off for MATH-style data) the last number in the text.
The format the prompt's instruction asks for (`answer_format`) moves to the front.

Comparison: numbers compare as exact fractions with a 1e-6 relative tolerance
(0.5 = \\frac12 = 1/2; "%", "$", units and thousands separators are dropped, so
50% = 50 and $1,234 = 1234), anything else compares as a normalised string.

Model output is text and only ever text: nothing is eval'ed, no sympy, and every step
is a bounded scan: at most MAX_TRIES boxes of at most MAX_BOX characters, answers
longer than MAX_BOX compare as exact text, numbers longer than MAX_DIGITS digits as
strings. Any string, 1 MB of "{" included, is verified in milliseconds, never raising.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

MAX_BOX = 1000  # longest \boxed{...} content we look at
MAX_TRIES = 20  # how many \boxed occurrences, from the end, may be unbalanced before giving up
MAX_DIGITS = 100  # longer numbers compare digit-for-digit as strings
REL_TOL = Fraction(1, 10**6)

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BRACE = re.compile(r"[{}]")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_FRAC_BRACED = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_DIGITS = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
_NUMBER = re.compile(r"^-?(\d+\.?\d*|\.\d+)$")
_FRACTION = re.compile(r"^(-?)\(?(-?[\d.]+)\)?/\(?(-?[\d.]+)\)?$")
_NUMBER_THEN_WORDS = re.compile(r"^(-?[\d.,/]*\d)\s*[a-zA-Z][a-zA-Z .]*$")
_LAST_NUMBER_REVERSED = re.compile(r"\d[\d.,]*-?")  # the last number, read backwards
_FIRST_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+)?")


@dataclass
class Verdict:
    """What the verifier found, for logging: the reward and why."""

    reward: float
    extracted: str | None  # the answer pulled from the completion, as written
    method: str  # "boxed", "####", "answer is", "last number" or "none"
    reason: str


def _box_content(text: str, start: int) -> str | None:
    """Content of the brace group opening at or after `start` (spaces allowed), if balanced."""
    i = start
    while i < len(text) and i - start < 10 and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    window = text[i : i + MAX_BOX + 2]
    for m in _BRACE.finditer(window):
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return window[1 : m.start()]
    return None


def _last_boxed(text: str) -> str | None:
    """The content of the last balanced \\boxed{...} or \\fbox{...}."""
    end = len(text)
    for _ in range(MAX_TRIES):
        hits = [(text.rfind(cmd, 0, end), cmd) for cmd in _BOX_COMMANDS]
        pos, cmd = max(hits)
        if pos < 0:
            return None
        content = _box_content(text, pos + len(cmd))
        if content is not None:
            return content
        end = pos
    return None


def _unwrap_braces(content: str) -> str:
    """'{{5}}' -> '5': drop brace pairs that wrap the whole answer (some models double them)."""
    content = content.strip()
    while content.startswith("{"):
        inner = _box_content(content, 0)
        if inner is None or len(inner) != len(content) - 2:  # '{a}{b}' is not wrapped
            break
        content = inner.strip()
    return content


def _last_number(text: str) -> str | None:
    """The last number in the text, found by one regex search over the reversed string."""
    m = _LAST_NUMBER_REVERSED.search(text[::-1])
    return m.group()[::-1].rstrip(".,") if m else None


def _boxed(text: str) -> str | None:
    boxed = _last_boxed(text)
    return None if boxed is None else _unwrap_braces(boxed)


def _hashes(text: str) -> str | None:
    pos = text.rfind("####")
    return None if pos < 0 else text[pos + 4 :].split("\n", 1)[0][:MAX_BOX].strip()


def _answer_is(text: str) -> str | None:
    pos = text.lower().rfind("answer is")
    if pos < 0:
        return None
    tail = text[pos + 9 : pos + 9 + MAX_BOX].split("\n", 1)[0].lstrip(" :$")
    number = _FIRST_NUMBER.match(tail)  # "42, because ..." -> "42"
    return (number.group() if number else tail.split(". ", 1)[0]).strip()


EXTRACTORS = {"boxed": _boxed, "####": _hashes, "answer is": _answer_is}  # in the order tried


def answer_format(instruction: str) -> str | None:
    """The stated-answer format an instruction asks for ('boxed', '####', 'answer is'), or
    None when it names none of them."""
    lowered = instruction.lower()
    for name, marker in (("boxed", "\\boxed"), ("####", "####"), ("answer is", "answer is")):
        if marker in lowered:
            return name
    return None


def extract_answer(
    completion: str, last_number_fallback: bool = True, prefer: str | None = None
) -> tuple[str | None, str]:
    """(answer as written, method) from a completion; (None, "none") if nothing is found.
    `prefer` (a format the prompt asked for) is tried before the others: asked for "The
    answer is N", a response that also holds an empty \\boxed{} is read by its answer line."""
    text = completion.replace("\u2212", "-")
    order = sorted(EXTRACTORS, key=lambda name: name != prefer)  # stable: the rest keep their order
    for name in order:
        found = EXTRACTORS[name](text)
        if found is not None:
            return found, name
    if last_number_fallback:
        number = _last_number(text)
        if number is not None:
            return number, "last number"
    return None, "none"


def normalize(answer: str) -> str:
    """Canonical text of an answer: no LaTeX decoration, units, $, %, or separators."""
    s = answer.replace("\u2212", "-").replace("\x00", "")
    s = _TEXT_CMD.sub(r"\1", s)
    s = _FRAC_BRACED.sub(r"(\1)/(\2)", s)
    s = _FRAC_DIGITS.sub(r"\1/\2", s)
    for junk in (
        "\\left",
        "\\right",
        "\\!",
        "\\,",
        "\\;",
        "\\ ",
        "\\$",
        "\\%",
        "$",
        "%",
        "^\\circ",
        "^{\\circ}",
        "°",
    ):
        s = s.replace(junk, "")
    s = s.strip().rstrip(".").strip()
    if s.startswith("+"):
        s = s[1:]
    m = _NUMBER_THEN_WORDS.match(s)
    if m:  # "72 dollars", "5 cm" -> the number
        s = m.group(1)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    s = s.replace(" ", "")
    return s.lower()


def to_number(s: str) -> Fraction | None:
    """An exact Fraction for '12', '-0.5', '.5', '3/4', '(1)/(2)'; None for anything else."""
    if sum(c.isdigit() for c in s[: 4 * MAX_DIGITS]) > MAX_DIGITS or len(s) > 4 * MAX_DIGITS:
        return None
    if _NUMBER.match(s):
        return Fraction(s)
    m = _FRACTION.match(s)
    if m and _NUMBER.match(m.group(2)) and _NUMBER.match(m.group(3)):
        den = Fraction(m.group(3))
        if den == 0:
            return None
        value = Fraction(m.group(2)) / den
        return -value if m.group(1) else value
    return None


def parse_gold(gold: str) -> str:
    """The gold answer: after '####' for GSM8K-style solutions, else the text as given."""
    pos = gold.rfind("####")
    return gold[pos + 4 :].strip() if pos >= 0 else gold.strip()


def answers_match(pred: str, gold: str) -> bool:
    """Numeric equality within REL_TOL, else string equality after normalisation."""
    if max(len(pred), len(gold)) > MAX_BOX:  # no real answer is this long: exact text only
        return pred.strip() == gold.strip()
    p, g = normalize(pred), normalize(gold)
    pn, gn = to_number(p), to_number(g)
    if pn is not None and gn is not None:
        return pn == gn if gn == 0 else abs(pn - gn) <= REL_TOL * abs(gn)
    return p == g and p != ""


def verify(
    completion: str, gold: str, last_number_fallback: bool = True, prefer: str | None = None
) -> Verdict:
    """Extract the final answer from `completion` (trying the format `prefer` first) and
    compare it with `gold`."""
    answer, method = extract_answer(completion, last_number_fallback, prefer)
    if answer is None:
        return Verdict(0.0, None, method, "no final answer found")
    target = parse_gold(gold)
    if answers_match(answer, target):
        return Verdict(1.0, answer, method, "match")
    shown = [normalize(x[:MAX_BOX])[:50] for x in (answer, target)]
    return Verdict(0.0, answer, method, f"{shown[0]!r} != {shown[1]!r}")


def reward(completion: str, gold: str) -> float:
    """1.0 if the completion's final answer equals the gold answer, else 0.0."""
    return verify(completion, gold).reward


def make_verifier(
    name: str = "rule", last_number_fallback: bool = True, prefer: str | None = None
) -> Callable[[str, str], Verdict]:
    """The Verdict function for --verifier: 'rule' (this module, reading the format
    `prefer` first: the one the instruction asks for) or 'math-verify' (HF's, whose
    extraction is its own: the Verdict says only the reward)."""
    if name == "rule":
        return lambda completion, gold: verify(completion, gold, last_number_fallback, prefer)
    if name == "math-verify":
        import math_verify  # the command line checks it is installed before any model work

        def math_verify_verdict(completion: str, gold: str) -> Verdict:
            gold_parsed = math_verify.parse(parse_gold(gold))
            r = float(math_verify.verify(gold_parsed, math_verify.parse(completion)))
            return Verdict(r, None, "math-verify", "match" if r else "no match")

        return math_verify_verdict
    raise ValueError(f"unknown verifier {name!r}: choose 'rule' or 'math-verify'")


def make_reward_fn(name: str = "rule", last_number_fallback: bool = True) -> Callable[[str, str], float]:
    """R(completion, gold) in {0, 1} from `make_verifier`."""
    verdict = make_verifier(name, last_number_fallback)
    return lambda completion, gold: verdict(completion, gold).reward
