"""Verifiable rewards for GRPO: final-answer extraction, math answer equality, and reward functions
with TRL's signature.

References:
- Hendrycks, Burns, Kadavath, Arora, Basart, Tang, Song, Steinhardt, "Measuring Mathematical Problem
  Solving With the MATH Dataset", arXiv:2103.03874, https://arxiv.org/abs/2103.03874 (`\\boxed{}`
  final answers; its `last_boxed_only_string` and `is_equiv` normalisation).
- Lewkowycz et al., "Solving Quantitative Reasoning Problems with Language Models" (Minerva),
  arXiv:2206.14858, https://arxiv.org/abs/2206.14858 (`normalize_final_answer`: units, `\\text`,
  shorthands, `x =`).
- Cobbe, Kosaraju, Bavarian et al., "Training Verifiers to Solve Math Word Problems" (GSM8K),
  arXiv:2110.14168, https://arxiv.org/abs/2110.14168 (`#### <number>` references).
- DeepSeek-AI, "DeepSeek-R1: Incentivizing Reasoning Capability in LLMs via Reinforcement
  Learning", arXiv:2501.12948, https://arxiv.org/abs/2501.12948 (rule-based accuracy and format
  rewards).

A reward function follows TRL's convention, so TRL reward functions work here and these work in
TRL: `fn(prompts, completions, **row_fields) -> list[float]`, called with keywords, one float per
completion; a completion is a string, or a conversation (list of message dicts) whose last
message's content is the text.

Equality is decided by `math_answers_equal`: both answers are normalised as strings (spacing,
`\\left`/`\\right`, `\\dfrac`, shorthands, units, degrees, percent and currency signs, thousands
separators, a leading `x =`), split into elements (tuples, intervals, sets, matrices, unions), and
each pair of elements is equal as strings, as exact rational numbers, or as expressions. Expressions
go through a small parser written here (never `eval`, `sympify` or `parse_expr`, which evaluate
Python code, and sympy's LaTeX parser needs antlr4), bounded in length, depth and exponent sizes so
that a hostile completion cannot hang a reward. Expressions with variables are compared by
evaluation in complex floating point at three random points (relative tolerance 1e-9), which also
sees identities like sin^2 x + cos^2 x = 1; constant expressions likewise, or exactly with sympy when
it is importable (optional: rationals exactly, so 2^{100} + 1 is not 2^{100}; irrationals at 60
digits). Any failure means "not equal", never an exception.

Deliberately left out: model-graded (LLM judge) rewards, code-execution rewards, `\\pm` expansion,
factorials, absolute values, equation solving (`x + 1 = 2` vs `x = 1`), and numeric answers that are
"close enough" after rounding (0.33 is not 1/3).
"""

from __future__ import annotations

import cmath
import functools
import math
import random
import re
from fractions import Fraction
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

try:  # optional: exact comparison of parsed expressions
    import sympy as _sympy
except ImportError:  # pragma: no cover - depends on the environment
    _sympy = None

# --- final-answer extraction --------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _braced(text: str, open_at: int) -> str | None:
    """The content of the brace group opening at text[open_at] == '{', or None if it never closes.
    Escaped braces (`\\{`, `\\}`) are literal characters, not grouping."""
    depth = 0
    i = open_at
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
        i += 1
    return None


def boxed_answer(text: str) -> str | None:
    """The content of the last `\\boxed{...}` or `\\fbox{...}` in text (nested braces allowed), or of
    the brace-less form `\\boxed 5` (up to the next `$` or line end, as the MATH reference code
    reads it). None when there is none, or when the last one never closes its brace."""
    if not isinstance(text, str):
        return None
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    i = matches[-1].end()
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        content = _braced(text, i)
        return content.strip() if content is not None else None
    rest = re.split(r"[$\n]", text[i:], maxsplit=1)[0].strip()
    return rest or None


def gsm8k_gold(reference: str) -> str | None:
    """The final answer of a GSM8K reference solution: the text after its last `####`, without
    thousands separators. None if there is no `####`."""
    if "####" not in reference:
        return None
    return reference.rsplit("####", 1)[1].strip().replace(",", "")


_NUMBER = re.compile(r"(?:(?<![\w)\]}])-)?\d+(?:,\d{3})*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number written in text (`-3`, `1,000`, `2.5`), or None. A minus sign right after
    a digit, letter or closing bracket is a subtraction, not a sign."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


# --- normalisation ------------------------------------------------------------------------------

_TEXT_CMDS = r"(?:text|mbox|mathrm|textrm|textbf|textit|textnormal|mathit|mathbf|operatorname)"
_UNIT_AT_END = re.compile(r"^(.*?\S)\s*\\(?:text|mbox|mathrm|textrm|textnormal)"
                          r"\s*\{\s*[A-Za-z][A-Za-z\s.]*\}(?:\^\{?\d\}?)?\s*$")
_UNIT_WORDS_AT_END = re.compile(r"^([-+]?\d[\d,]*(?:\.\d+)?)\s+(?!pi\b|sqrt\b)[A-Za-z]{2,}(?:\s+[A-Za-z]+)*\.?$")
_LEADING_VAR = re.compile(r"^\s*(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w+\}?)?\s*(?:=|\\in(?![A-Za-z]))\s*(.+)$", re.DOTALL)
_MATRIX = re.compile(r"\\begin\{[pbvBV]?matrix\}(.*?)\\end\{[pbvBV]?matrix\}", re.DOTALL)


def _fix_shorthand(s: str, command: str, n_args: int) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac 34` -> `\\frac{3}{4}`, `\\sqrt3` -> `\\sqrt{3}`: a TeX argument
    is a brace group or a single token (one character, or one control sequence like `\\pi`)."""
    out, i = [], 0
    while (j := s.find(command, i)) >= 0:
        k = j + len(command)
        out.append(s[i:k])
        i = k
        if k < len(s) and s[k].isalpha():  # a longer command name (\sqrtx is not \sqrt x)
            continue
        if command == "\\sqrt" and s.startswith("[", k):  # \sqrt[3]{x}: the index stays as it is
            close = s.find("]", k)
            if close < 0:
                break
            out.append(s[k : close + 1])
            k = close + 1
        for _ in range(n_args):
            while k < len(s) and s[k] == " ":
                k += 1
            if k >= len(s):
                break
            if s[k] == "{":
                group = _braced(s, k)
                if group is None:  # unbalanced: leave the rest as it is
                    break
                arg, k = group, k + len(group) + 2
            else:
                arg = re.match(r"(?s)\\[A-Za-z]+|\\.|.", s[k:]).group(0)
                k += len(arg)
            out.append("{" + arg + "}")
        i = k
    out.append(s[i:])
    return "".join(out)


def _matrix_to_lists(m: re.Match) -> str:
    rows = [r for r in re.split(r"\\\\", m.group(1)) if r.strip()]
    return "[" + ",".join("[" + ",".join(cell.strip() for cell in row.split("&")) + "]" for row in rows) + "]"


def normalize_answer(s: str) -> str:
    """A canonical string for a final answer (the MATH `is_equiv` / Minerva normalisation, extended).
    Two answers equal as strings after this are equal; `math_answers_equal` goes further."""
    s = s.strip()
    if _BOXED.search(s):
        s = boxed_answer(s) or s
    s = s.replace("\n", " ")
    s = _MATRIX.sub(_matrix_to_lists, s)  # first: its row separator \\ looks like a spacing command
    s = s.replace("\\!", "")
    s = re.sub(r"\\[,;: ]|~|\\q?quad(?![A-Za-z])", " ", s)
    s = re.sub(r"\\(?:left|right|[bB]igg?[lr]?)(?![A-Za-z])\s*", "", s)
    s = re.sub(r"\\(?:displaystyle|textstyle|scriptstyle)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|°|\\degree(?![A-Za-z])", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = s.replace("∞", "\\infty").replace("−", "-")
    while True:  # units at the end: `5.4 \text{ cents}`, `15\mbox{ cm}^2`, `\frac{270}7\text{ degrees}`
        m = _UNIT_AT_END.match(s)
        if not m:
            break
        s = m.group(1)
    for _ in range(4):  # unwrap the remaining text commands, innermost first
        s = re.sub(r"\\" + _TEXT_CMDS + r"\s*\{([^{}]*)\}", r"\1", s)
    s = s.strip()
    m = _UNIT_WORDS_AT_END.match(s)  # "18 dollars", "5 cm"
    if m:
        s = m.group(1)
    m = _LEADING_VAR.match(s)
    if m and "=" not in m.group(1):
        s = m.group(1)
    s = _fix_shorthand(s, "\\frac", 2)
    s = _fix_shorthand(s, "\\sqrt", 1)
    # Spaces carry no meaning, except between a command and a letter (`\cot x`).
    s = re.sub(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])", "\\1\x00", s)
    s = re.sub(r"\s+", "", s).replace("\x00", " ")
    s = re.sub(r"([_^])\{(\w)\}", r"\1\2", s)  # 4210_{5} -> 4210_5, x^{2} -> x^2
    s = s.rstrip(".")
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):  # 1,000 / 10,080 / 11,111,111,100
        s = s.replace(",", "")
    m = re.fullmatch(r"\(([A-Ea-e])\)", s)  # multiple choice "(B)"
    if m:
        s = m.group(1).upper()
    if re.fullmatch(r"[A-Za-z]{2,}", s):  # a word: "East", "Evelyn"
        s = s.lower()
    return s


# --- splitting into elements --------------------------------------------------------------------


def _split_top(s: str, sep: str) -> list[str]:
    """s split on sep where it is outside every bracket (any of ([{ and escaped \\{ \\})."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        if s.startswith("\\{", i) or s.startswith("\\}", i):
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _outer_brackets(s: str) -> tuple[str, str, str] | None:
    """(open, inner, close) when one bracket pair encloses all of s, e.g. '(3,4]' -> ('(', '3,4', ']')."""
    if s.startswith("\\{"):
        opener = "\\{"
    elif s[:1] in ("(", "["):
        opener = s[0]
    else:
        return None
    depth, i = 0, 0
    while i < len(s):
        if s.startswith("\\{", i) or s.startswith("\\}", i):
            depth += 1 if s[i + 1] == "{" else -1
            step = 2
        else:
            depth += 1 if s[i] in "([{" else -1 if s[i] in ")]}" else 0
            step = 1
        if depth == 0:
            if i + step != len(s):
                return None
            close = s[i : i + step]
            return opener, s[len(opener) : i], close
        i += step
    return None


_MAX_ELEMENTS = 32  # longer lists compare as strings only: pairwise matching is quadratic


def _multiset_equal(a: list[str], b: list[str], depth: int) -> bool:
    if len(a) != len(b):
        return False
    if len(a) > _MAX_ELEMENTS or sorted(a) == sorted(b):
        return sorted(a) == sorted(b)
    unmatched = list(b)
    for x in a:
        for k, y in enumerate(unmatched):
            if _equal(x, y, depth + 1):
                del unmatched[k]
                break
        else:
            return False
    return not unmatched


def _equal(a: str, b: str, depth: int = 0) -> bool:
    """a, b normalised; equal element-wise, then as numbers or expressions."""
    if a == b:
        return True
    if depth > 8 or not a or not b:
        return False
    ua, ub = _split_top(a, "\\cup"), _split_top(b, "\\cup")
    if len(ua) > 1 or len(ub) > 1:
        return len(ua) == len(ub) <= _MAX_ELEMENTS and all(_equal(x, y, depth + 1) for x, y in zip(ua, ub))
    ea, eb = _split_top(a, "="), _split_top(b, "=")
    if len(ea) > 1 or len(eb) > 1:  # equations: side by side ("y=2x+3" reached here kept its "y=")
        return len(ea) == len(eb) <= _MAX_ELEMENTS and all(_equal(x, y, depth + 1) for x, y in zip(ea, eb))
    oa, ob = _outer_brackets(a), _outer_brackets(b)
    if oa and ob:
        ia, ib = _split_top(oa[1], ","), _split_top(ob[1], ",")
        if len(ia) == len(ib) == 1 and (oa[0], oa[2]) == (ob[0], ob[2]):  # [x] vs [y], (x) vs (y)
            return _equal(oa[1], ob[1], depth + 1)
        if len(ia) > 1 or len(ib) > 1:  # tuples, intervals, vectors: brackets and order matter; sets: neither
            if oa[0] == ob[0] == "\\{":
                return _multiset_equal(ia, ib, depth)
            if (oa[0], oa[2]) != (ob[0], ob[2]) or len(ia) != len(ib) or len(ia) > _MAX_ELEMENTS:
                return False
            return all(_equal(x, y, depth + 1) for x, y in zip(ia, ib))
    if not (oa or ob):
        la, lb = _split_top(a, ","), _split_top(b, ",")
        if len(la) > 1 or len(lb) > 1:  # "enter all the solutions, separated by commas": any order
            return _multiset_equal(la, lb, depth)
    return _scalar_equal(a, b)


_MAX_ANSWER_CHARS = 10_000  # a final answer, not a document: bounds the regexes' work
_SIMPLE = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"


def _simple_number(s: str) -> Fraction | None:
    """Exact value of an integer, decimal, fraction (`\\frac{3}{4}`, `3/4`) or mixed number
    (`1\\frac{4}{5}`), else None."""
    try:
        if re.fullmatch(_SIMPLE, s):
            return Fraction(s)
        m = re.fullmatch(r"([-+]?)\\frac\{(" + _SIMPLE + r")\}\{(" + _SIMPLE + r")\}", s) or re.fullmatch(
            r"([-+]?)(" + _SIMPLE + r")/(" + _SIMPLE + r")", s)
        if m:
            value = Fraction(m.group(2)) / Fraction(m.group(3))
            return -value if m.group(1) == "-" else value
        m = re.fullmatch(r"([-+]?)(\d+)\\frac\{(\d+)\}\{(\d+)\}", s)
        if m:
            value = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
            return -value if m.group(1) == "-" else value
    except (ValueError, ZeroDivisionError):  # 1/0, or more digits than int() converts
        pass
    return None


def _scalar_equal(a: str, b: str) -> bool:
    va, vb = _simple_number(a), _simple_number(b)
    if va is not None and vb is not None:
        return va == vb
    ta, tb = _parse(a), _parse(b)
    if ta is None or tb is None:
        return False
    if _sympy is not None:
        verdict = _sympy_equal(ta, tb)
        if verdict is not None:
            return verdict
    return _numeric_equal(ta, tb)


def math_answers_equal(pred: str | None, gold: str | None) -> bool:
    """Whether a predicted final answer equals the reference one (see the module docstring for
    what counts as equal). Never raises: anything malformed is simply not equal."""
    if not isinstance(pred, str) or not isinstance(gold, str) or max(len(pred), len(gold)) > _MAX_ANSWER_CHARS:
        return False
    try:
        a, b = normalize_answer(pred), normalize_answer(gold)
        return bool(a) and _equal(a, b)
    except Exception:  # noqa: BLE001 - a reward must never crash the run on a strange completion
        return False


# --- a small, bounded expression parser (no eval) -----------------------------------------------
# AST nodes are tuples: ("num", Fraction) ("var", name) ("pi",) ("inf",) ("add", a, b) ("mul", a, b)
# ("div", a, b) ("neg", a) ("pow", a, b) ("fn", name, a) ("root", a, index or None).

_MAX_EXPR_CHARS = 200
_MAX_DEPTH = 40
_FUNCS = {"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
          "ln", "log", "exp"}
_GREEK = {"alpha", "beta", "gamma", "delta", "theta", "phi", "varphi", "lambda", "mu", "sigma", "omega", "tau", "rho"}
_PLAIN_WORDS = r"(?:sqrt|pi|sin|cos|tan|ln|log|exp)(?![A-Za-z])"  # completions write sqrt(2), 2*pi
_TOKEN = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+|\\[A-Za-z]+|" + _PLAIN_WORDS + r"|[A-Za-z]|\*\*|[-+*/^(){}\[\]])")


class _Unparsable(Exception):
    pass


class _Parser:
    def __init__(self, s: str):
        self.tokens = []
        pos = 0
        while pos < len(s):
            m = _TOKEN.match(s, pos)
            if not m:
                raise _Unparsable(s[pos:])
            tok = m.group(1)
            if re.fullmatch(_PLAIN_WORDS, tok):
                tok = "\\" + tok
            elif tok == "**":
                tok = "^"
            elif tok in ("\\cdot", "\\times"):
                tok = "*"
            elif tok == "\\div":
                tok = "/"
            self.tokens.append(tok)
            pos = m.end()
            if pos < len(s) and s[pos:].isspace():
                break
        self.i = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise _Unparsable(f"expected {expected!r}, got {tok!r}")
        self.i += 1
        return tok

    def parse(self):
        node = self.expr()
        if self.peek() is not None:
            raise _Unparsable(f"trailing {self.peek()!r}")
        return node

    def expr(self):
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise _Unparsable("too deep")
        node = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            right = self.term()
            node = ("add", node, right if op == "+" else ("neg", right))
        self.depth -= 1
        return node

    def term(self):
        node = self.unary()
        while True:
            tok = self.peek()
            if tok in ("*", "/"):
                self.take()
                right = self.unary()
                node = ("mul", node, right) if tok == "*" else ("div", node, right)
            elif tok is not None and self.starts_atom(tok):  # implicit product: 2x, 3\sqrt{2}, (a+5)(b+2)
                node = ("mul", node, self.power())
            else:
                return node

    def starts_atom(self, tok: str) -> bool:
        return tok[0].isdigit() or tok[0] == "." or tok.isalpha() or tok in ("(", "{") or (
            tok.startswith("\\") and tok[1:] in _FUNCS | _GREEK | {"frac", "sqrt", "pi", "infty"})

    def unary(self):
        if self.peek() in ("-", "+"):
            sign = self.take()
            node = self.unary()
            return ("neg", node) if sign == "-" else node
        return self.power()

    def power(self):
        node = self.atom()
        if self.peek() == "^":
            self.take()
            node = ("pow", node, self.exponent())
        return node

    def exponent(self):
        tok = self.peek()
        if tok == "{":
            return self.group()
        if tok == "-":  # x^-1, common in completions
            self.take()
            return ("neg", self.exponent())
        if tok is not None and tok[0].isdigit() and len(tok) > 1:  # x^23 is x^2 * 3 in TeX: one digit
            self.tokens[self.i] = tok[1:]
            return ("num", Fraction(int(tok[0])))
        return self.atom()

    def group(self):
        self.take("{")
        node = self.expr()
        self.take("}")
        return node

    def argument(self):
        """A TeX macro argument: a brace group or one token."""
        if self.peek() == "{":
            return self.group()
        tok = self.peek()
        if tok is not None and tok[0].isdigit() and len(tok) > 1:
            self.tokens[self.i] = tok[1:]
            return ("num", Fraction(int(tok[0])))
        return self.atom()

    def atom(self):
        tok = self.take()
        if tok[0].isdigit() or tok[0] == ".":
            if len(tok) > 60:
                raise _Unparsable("number too long")
            return ("num", Fraction(tok))
        if tok.isalpha():
            return ("var", tok)
        if tok == "(":
            node = self.expr()
            self.take(")")
            return node
        if tok == "{":
            node = self.expr()
            self.take("}")
            return node
        name = tok[1:]
        if name == "pi":
            return ("pi",)
        if name == "infty":
            return ("inf",)
        if name in _GREEK:
            return ("var", name)
        if name == "frac":
            return ("div", self.argument(), self.argument())
        if name == "sqrt":
            index = None
            if self.peek() == "[":
                self.take("[")
                index = self.expr()
                self.take("]")
            return ("root", self.argument(), index)
        if name in _FUNCS:
            power = None
            if self.peek() == "^":  # \sin^2 x = (\sin x)^2
                self.take()
                power = self.exponent()
            node = ("fn", name, self.power() if self.peek() != "(" else self.atom())
            return ("pow", node, power) if power is not None else node
        raise _Unparsable(f"unsupported {tok}")


def _parse(s: str):
    if len(s) > _MAX_EXPR_CHARS:
        return None
    try:
        return _Parser(s).parse()
    except (_Unparsable, ValueError, ZeroDivisionError, RecursionError):
        return None


def _variables(node, out: set) -> set:
    if node[0] == "var":
        out.add(node[1])
    for child in node[1:]:
        if isinstance(child, tuple):
            _variables(child, out)
    return out


_CMATH = {"sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan, "cot": lambda z: 1 / cmath.tan(z),
          "sec": lambda z: 1 / cmath.cos(z), "csc": lambda z: 1 / cmath.sin(z), "arcsin": cmath.asin,
          "arccos": cmath.acos, "arctan": cmath.atan, "sinh": cmath.sinh, "cosh": cmath.cosh, "tanh": cmath.tanh,
          "ln": cmath.log, "log": cmath.log, "exp": cmath.exp}


def _evaluate(node, values: dict) -> complex:
    kind = node[0]
    if kind == "num":
        return complex(float(node[1]))
    if kind == "var":
        return values[node[1]]
    if kind == "pi":
        return complex(math.pi)
    if kind == "inf":
        return complex(math.inf)
    if kind == "neg":
        return -_evaluate(node[1], values)
    if kind == "fn":
        return _CMATH[node[1]](_evaluate(node[2], values))
    if kind == "root":
        base = _evaluate(node[1], values)
        index = 2 if node[2] is None else _evaluate(node[2], values)
        return base ** (1 / index)
    a, b = _evaluate(node[1], values), _evaluate(node[2], values)
    if kind == "add":
        return a + b
    if kind == "mul":
        return a * b
    if kind == "div":
        return a / b
    if abs(b) > 1e4:  # pow: bounded so that no point takes long or overflows silently
        raise OverflowError
    return a**b


def _numeric_equal(ta, tb, points: int = 3) -> bool:
    """Equal at a few random points (the same for both), in complex floating point."""
    names = sorted(_variables(ta, set()) | _variables(tb, set()))
    rng = random.Random(0)
    agreed = 0
    for _ in range(points if names else 1):
        values = {n: complex(rng.uniform(0.4, 1.6)) for n in names}  # near 1: x^{100} vs x^{100} + 1 differ
        try:
            x, y = _evaluate(ta, values), _evaluate(tb, values)
        except (ArithmeticError, ValueError):
            continue
        if any(math.isnan(v) for v in (x.real, x.imag, y.real, y.imag)):
            continue
        if math.isinf(abs(x)) or math.isinf(abs(y)):
            if x != y:
                return False
        elif abs(x - y) > 1e-9 * max(abs(x), abs(y)) + 1e-15:
            return False
        agreed += 1
    return agreed > 0


def _to_sympy(node):
    sp = _sympy
    kind = node[0]
    if kind == "num":
        return sp.Rational(node[1].numerator, node[1].denominator)
    if kind == "var":
        return sp.Symbol(node[1])
    if kind == "pi":
        return sp.pi
    if kind == "inf":
        return sp.oo
    if kind == "neg":
        return -_to_sympy(node[1])
    if kind == "fn":
        fn = {"ln": sp.log, "arcsin": sp.asin, "arccos": sp.acos, "arctan": sp.atan}.get(node[1]) or getattr(sp, node[1])
        return fn(_to_sympy(node[2]))
    if kind == "root":
        return sp.root(_to_sympy(node[1]), 2 if node[2] is None else _to_sympy(node[2]))
    a, b = _to_sympy(node[1]), _to_sympy(node[2])
    if kind == "add":
        return a + b
    if kind == "mul":
        return a * b
    if kind == "div":
        return a / b
    # pow: bound the work before sympy does it exactly (a rational of at most ~10^5 digits)
    if b.is_Number and (abs(b) > 1000 or (a.is_Number and a != 0
                                          and abs(float(b)) * abs(math.log10(abs(float(a)))) > 1e5)):
        raise _Unparsable("power too large for an exact comparison")
    return a**b


def _sympy_equal(ta, tb) -> bool | None:
    """Exact comparison of two constant expressions (True/False), or None to let random points
    decide: expressions with variables (sympy's expand() of a power of a sum can take seconds) and
    anything sympy fails on. Rational results (2^{100} + 1 vs 2^{100}) compare exactly, irrational
    ones at 60 significant digits."""
    try:
        a, b = _to_sympy(ta), _to_sympy(tb)
        if a.free_symbols or b.free_symbols:
            return None
        if (a.is_Rational and b.is_Rational) or a.has(_sympy.oo, _sympy.zoo) or b.has(_sympy.oo, _sympy.zoo):
            return bool(a == b)
        x, y = _sympy.N(a, 60), _sympy.N(b, 60)
        return bool(abs(x - y) <= _sympy.Float("1e-40") * max(abs(x), abs(y)))
    except Exception:  # noqa: BLE001 - sympy errors and our bounds: let the float path decide
        return None


# --- reward functions (TRL's convention) --------------------------------------------------------


def completion_text(completion: Any) -> str:
    """The text of a completion: a string as it is, or a conversation's last message content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else ""
    return ""


def boxed_math(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[str], **kwargs) -> list[float]:
    """DeepSeek-R1's accuracy reward as in its seed recipe: +1 when the last `\\boxed{}` of the
    completion equals the reference answer (`math_answers_equal`), -1 otherwise (no box included).
    `answer` is the reference final answer (a MATH `answer` field, or a solution with a box)."""
    return [1.0 if math_answers_equal(boxed_answer(completion_text(c)), str(gold)) else -1.0
            for c, gold in zip(completions, answer, strict=True)]


def gsm8k(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[str], **kwargs) -> list[float]:
    """GSM8K accuracy: +1 when the completion's answer equals the number after `####` in the
    reference (a bare number as reference works too), -1 otherwise, the same scale as boxed_math so
    that the two mix. The completion's answer is its last `\\boxed{}` if it has one, else the last
    number it writes."""
    rewards = []
    for c, reference in zip(completions, answer, strict=True):
        reference = str(reference)
        gold = gsm8k_gold(reference) if "####" in reference else reference
        text = completion_text(c)
        pred = boxed_answer(text)
        if pred is None:
            pred = last_number(text)
        rewards.append(1.0 if math_answers_equal(pred, gold) else -1.0)
    return rewards


def format_reward(prompts: Sequence[Any], completions: Sequence[Any], think_tag: str = "think",
                  answer_tag: str = "answer", **kwargs) -> list[float]:
    """DeepSeek-R1's format reward: 1.0 when the completion is exactly a reasoning block then an
    answer block, `<think>...</think><answer>...</answer>` (whitespace around the blocks allowed,
    each tag exactly once), else 0.0."""
    t, a = re.escape(think_tag), re.escape(answer_tag)
    pattern = re.compile(rf"\s*<{t}>.*?</{t}>\s*<{a}>.*?</{a}>\s*", re.DOTALL)
    tags = [f"<{think_tag}>", f"</{think_tag}>", f"<{answer_tag}>", f"</{answer_tag}>"]
    rewards = []
    for c in completions:
        text = completion_text(c)
        ok = pattern.fullmatch(text) is not None and all(text.count(tag) == 1 for tag in tags)
        rewards.append(1.0 if ok else 0.0)
    return rewards


# --- scoring a batch ----------------------------------------------------------------------------


def _is_finite_number(v: Any) -> bool:
    if v is None or isinstance(v, (str, bytes)):
        return False
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError, OverflowError):
        return False


class RewardFunctionError(RuntimeError):
    """A reward function raised, returned the wrong number of rewards, or a non-finite reward."""


def reward_name(fn: Callable) -> str:
    """The name a reward is logged under: the function's name (through functools.partial)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def score_completions(
    reward_funcs: Sequence[Callable],
    weights: Sequence[float] | None,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    rows: Sequence[dict],
) -> tuple[Tensor, dict[str, Tensor]]:
    """Scores N completions with every reward function: (total (N,), {name: rewards (N,)}).

    rows[i] is the dataset row of completion i (the loop repeats a prompt's row for its G
    completions); its fields other than "prompt" and "completion" are passed by name as lists,
    TRL's way (`answer=[...]`). total = sum of weight * reward (weights None: all 1). A function
    that raises is called again sample by sample to name the sample that fails; the error names
    the function and chains the original exception. None, NaN or infinite rewards are errors.
    """
    n = len(completions)
    if len(prompts) != n or len(rows) != n:
        raise ValueError(f"{len(prompts)} prompts, {n} completions and {len(rows)} rows: expected the same count")
    weights = [1.0] * len(reward_funcs) if weights is None else list(weights)
    if len(weights) != len(reward_funcs):
        raise ValueError(f"{len(reward_funcs)} reward functions but {len(weights)} weights")
    keys = [k for k in (rows[0] if rows else {}) if k not in ("prompt", "completion")]
    try:
        columns = {k: [row[k] for row in rows] for k in keys}
    except KeyError as e:
        raise ValueError(f"every row needs the same fields; a row lacks {e}") from None

    total = torch.zeros(n, dtype=torch.float32)
    per_function: dict[str, Tensor] = {}
    for fn, weight in zip(reward_funcs, weights):
        name = reward_name(fn)
        if name in per_function:
            name = f"{name}_{len(per_function)}"
        try:
            values = list(fn(prompts=list(prompts), completions=list(completions), **columns))
        except Exception as batch_error:  # noqa: BLE001 - re-raised below, naming the sample
            for i in range(n):
                try:
                    fn(prompts=[prompts[i]], completions=[completions[i]], **{k: [v[i]] for k, v in columns.items()})
                except Exception as sample_error:  # noqa: BLE001
                    raise RewardFunctionError(
                        f"reward function {name} raised on sample {i} "
                        f"(completion {completion_text(completions[i])[:80]!r}): "
                        f"{type(sample_error).__name__}: {sample_error}") from sample_error
            raise RewardFunctionError(
                f"reward function {name} raised on the batch of {n} samples (no single sample fails alone): "
                f"{type(batch_error).__name__}: {batch_error}") from batch_error
        if len(values) != n:
            raise RewardFunctionError(f"reward function {name} returned {len(values)} rewards for {n} completions")
        for i, v in enumerate(values):
            if not _is_finite_number(v):
                raise RewardFunctionError(f"reward function {name} returned {v!r} for sample {i}: "
                                          "rewards must be finite numbers")
        rewards = torch.tensor([float(v) for v in values], dtype=torch.float32)
        per_function[name] = rewards
        total += weight * rewards
    return total, per_function
