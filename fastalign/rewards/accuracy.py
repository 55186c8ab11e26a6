r"""Math answer checking: the R1 accuracy rule reward.

The final answer is extracted from the completion (``<answer>...</answer>``, the last ``\boxed{...}`` with nested
braces, or GSM8K's ``#### n``), the gold answer from the dataset's ``solution`` column (the same markers when it
has them, else the whole string), and the two are compared as *values*: exact rationals for plain numbers
(``1,234`` = ``1234``, ``3/4`` = ``0.75``, ``50%`` = ``0.5``), else sympy expressions compared numerically (with
random values for free symbols), never as raw strings.

Safety: answers are converted by a small LaTeX-to-sympy translator that only emits numbers, single-letter
symbols, a whitelist of functions and ``+ - * / ** ( )``; anything else is "unparseable" (so sympy's
``parse_expr`` never evaluates arbitrary code). Sympy only sees short strings (``MAX_EXPRESSION_CHARS``), is
parsed with ``evaluate=False`` and rejected when its tree is large or has huge/nested exponents, and is then
evaluated numerically (``evalf``) rather than simplified; in the main thread a ``SIGALRM`` timer additionally
bounds each comparison (``TIME_LIMIT_S``). Every failure counts as "not equal"; nothing raises.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import re
import signal
import threading
from collections.abc import Iterator, Sequence
from fractions import Fraction
from typing import Any

from fastalign.rewards.base import completion_texts

MAX_ANSWER_CHARS = 1000
MAX_EXPRESSION_CHARS = 200
MAX_TREE_NODES = 200
MAX_EXPONENT = 1000
TIME_LIMIT_S = 2.0
REL_TOL = 1e-6
ABS_TOL = 1e-9

# --------------------------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------------------------

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_GSM8K = re.compile(r"####\s*([^\n]*)")
_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*")


def _brace_group(text: str, start: int) -> tuple[str, int] | None:
    """The content of the ``{...}`` group opening at ``text[start]`` and the index after it (nested braces;
    ``\\{`` / ``\\}`` are escaped characters, not braces)."""
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


def _last_boxed(text: str) -> str | None:
    last = None
    for m in _BOXED.finditer(text):
        group = _brace_group(text, m.end())
        if group is not None:
            last = group[0]
        else:  # ``\boxed 5``: the next token
            tail = re.match(r"[A-Za-z0-9.+-]+", text[m.end() :])
            if tail:
                last = tail.group(0)
    return last


def extract_answer(text: str) -> str | None:
    r"""The final answer marked in ``text``, or ``None`` when there is no marker.

    Order: the last ``<answer>...</answer>`` block (inside it, a ``\boxed{}`` / ``####`` answer when present,
    else the whole block); else the last ``\boxed{...}`` / ``\fbox{...}`` (nested braces); else the text after
    the last ``####`` up to the end of its line (GSM8K).
    """
    if not isinstance(text, str) or not text:
        return None
    tags = _ANSWER_TAG.findall(text)
    if tags:
        inner = tags[-1]
        marked = _last_boxed(inner)
        if marked is None:
            gsm = _GSM8K.findall(inner)
            marked = gsm[-1] if gsm else None
        return (marked if marked is not None else inner).strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    gsm = _GSM8K.findall(text)
    if gsm:
        return gsm[-1].strip()
    return None


def extract_gold(solution: str) -> str:
    """The gold answer of a ``solution`` cell: the marked answer when it has a marker, else the whole string."""
    solution = "" if solution is None else str(solution)
    marked = extract_answer(solution)
    return (marked if marked is not None else solution).strip()


# --------------------------------------------------------------------------------------------------------------
# LaTeX -> sympy text
# --------------------------------------------------------------------------------------------------------------


class _UnparseableError(Exception):
    pass


_DROP_COMMANDS = {
    "left",
    "right",
    "big",
    "Big",
    "bigg",
    "Bigg",
    "bigl",
    "bigr",
    "Bigl",
    "Bigr",
    "biggl",
    "biggr",
    "displaystyle",
    "textstyle",
    "scriptstyle",
    "limits",
    "nolimits",
    "quad",
    "qquad",
    "mathclose",
    "mathopen",
}
_TEXT_COMMANDS = {"text", "textrm", "textbf", "textit", "mathrm", "mathbf", "mathit", "mbox", "operatorname", "mathsf"}
_SYMBOL_COMMANDS = {
    "cdot": "*",
    "times": "*",
    "ast": "*",
    "div": "/",
    "pi": " pi ",
    "infty": " oo ",
    "infinity": " oo ",
    "sin": " sin ",
    "cos": " cos ",
    "tan": " tan ",
    "cot": " cot ",
    "sec": " sec ",
    "csc": " csc ",
    "ln": " log ",
    "log": " log ",
    "exp": " exp ",
    "arcsin": " asin ",
    "arccos": " acos ",
    "arctan": " atan ",
    "lbrace": "{",
    "rbrace": "}",
    "lparen": "(",
    "rparen": ")",
    "lbrack": "[",
    "rbrack": "]",
    "circ": "",
    "degree": "",
    "%": "%",
    "$": "",
    ",": " ",
    "!": "",
    ";": " ",
    ":": " ",
    " ": " ",
    "{": "[",
    "}": "]",
}
_ALLOWED_NAMES = {"sqrt", "pi", "oo", "log", "exp", "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan"}


def _command(text: str, i: int) -> tuple[str, int]:
    """The LaTeX command starting at ``text[i] == '\\'``: its name and the index after it."""
    j = i + 1
    if j < len(text) and text[j].isalpha():
        while j < len(text) and text[j].isalpha():
            j += 1
        return text[i + 1 : j], j
    return text[i + 1 : j + 1], j + 1


def _argument(text: str, i: int) -> tuple[str, int]:
    """One LaTeX argument at ``text[i]`` (after spaces): a ``{group}``, a command, or a single character."""
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        raise _UnparseableError("missing argument")
    if text[i] == "{":
        group = _brace_group(text, i)
        if group is None:
            raise _UnparseableError("unbalanced braces")
        return group
    if text[i] == "\\":
        _, j = _command(text, i)
        return text[i:j], j
    return text[i], i + 1


def _latex_to_sympy(text: str, depth: int = 0) -> str:
    """Translate the LaTeX of one answer to sympy syntax; raise ``_UnparseableError`` for anything unknown."""
    if depth > 20:
        raise _UnparseableError("nested too deeply")
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            name, j = _command(text, i)
            if name in ("frac", "dfrac", "tfrac", "cfrac"):
                num, j = _argument(text, j)
                den, j = _argument(text, j)
                out.append(f"(({_latex_to_sympy(num, depth + 1)})/({_latex_to_sympy(den, depth + 1)}))")
            elif name == "sqrt":
                index = None
                k = j
                while k < len(text) and text[k] == " ":
                    k += 1
                if k < len(text) and text[k] == "[":
                    end = text.find("]", k)
                    if end < 0:
                        raise _UnparseableError("unbalanced sqrt index")
                    index, j = text[k + 1 : end], end + 1
                arg, j = _argument(text, j)
                inner = _latex_to_sympy(arg, depth + 1)
                if index is None:
                    out.append(f" sqrt({inner})")
                else:
                    out.append(f"(({inner})**(1/({_latex_to_sympy(index, depth + 1)})))")
            elif name in _TEXT_COMMANDS:
                arg, j = _argument(text, j)
                out.append(" " + _latex_to_sympy(arg, depth + 1) + " ")
            elif name in _DROP_COMMANDS:
                # \left( \right. \big| ...: keep the delimiter that follows, drop the sizing command
                k = j
                while k < len(text) and text[k] == " ":
                    k += 1
                if k < len(text) and text[k] == ".":
                    k += 1
                j = k
            elif name in _SYMBOL_COMMANDS:
                out.append(_SYMBOL_COMMANDS[name])
            else:
                raise _UnparseableError(f"unknown command \\{name}")
            i = j
        elif ch == "^":
            arg, j = _argument(text, i + 1)
            if arg in ("\\circ", "{\\circ}", "\\degree"):
                i = j
                continue
            out.append(f"**({_latex_to_sympy(arg, depth + 1)})")
            i = j
        elif ch == "{":
            group = _brace_group(text, i)
            if group is None:
                raise _UnparseableError("unbalanced braces")
            inner, j = group
            out.append("(" + _latex_to_sympy(inner, depth + 1) + ")" if inner.strip() != "," else "")
            i = j
        elif ch in "}":
            raise _UnparseableError("unbalanced braces")
        elif ch in "$~":
            i += 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_NUMBER_WITH_UNIT = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))\s*[A-Za-z]{2,}(?:\s+[A-Za-z]+)*\.?$")
_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*|\.\d+)|([A-Za-z]+)|(\*\*|[-+*/()]))")


def _plain_number(s: str) -> Fraction | None:
    s = s.strip()
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if _NUMBER.match(s):
        try:
            return Fraction(s)
        except (ValueError, ZeroDivisionError, OverflowError):
            return None
    if s.count("/") == 1:
        a, b = (_plain_number(p) for p in s.split("/"))
        if a is not None and b is not None and b != 0 and "/" not in s.split("/")[0]:
            return a / b
    return None


def _normalize(answer: str) -> str:
    s = answer.strip()
    s = re.sub(r"\\[\[\]()]", "", s)  # \( \) \[ \]
    s = s.replace("\\!", "").replace("{,}", "").replace("\\%", "%").replace("\\$", "")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)
    s = re.sub(r"\\(?:text|mathrm)\{\s*\}", "", s)
    s = s.strip().rstrip(".").strip()
    s = s.strip("$").strip()
    # "x = 5", "a_1 = 5": the right-hand side
    m = re.match(r"^\\?[A-Za-z](?:_\{?\w+\}?)?\s*=\s*(.+)$", s, re.DOTALL)
    if m:
        s = m.group(1).strip()
    # a number followed by a unit written as \text{...}: drop the unit
    m = re.match(r"^(.*?\d)\s*\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z ]*\}$", s)
    if m:
        s = m.group(1).strip()
    m = _NUMBER_WITH_UNIT.match(s)
    if m:
        s = m.group(1)
    return s


def _split_top_level(s: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts


# --------------------------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------------------------

_Value = Any  # Fraction | sympy.Expr | tuple[str, list[list[_Value]]] (brackets, elements of candidates)


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise ``TimeoutError`` after ``seconds`` (main thread on Unix only; elsewhere the static guards apply)."""
    usable = (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    )
    if not usable:
        yield
        return

    def _raise(signum, frame):
        raise TimeoutError("answer comparison took too long")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _sympy_expr(text: str) -> Any:
    """A sympy expression (unevaluated) from whitelisted sympy text, or raise ``_UnparseableError``."""
    import sympy
    from sympy.parsing.sympy_parser import (
        implicit_application,
        implicit_multiplication,
        parse_expr,
        standard_transformations,
    )

    if len(text) > MAX_EXPRESSION_CHARS:
        raise _UnparseableError("too long")
    pos, text = 0, text.strip()
    names = set()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise _UnparseableError(f"unexpected {text[pos]!r}")
        if m.group(2):
            names.add(m.group(2))
        pos = m.end()
    for name in names:
        if len(name) > 1 and name not in _ALLOWED_NAMES:
            raise _UnparseableError(f"unknown name {name!r}")
    local_dict: dict[str, Any] = {c: sympy.Symbol(c) for c in names if len(c) == 1}
    local_dict.update(
        {
            "e": sympy.E,
            "pi": sympy.pi,
            "oo": sympy.oo,
            "sqrt": sympy.sqrt,
            "log": sympy.log,
            "exp": sympy.exp,
            "sin": sympy.sin,
            "cos": sympy.cos,
            "tan": sympy.tan,
            "cot": sympy.cot,
            "sec": sympy.sec,
            "csc": sympy.csc,
            "asin": sympy.asin,
            "acos": sympy.acos,
            "atan": sympy.atan,
        }
    )
    transformations = (*standard_transformations, implicit_multiplication, implicit_application)
    try:
        expr = parse_expr(text, local_dict=local_dict, transformations=transformations, evaluate=False)
    except Exception as err:  # any parse failure is "unparseable"
        raise _UnparseableError(str(err)) from None
    if not isinstance(expr, sympy.Expr):
        raise _UnparseableError("not an expression")
    nodes = sum(1 for _ in itertools.islice(sympy.preorder_traversal(expr), MAX_TREE_NODES + 1))
    if nodes > MAX_TREE_NODES:
        raise _UnparseableError("expression too large")
    # exponents: bounded numeric values only, checked innermost first so that evaluating one is always cheap
    for node in sympy.postorder_traversal(expr):
        if isinstance(node, sympy.Pow) and not node.exp.free_symbols:
            value = sympy.N(node.exp, 15)
            if not value.is_number or value.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan):
                raise _UnparseableError("undefined exponent")
            if abs(complex(value)) > MAX_EXPONENT:
                raise _UnparseableError("exponent too large")
    return expr


def _element(text: str) -> list[_Value]:
    """Candidate values of one scalar answer (a percentage has two: ``p/100`` and ``p``)."""
    s = text.strip()
    if not s:
        raise _UnparseableError("empty")
    percent = s.endswith("%")
    if percent:
        s = s[:-1].strip()
    number = _plain_number(s)
    if number is not None:
        value: _Value = number
    else:
        value = _sympy_expr(_latex_to_sympy(s))
    if percent:
        return [value / 100, value]
    return [value]


def parse_answer(answer: str) -> _Value | None:
    r"""The value of an extracted answer, or ``None`` when it cannot be parsed; never raises.

    Returns a list of candidate scalars (``Fraction`` or sympy expression), or ``(brackets, [candidates, ...])``
    for a comma-separated tuple / interval / set. ``1,234`` is the number 1234 (thousands separators).
    """
    try:
        if not isinstance(answer, str) or not answer.strip() or len(answer) > MAX_ANSWER_CHARS:
            return None
        s = _normalize(answer)
        if not s:
            return None
        if _THOUSANDS.match(s):
            return [Fraction(s.replace(",", ""))]
        with _time_limit(TIME_LIMIT_S):
            brackets = ""
            body = s
            m = re.match(
                r"^(\\\{|\\left\s*\\\{|\\left\s*[(\[]|[(\[])(.*)(\\\}|\\right\s*\\\}|\\right\s*[)\]]|[)\]])$", s
            )
            if m and "," in m.group(2):
                opener, body, closer = m.group(1), m.group(2), m.group(3)
                brackets = opener[-1] + closer[-1]
            parts = _split_top_level(body)
            if len(parts) == 1 and not brackets:
                return _element(s)
            if len(parts) > 50:
                return None
            return (brackets, [_element(p) for p in parts])
    except (_UnparseableError, TimeoutError, RecursionError, ValueError, TypeError, ZeroDivisionError, OverflowError):
        return None
    except Exception:  # odd input must never crash a training step
        return None


def _as_complex(value: _Value, subs: dict | None = None) -> complex | None:
    if isinstance(value, Fraction):
        return complex(value)
    import sympy

    expr = value.xreplace(subs) if subs else value
    number = sympy.N(expr, 30)
    if number.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan) or not number.is_number:
        return None
    return complex(number)


def _scalars_equal(a: _Value, b: _Value) -> bool:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b or abs(a - b) <= max(ABS_TOL, REL_TOL * max(abs(a), abs(b)))
    import sympy

    ea = sympy.Rational(a.numerator, a.denominator) if isinstance(a, Fraction) else a
    eb = sympy.Rational(b.numerator, b.denominator) if isinstance(b, Fraction) else b
    symbols = sorted(ea.free_symbols | eb.free_symbols, key=str)
    rng = random.Random(0)
    trials = [None] if not symbols else [{s: sympy.Float(rng.uniform(0.5, 2.5)) for s in symbols} for _ in range(3)]
    for subs in trials:
        va, vb = _as_complex(ea, subs), _as_complex(eb, subs)
        if va is None or vb is None:
            # infinities, undefined values: only structurally identical expressions match
            return sympy.srepr(ea) == sympy.srepr(eb) or bool(ea == eb)
        if abs(va - vb) > max(ABS_TOL, REL_TOL * max(abs(va), abs(vb))):
            return False
    return True


def _candidates_equal(a: list[_Value], b: list[_Value]) -> bool:
    return any(_scalars_equal(x, y) for x in a for y in b)


def answers_equal(gold: _Value, answer: _Value) -> bool:
    """Whether two parsed answers (:func:`parse_answer`) are the same value; never raises."""
    try:
        with _time_limit(TIME_LIMIT_S):
            if isinstance(gold, tuple) != isinstance(answer, tuple):
                return False
            if not isinstance(gold, tuple):
                return _candidates_equal(gold, answer)
            (gb, ge), (ab, ae) = gold, answer
            if len(ge) != len(ae):
                return False
            if gb and ab:
                # intervals / tuples / sets: brackets must match; sets are unordered
                if gb != ab:
                    return False
                if gb != "{}":
                    return all(_candidates_equal(x, y) for x, y in zip(ge, ae, strict=True))
            # bare lists ("2, 3") and sets: unordered, each gold element matched once
            remaining = list(ae)
            for x in ge:
                for k, y in enumerate(remaining):
                    if _candidates_equal(x, y):
                        del remaining[k]
                        break
                else:
                    return False
            return True
    except Exception:  # TimeoutError, sympy internals, ...: not equal
        return False


def is_equivalent(gold: str, answer: str) -> bool:
    """Whether two answer strings denote the same value (both parsed with :func:`parse_answer`)."""
    g, a = parse_answer(gold), parse_answer(answer)
    return g is not None and a is not None and answers_equal(g, a)


def accuracy_reward(completions: Sequence[Any], solution: Sequence[Any], **kwargs: Any) -> list[float | None]:
    r"""1.0 when the completion's final answer equals the gold ``solution``, else 0.0 (the R1 accuracy reward).

    The completion's answer is the last ``<answer>...</answer>``, ``\boxed{...}`` or ``#### n`` (see
    :func:`extract_answer`); a completion without one scores 0.0, and so does one whose answer cannot be parsed.
    The gold answer is the same marker in ``solution`` when present, else the whole cell; a gold answer that
    cannot be parsed gives ``None`` (not applicable: the row is skipped by the weighted sum), as TRL does.

    Args:
        completions: strings or conversational completions (lists of messages).
        solution: the dataset's ``solution`` column, one entry per completion.
        **kwargs: the other columns (ignored).
    """
    texts = completion_texts(completions)
    if len(texts) != len(solution):
        raise ValueError(f"{len(texts)} completions but {len(solution)} solutions")
    rewards: list[float | None] = []
    gold_cache: dict[str, Any] = {}
    for text, sol in zip(texts, solution, strict=True):
        key = "" if sol is None else str(sol)
        if key not in gold_cache:
            gold_cache[key] = parse_answer(extract_gold(key))
        gold = gold_cache[key]
        if gold is None:
            rewards.append(None)
            continue
        extracted = extract_answer(text)
        parsed = parse_answer(extracted) if extracted is not None else None
        rewards.append(1.0 if parsed is not None and answers_equal(gold, parsed) else 0.0)
    return rewards
