"""Plausible, consistent corruption of GSM8K worked solutions (the ``instruct-gsm8k-noisy`` suite).

A GSM8K answer is prose with calculator annotations, ``9 * 2 = $<<9*2=18>>18``, ending in
``#### 18``. :func:`corrupt_answer` makes one reasoning slip in one calculation step and
carries it through the rest of the solution, so the result reads like a careful solution
that went wrong once:

* the slip: one operand of the step's expression is off by a small amount (1 or 2 units of
  its second-highest digit: ``16-3-4`` -> ``16-3-5``, ``540`` -> ``530``) or one ``+`` / ``-``
  is flipped; the step's annotation stays arithmetically correct for its (new) operands,
  and the prose copy of the expression just before it (``16 - 3 - 4 = ``) changes with it;
* propagation: every later annotation whose operands used a changed result is re-evaluated
  with the new values (exact rational arithmetic on a parsed expression of numbers and
  ``+ - * / ( )`` only, never ``eval``), the numbers in the following prose are replaced by
  their new values in the same style (thousands commas, ``.5``, two decimals), and the final
  ``#### N`` becomes the propagated final value.

A candidate slip is rejected (and another tried) unless the step is understood (its
expression evaluates to its stated result), every changed value stays non-negative and as
round as the original (integers stay integers, otherwise at most two decimals), no changed
value can be confused with another number of the problem (it must not occur in the
question or earlier in the solution, nor be produced again by an unchanged step), and the
final answer changes. :func:`corrupt_answer_simple` is the fallback for when a block of
the pool has too few answers a slip qualifies for: it changes the ``#### N`` line and the
last line's statement of ``N`` (an arithmetic slip in the last step).

:func:`corrupt_pool` corrupts exactly ``round(share * n)`` records of a list, the same count
within every consecutive block of 50 (so a config's ``limit: 50`` keeps the share), and
marks each record with ``corrupted: true/false``.
"""

from __future__ import annotations

import ast
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>=]*)>>")
# a number as written in prose: 80,000 / 1.5 / .5 / 18 (not part of a word such as 3rd)
PROSE_NUMBER = re.compile(r"(?<![\w.])(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?![\w])")
# a number inside an annotation's expression: plain digits, no commas
EXPR_NUMBER = re.compile(r"\d+(?:\.\d+)?|\.\d+")
FINAL = re.compile(r"\n####[ \t]*([^\n]*?)[ \t]*\Z")
FINAL_NUMBER = re.compile(r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")

BLOCK = 50
DELTAS = (1, -1, 2, -2)


class SlipRejected(Exception):
    """A candidate slip would not give a consistent, plausible solution."""


# --------------------------------------------------------------------------- arithmetic


def safe_eval(expr: str) -> Fraction:
    """Exact value of an arithmetic expression of numbers and ``+ - * / ( )``.

    Raises ``ValueError`` for anything else (names, calls, powers, ...) or division by zero.
    """
    text = expr.strip()
    if not text or len(text) > 200:
        raise ValueError(f"not a simple arithmetic expression: {expr!r}")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ValueError(f"not a simple arithmetic expression: {expr!r}") from None

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            literal = ast.get_source_segment(text, node)
            if literal is None or not EXPR_NUMBER.fullmatch(literal):
                raise ValueError(f"unsupported number in {expr!r}")
            return Fraction(literal)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            v = value(node.operand)
            return v if isinstance(node.op, ast.UAdd) else -v
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult,
                                                                ast.Div)):
            a, b = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            if b == 0:
                raise ValueError(f"division by zero in {expr!r}")
            return a / b
        raise ValueError(f"not a simple arithmetic expression: {expr!r}")

    return value(tree.body)


def parse_number(token: str) -> Fraction:
    """Value of a number as written (``80,000``, ``.5``, ``18``); ``ValueError`` if none."""
    t = token.strip().replace(",", "")
    if not re.fullmatch(r"-?(?:\d+(?:\.\d+)?|\.\d+)", t):
        raise ValueError(f"not a number: {token!r}")
    return Fraction(t)


def format_number(value: Fraction, template: str) -> str:
    """``value`` written in the style of ``template`` (commas, ``.5``, two decimals)."""
    neg = value < 0
    v = -value if neg else value
    whole, frac = divmod(v, 1)
    whole = int(whole)
    decimals = ""
    if frac:
        digits = 0
        while (frac * 10 ** digits).denominator != 1:
            digits += 1
            if digits > 6:
                raise ValueError(f"{value} has no short decimal form")
        decimals = str(int(frac * 10 ** digits)).rjust(digits, "0")
    m = re.search(r"\.(\d+)$", template.replace(",", ""))
    if m and len(m.group(1)) == 2 and len(decimals) <= 2:
        decimals = decimals.ljust(2, "0")  # money: 1.50 stays two decimals
    int_part = f"{whole:,}" if "," in template else str(whole)
    if decimals and whole == 0 and template.lstrip("-").startswith("."):
        int_part = ""  # .5 style
    out = int_part + ("." + decimals if decimals else "")
    return ("-" if neg else "") + out


def _round_enough(new: Fraction, old: Fraction, template: str) -> bool:
    """Integers stay integers (unless written 15.00); else at most two decimals; no negatives."""
    if new < 0:
        return False
    if old.denominator == 1 and "." not in template:
        return new.denominator == 1
    return (new * 100).denominator == 1


def _close(a: Fraction, b: Fraction) -> bool:
    """The stated result matches the expression (GSM8K rounds to 2 decimals at most)."""
    return abs(a - b) <= Fraction(1, 200)


# --------------------------------------------------------------------------- the slip


@dataclass(frozen=True)
class Slip:
    """One candidate error: in step ``step``, operand ``index`` += ``delta``, or (with
    ``kind='operator'``) the ``index``-th binary ``+``/``-`` flipped."""

    step: int
    kind: str  # "operand" | "operator"
    index: int
    delta: Fraction = Fraction(0)


def _unit(value: Fraction) -> int:
    """The size of a small slip of an integer: 1 below 100, then its second digit's unit."""
    return 10 ** max(0, len(str(int(value))) - 2)


def _binary_signs(expr: str) -> list[tuple[int, int]]:
    """(position in expr, number of numbers before it) of every binary + or -."""
    out = []
    n_numbers = 0
    prev = None  # "num" | ")" | "op" | "("
    i = 0
    while i < len(expr):
        c = expr[i]
        m = EXPR_NUMBER.match(expr, i)
        if m:
            n_numbers += 1
            prev = "num"
            i = m.end()
            continue
        if c in "+-" and prev in ("num", ")"):
            out.append((i, n_numbers))
        if c in "+-*/":
            prev = "op"
        elif c in "()":
            prev = c
        i += 1
    return out


def candidate_slips(answer: str, rng: np.random.Generator) -> list[Slip]:
    """Every slip worth trying, in a seeded order (steps in random order, then slips)."""
    body = _split_final(answer)[0]
    steps = list(ANNOTATION.finditer(body))
    out: list[Slip] = []
    for k in rng.permutation(len(steps)):
        expr = steps[k].group(1)
        here: list[Slip] = []
        for i, m in enumerate(EXPR_NUMBER.finditer(expr)):
            v = Fraction(m.group(0))
            if v.denominator == 1 and v >= 1:
                here += [Slip(int(k), "operand", i, Fraction(d * _unit(v))) for d in DELTAS]
        here += [Slip(int(k), "operator", j) for j in range(len(_binary_signs(expr)))]
        out += [here[i] for i in rng.permutation(len(here))]
    return out


def _split_final(answer: str) -> tuple[str, str]:
    m = FINAL.search(answer)
    if m is None:
        raise SlipRejected("no final '#### N' line")
    return answer[:m.start()], m.group(1)


def _numbers(text: str) -> list[re.Match[str]]:
    return list(PROSE_NUMBER.finditer(text))


def _values(text: str) -> set[Fraction]:
    return {parse_number(m.group(0)) for m in _numbers(text)}


def _replace_spans(text: str, edits: list[tuple[int, int, str]]) -> str:
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return text


def _map_prose(text: str, mapping: dict[Fraction, Fraction]) -> str:
    """Every prose number whose value was changed gets its new value, same style."""
    if not mapping:
        return text
    edits = []
    for m in _numbers(text):
        v = parse_number(m.group(0))
        if v in mapping:
            edits.append((m.start(), m.end(), format_number(mapping[v], m.group(0))))
    return _replace_spans(text, edits)


def _map_expr(expr: str, mapping: dict[Fraction, Fraction]) -> str:
    if not mapping:
        return expr
    edits = []
    for m in EXPR_NUMBER.finditer(expr):
        v = Fraction(m.group(0))
        if v in mapping:
            new = mapping[v]
            if new < 0:
                raise SlipRejected("a negative operand")
            edits.append((m.start(), m.end(), format_number(new, m.group(0))))
    return _replace_spans(expr, edits)


def _restate(prose: str, line_start: int, expr: str, old: Fraction, new: Fraction) -> str:
    """In the prose of a step's own line, outside its copy of the expression, the stated
    result ``old`` becomes ``new``."""
    seg = _numbers(prose)
    n_expr = len(EXPR_NUMBER.findall(expr))
    tail_values = [Fraction(t) for t in EXPR_NUMBER.findall(expr)]
    if len(seg) >= n_expr and [parse_number(t.group(0)) for t in seg[len(seg) - n_expr:]] \
            == tail_values:
        seg = seg[:len(seg) - n_expr]
    edits = [(t.start(), t.end(), format_number(new, t.group(0))) for t in seg
             if t.start() >= line_start and parse_number(t.group(0)) == old]
    return _replace_spans(prose, edits)


def _slip_step(expr: str, prose: str, slip: Slip) -> tuple[str, str]:
    """The slipped expression and the prose before it, changed the same way."""
    numbers = list(EXPR_NUMBER.finditer(expr))
    seg = _numbers(prose)
    # the prose repeats the expression (16 - 3 - 4 = <<...>>) if its last numbers match
    mirrored = len(seg) >= len(numbers) and [
        parse_number(m.group(0)) for m in seg[len(seg) - len(numbers):]
    ] == [Fraction(m.group(0)) for m in numbers]
    if seg and not mirrored:
        raise SlipRejected("the prose before the step does not spell out its expression")
    tail = seg[len(seg) - len(numbers):] if seg else []
    if slip.kind == "operand":
        m = numbers[slip.index]
        new = Fraction(m.group(0)) + slip.delta
        if new < 1:
            raise SlipRejected("operand would drop below 1")
        new_expr = expr[:m.start()] + format_number(new, m.group(0)) + expr[m.end():]
        if tail:
            t = tail[slip.index]
            prose = prose[:t.start()] + format_number(new, t.group(0)) + prose[t.end():]
        return new_expr, prose
    pos, before = _binary_signs(expr)[slip.index]
    flipped = "-" if expr[pos] == "+" else "+"
    new_expr = expr[:pos] + flipped + expr[pos + 1:]
    if tail:
        if not 1 <= before < len(tail):
            raise SlipRejected("operator not between two numbers")
        a, b = tail[before - 1].end(), tail[before].start()
        between = prose[a:b]
        if between.count(expr[pos]) != 1 or any(c in between for c in "+-*/x×÷"
                                                 if c != expr[pos]):
            raise SlipRejected("the prose's operator is not a plain + or -")
        prose = prose[:a] + between.replace(expr[pos], flipped) + prose[b:]
    return new_expr, prose


def apply_slip(question: str, answer: str, slip: Slip) -> str:
    """The answer with ``slip`` made and propagated; ``SlipRejected`` if inconsistent."""
    body, final = _split_final(answer)
    steps = list(ANNOTATION.finditer(body))
    taboo = _values(question)  # a changed value must not be confusable with these
    mapping: dict[Fraction, Fraction] = {}
    out: list[str] = []
    pos = 0
    try:
        for j, m in enumerate(steps):
            prose, expr, res = body[pos:m.start()], m.group(1), m.group(2)
            if j < slip.step:
                out += [prose, m.group(0)]
                pos = m.end()
                continue
            if j == slip.step:
                new_expr, prose = _slip_step(expr, prose, slip)
            else:
                prose = _map_prose(prose, mapping)
                new_expr = _map_expr(expr, mapping)
            old = parse_number(res)
            if new_expr == expr:  # untouched by the slip
                if old in mapping:
                    raise SlipRejected("an unchanged step produces a changed value again")
                out += [prose, m.group(0)]
                pos = m.end()
                continue
            if old < 0 or not _close(safe_eval(expr), old):
                raise SlipRejected("step not understood (its result does not match)")
            new = safe_eval(new_expr)
            if not _round_enough(new, old, res):
                raise SlipRejected("the new value is not as round as the old one")
            if new != old:
                # the sentence may state the result before the calculation ("The quilt has
                # 33 square feet because 11 x 3 = <<11*3=33>>33"): its line counts as this
                # step's; anything earlier must not hold the value, or later text is ambiguous
                line = max(pos, body.rfind("\n", 0, m.start()) + 1)
                if old in mapping or old in taboo or old in _values(body[:line]):
                    raise SlipRejected("the changed value is ambiguous in the text")
                prose = _restate(prose, prose.rfind("\n") + 1, new_expr, old, new)
                mapping[old] = new
            out += [prose, f"<<{new_expr}={format_number(new, res)}>>"]
            pos = m.end()
        out.append(_map_prose(body[pos:], mapping))
        fm = FINAL_NUMBER.fullmatch(final)
        if fm is None:
            raise SlipRejected("final answer is not a plain number")
        old_final = parse_number(final)
        new_final = mapping.get(old_final)
        if new_final is None or new_final == old_final:
            raise SlipRejected("the final answer does not change")
        if new_final < 0 or (old_final.denominator == 1 and new_final.denominator != 1):
            raise SlipRejected("the new final answer is not a whole number")
        out.append(f"\n#### {format_number(new_final, final)}")
    except ValueError as exc:
        raise SlipRejected(str(exc)) from None
    return "".join(out)


def corrupt_answer(question: str, answer: str, rng: np.random.Generator) -> str | None:
    """A consistently corrupted answer (first qualifying slip in seeded order), or None."""
    try:
        slips = candidate_slips(answer, rng)
    except SlipRejected:
        return None
    for slip in slips:
        try:
            return apply_slip(question, answer, slip)
        except SlipRejected:
            continue
    return None


def corrupt_answer_simple(answer: str, rng: np.random.Generator) -> str:
    """Fallback: the final ``#### N`` changes by a small plausible amount, and so does the
    last ``N`` the solution's last line states (an arithmetic slip in the last step; an
    annotation ``<<expr=N>>`` right before it takes the wrong value too)."""
    m = FINAL.search(answer)
    if m is None or FINAL_NUMBER.fullmatch(m.group(1)) is None:
        raise ValueError(f"answer has no final '#### N': {answer[-40:]!r}")
    old = parse_number(m.group(1))
    unit = _unit(old) if old >= 1 else 1
    deltas = [d * unit for d in DELTAS]
    rng.shuffle(deltas)
    new = next(old + d for d in deltas if old + d >= 0 or old < 0)
    body = answer[:m.start()]
    line = body.rfind("\n") + 1
    hits = [t for t in _numbers(body[line:]) if parse_number(t.group(0)) == old]
    if hits:
        t = hits[-1]
        start, end = line + t.start(), line + t.end()
        body = body[:start] + format_number(new, t.group(0)) + body[end:]
        for a in ANNOTATION.finditer(body[line:start]):
            if line + a.end() == start and a.group(2).strip() == format_number(old, a.group(2)):
                r0, r1 = line + a.start(2), line + a.end(2)
                body = body[:r0] + format_number(new, a.group(2)) + body[r1:]
    return body + f"\n#### {format_number(new, m.group(1))}"


# --------------------------------------------------------------------------- a pool


def final_answer(answer: str) -> Fraction:
    """The value after ``####``."""
    return parse_number(_split_final(answer)[1])


def _record_rng(seed: int, record_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(record_id.encode("utf-8"))])


def corrupt_pool(rows: list[dict[str, Any]], *, share: float = 0.4, seed: int = 0,
                 log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Copies of GSM8K rows (same order and ids), ``round(share * n)`` of them corrupted.

    Every consecutive block of 50 rows holds the same count (20 at 40%; the last, shorter
    block the rest), so any prefix of whole blocks keeps the share. Within a block, rows
    are tried in a seeded order and the first ones a consistent slip exists for are
    corrupted; only if a block had too few would :func:`corrupt_answer_simple` fill it.
    Each row gets ``corrupted: true/false``.
    """
    n = len(rows)
    order_rng = np.random.default_rng([seed, 0x6E6F6973])  # "nois"
    out = [dict(r, corrupted=False) for r in rows]
    n_simple = 0
    for start in range(0, n, BLOCK):
        end = min(start + BLOCK, n)
        quota = round(share * end) - round(share * start)
        order = [start + int(i) for i in order_rng.permutation(end - start)]
        done: list[int] = []
        for i in order:
            if len(done) == quota:
                break
            row = rows[i]
            new = corrupt_answer(row["question"], row["answer"], _record_rng(seed, row["id"]))
            if new is not None:
                out[i]["answer"], out[i]["corrupted"] = new, True
                done.append(i)
        for i in order:
            if len(done) == quota:
                break
            if i not in done:
                row = rows[i]
                out[i]["answer"] = corrupt_answer_simple(row["answer"],
                                                         _record_rng(seed, row["id"]))
                out[i]["corrupted"] = True
                done.append(i)
                n_simple += 1
    if log is not None:
        n_bad = sum(r["corrupted"] for r in out)
        log(f"corrupted {n_bad} of {n} GSM8K pool answers "
            f"({n_simple} by the final answer only)")
    return out
