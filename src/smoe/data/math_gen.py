"""A seeded generator of school-mathematics questions in the style of DeepMind Mathematics.

Saxton et al. (2019) generate question/answer pairs per module (``arithmetic__add_sub``,
``algebra__linear_1d``, ``polynomials__expand``, ...). The PyPI ``mathematics-dataset`` no longer
runs on current numpy/sympy, so this is a small independent generator covering arithmetic, linear
equations, polynomials (expand, collect, evaluate, combine), differentiation, number theory and
unit conversion. Every answer is computed exactly here (integers, ``Fraction``, integer-coefficient
polynomials); tests/test_data_math.py re-derives each answer independently with sympy and ``math``.

Worked example (``problem(random.Random(0), "algebra__linear_1d")`` gives one like)::

    Question: Solve 3*x + 5 = 20 for x.
    Answer: 5

Expressions use Python/sympy syntax (``*``, ``**``) so answers can be checked mechanically.
A corpus document is ``PROBLEMS_PER_DOC`` problems separated by blank lines; document ``i`` of
seed ``s`` depends only on ``(s, i)``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

PROBLEMS_PER_DOC = 16
# Letters sympy reads as plain symbols and that are not easily confused with digits.
VARIABLES = "abcdfghjkmnpqrstuvwxyz"


@dataclass(frozen=True)
class Problem:
    module: str
    question: str
    answer: str

    def text(self) -> str:
        return f"Question: {self.question}\nAnswer: {self.answer}"


# ---------------------------------------------------------------- formatting helpers


def fmt_num(q: Fraction | int) -> str:
    """Exact rational as an integer, a terminating decimal, or ``p/q``."""
    q = Fraction(q)
    if q.denominator == 1:
        return str(q.numerator)
    d = q.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:
        return f"{q.numerator}/{q.denominator}"
    # Terminating decimal: scale by 10**k until integral.
    k, scaled = 0, q
    while scaled.denominator != 1:
        scaled *= 10
        k += 1
    sign, digits = ("-" if scaled < 0 else ""), str(abs(scaled.numerator)).rjust(k + 1, "0")
    return f"{sign}{digits[:-k]}.{digits[-k:]}"


def fmt_poly(coeffs: list[int], var: str) -> str:
    """Integer polynomial (``coeffs[p]`` multiplies ``var**p``) in sympy's descending order."""
    terms = []
    for p in range(len(coeffs) - 1, -1, -1):
        c = coeffs[p]
        if c == 0:
            continue
        mag = abs(c)
        mono = "" if p == 0 else (var if p == 1 else f"{var}**{p}")
        body = str(mag) if not mono else (mono if mag == 1 else f"{mag}*{mono}")
        if not terms:
            terms.append(("-" if c < 0 else "") + body)
        else:
            terms.append(("- " if c < 0 else "+ ") + body)
    return " ".join(terms) if terms else "0"


def _trim(coeffs: list[int]) -> list[int]:
    while len(coeffs) > 1 and coeffs[-1] == 0:
        coeffs = coeffs[:-1]
    return coeffs


def _mul(a: list[int], b: list[int]) -> list[int]:
    out = [0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] += x * y
    return _trim(out)


def _nonzero(rng: random.Random, lo: int, hi: int) -> int:
    while True:
        v = rng.randint(lo, hi)
        if v != 0:
            return v


def _poly(rng: random.Random, degree: int, lo: int = -9, hi: int = 9) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(degree)] + [_nonzero(rng, lo, hi)]


def _eval_poly(coeffs: list[int], x: int) -> int:
    return sum(c * x**p for p, c in enumerate(coeffs))


# ---------------------------------------------------------------- arithmetic


def arithmetic_add_sub(rng: random.Random) -> Problem:
    if rng.random() < 0.3:  # decimals
        a, b = Fraction(rng.randint(-9999, 9999), 100), Fraction(rng.randint(-9999, 9999), 10)
    else:
        a, b = rng.randint(-999, 999), rng.randint(-999, 999)
    op = rng.choice("+-")
    value = a + b if op == "+" else a - b
    q = rng.choice(["What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "Work out {a} {op} {b}."])
    return Problem("arithmetic__add_sub", q.format(a=fmt_num(a), op=op, b=fmt_num(b)), fmt_num(value))


def arithmetic_mul_div(rng: random.Random) -> Problem:
    a, b = rng.randint(-99, 99), _nonzero(rng, -40, 40)
    if rng.random() < 0.5:
        return Problem("arithmetic__mul_div", f"Multiply {a} and {b}.", str(a * b))
    return Problem("arithmetic__mul_div", f"What is {a * b} divided by {b}?", str(a))


def arithmetic_mixed(rng: random.Random) -> Problem:
    """An expression of 3-4 integers with + - * /; division may leave a fraction."""

    def leaf() -> tuple[str, Fraction, str]:
        v = _nonzero(rng, -12, 12)
        return (f"({v})" if v < 0 else str(v)), Fraction(v), ""  # "" = no top-level operator

    expr, value, top = leaf()
    for _ in range(rng.randint(2, 3)):
        s, v, s_top = leaf()
        if rng.random() < 0.5:  # grow the expression on either side
            (expr, value, top), (s, v, s_top) = (s, v, s_top), (expr, value, top)
        op = rng.choice("+-*/")
        if op == "/" and v == 0:
            op = "*"
        value = {"+": value + v, "-": value - v, "*": value * v}[op] if op != "/" else value / v
        # Brackets only where precedence or left-associativity needs them.
        if top in ("+", "-") and op in "*/":
            expr = f"({expr})"
        if s_top and not (op == "+" or (op == "*" and s_top == "*")):
            s = f"({s})"
        expr, top = f"{expr} {op} {s}", op
    return Problem("arithmetic__mixed", f"Calculate {expr}.", fmt_num(value))


def arithmetic_fractions(rng: random.Random) -> Problem:
    a = Fraction(_nonzero(rng, -9, 9), rng.randint(2, 12))
    b = Fraction(rng.randint(1, 9), rng.randint(2, 12))
    op = rng.choice("+-")
    value = a + b if op == "+" else a - b
    sa = f"({a.numerator}/{a.denominator})" if a < 0 else f"{a.numerator}/{a.denominator}"
    sa = sa if a.denominator != 1 else str(a.numerator)
    sb = f"{b.numerator}/{b.denominator}" if b.denominator != 1 else str(b.numerator)
    ans = f"{value.numerator}/{value.denominator}" if value.denominator != 1 else str(value.numerator)
    return Problem("arithmetic__add_fractions", f"Calculate {sa} {op} {sb}.", ans)


# ---------------------------------------------------------------- algebra


def algebra_linear_1d(rng: random.Random) -> Problem:
    v, x = rng.choice(VARIABLES), rng.randint(-12, 12)
    a, b = _nonzero(rng, -9, 9), rng.randint(-30, 30)
    if rng.random() < 0.5:  # a*v + b = c
        lhs, rhs = fmt_poly([b, a], v), str(a * x + b)
    else:  # a*v + b = c*v + d with c != a
        c = _nonzero(rng, -9, 9)
        while c == a:
            c = _nonzero(rng, -9, 9)
        d = a * x + b - c * x
        lhs, rhs = fmt_poly([b, a], v), fmt_poly([d, c], v)
    return Problem("algebra__linear_1d", f"Solve {lhs} = {rhs} for {v}.", str(x))


def algebra_linear_2d(rng: random.Random) -> Problem:
    u, w = rng.sample(VARIABLES, 2)
    xu, xw = rng.randint(-10, 10), rng.randint(-10, 10)
    while True:
        a, b, c, d = (_nonzero(rng, -7, 7) for _ in range(4))
        if a * d - b * c != 0:
            break

    def side(p: int, q: int) -> str:
        s = f"{p}*{u}" if abs(p) != 1 else ("-" if p < 0 else "") + u
        return s + (
            f" - {-q}*{w}" if q < -1 else f" - {w}" if q == -1 else f" + {w}" if q == 1 else f" + {q}*{w}"
        )

    eq1, eq2 = f"{side(a, b)} = {a * xu + b * xw}", f"{side(c, d)} = {c * xu + d * xw}"
    target, value = (u, xu) if rng.random() < 0.5 else (w, xw)
    return Problem("algebra__linear_2d", f"Solve {eq1}, {eq2} for {target}.", str(value))


# ---------------------------------------------------------------- polynomials


def polynomials_expand(rng: random.Random) -> Problem:
    v = rng.choice(VARIABLES)
    f = _poly(rng, 1, -6, 6)
    g = _poly(rng, rng.choice([1, 1, 2]), -6, 6)
    q = f"Expand ({fmt_poly(f, v)})*({fmt_poly(g, v)})."
    return Problem("polynomials__expand", q, fmt_poly(_mul(f, g), v))


def polynomials_collect(rng: random.Random) -> Problem:
    v = rng.choice(VARIABLES)
    terms = [(rng.randint(0, 3), _nonzero(rng, -20, 20)) for _ in range(rng.randint(3, 5))]
    p = rng.choice([t[0] for t in terms])
    terms.append((p, _nonzero(rng, -20, 20)))  # at least one like pair
    rng.shuffle(terms)
    coeffs = [0] * 4
    for power, c in terms:
        coeffs[power] += c
    text = " ".join(
        (("- " if c < 0 else "+ ") if i else ("-" if c < 0 else "")) + fmt_poly([0] * power + [abs(c)], v)
        for i, (power, c) in enumerate(terms)
    )
    return Problem("polynomials__collect", f"Collect the terms in {text}.", fmt_poly(_trim(coeffs), v))


def polynomials_evaluate(rng: random.Random) -> Problem:
    v = rng.choice(VARIABLES)
    name = rng.choice([f for f in "fghjkpqrsuv" if f != v])  # "k(k) = ..." would read badly
    coeffs, x = _poly(rng, rng.randint(1, 3)), rng.randint(-6, 6)
    q = rng.choice(["Let {n}({v}) = {p}. What is {n}({x})?", "Let {n}({v}) = {p}. Calculate {n}({x})."])
    return Problem(
        "polynomials__evaluate", q.format(n=name, v=v, p=fmt_poly(coeffs, v), x=x), str(_eval_poly(coeffs, x))
    )


def polynomials_combine(rng: random.Random) -> Problem:
    v = rng.choice(VARIABLES)
    f, g = _poly(rng, rng.randint(1, 3)), _poly(rng, rng.randint(1, 3))
    a, b = _nonzero(rng, -6, 6), _nonzero(rng, -6, 6)
    n = max(len(f), len(g))
    out = _trim([a * (f[i] if i < len(f) else 0) + b * (g[i] if i < len(g) else 0) for i in range(n)])
    combo = f"{a}*f({v}) {'-' if b < 0 else '+'} {abs(b)}*g({v})"
    q = f"Let f({v}) = {fmt_poly(f, v)}. Let g({v}) = {fmt_poly(g, v)}. What is {combo}?"
    return Problem("polynomials__add", q, fmt_poly(out, v))


# ---------------------------------------------------------------- calculus


def calculus_differentiate(rng: random.Random) -> Problem:
    v = rng.choice(VARIABLES)
    coeffs = _poly(rng, rng.randint(2, 5), -12, 12)
    order = 1 if rng.random() < 0.7 else 2
    d = coeffs
    for _ in range(order):
        d = _trim([p * c for p, c in enumerate(d)][1:] or [0])
    what = "first" if order == 1 else "second"
    q = rng.choice(
        [
            f"Differentiate {fmt_poly(coeffs, v)} with respect to {v}." if order == 1 else None,
            f"What is the {what} derivative of {fmt_poly(coeffs, v)} wrt {v}?",
            f"Find the {what} derivative of {fmt_poly(coeffs, v)} wrt {v}.",
        ]
    )
    q = q or f"What is the {what} derivative of {fmt_poly(coeffs, v)} wrt {v}?"
    return Problem("calculus__differentiate", q, fmt_poly(d, v))


# ---------------------------------------------------------------- numbers


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % p for p in range(2, math.isqrt(n) + 1))


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        if n % p == 0:
            out.append(p)
            while n % p == 0:
                n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def numbers_gcd_lcm(rng: random.Random) -> Problem:
    k = rng.randint(2, 30)
    a, b = k * rng.randint(1, 40), k * rng.randint(1, 40)
    if rng.random() < 0.5:
        return Problem(
            "numbers__gcd", f"Calculate the greatest common divisor of {a} and {b}.", str(math.gcd(a, b))
        )
    lcm = a * b // math.gcd(a, b)
    return Problem("numbers__lcm", f"What is the least common multiple of {a} and {b}?", str(lcm))


def numbers_is_prime(rng: random.Random) -> Problem:
    n = rng.randint(2, 20000)
    if rng.random() < 0.5:  # about half primes, otherwise the answer is almost always False
        while not _is_prime(n):
            n += 1
    return Problem("numbers__is_prime", f"Is {n} a prime number?", str(_is_prime(n)))


def numbers_remainder(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 5000), rng.randint(2, 97)
    return Problem("numbers__div_remainder", f"What is the remainder when {a} is divided by {b}?", str(a % b))


def numbers_factors(rng: random.Random) -> Problem:
    if rng.random() < 0.5:
        n = rng.randint(2, 5000)
        return Problem(
            "numbers__list_prime_factors",
            f"List the prime factors of {n}.",
            ", ".join(map(str, _prime_factors(n))),
        )
    b = rng.randint(2, 30)
    a = b * rng.randint(2, 60) + (0 if rng.random() < 0.5 else rng.randint(1, b - 1))
    return Problem("numbers__is_factor", f"Is {b} a factor of {a}?", str(a % b == 0))


# ---------------------------------------------------------------- measurement

# Unit -> size in the dimension's base unit (metre, gram, second, litre), exact.
UNITS: dict[str, dict[str, Fraction]] = {
    "length": {
        "millimetres": Fraction(1, 1000),
        "centimetres": Fraction(1, 100),
        "metres": Fraction(1),
        "kilometres": Fraction(1000),
    },
    "mass": {
        "milligrams": Fraction(1, 1000),
        "grams": Fraction(1),
        "kilograms": Fraction(1000),
        "tonnes": Fraction(1000000),
    },
    "time": {
        "seconds": Fraction(1),
        "minutes": Fraction(60),
        "hours": Fraction(3600),
        "days": Fraction(86400),
        "weeks": Fraction(604800),
    },
    "volume": {"millilitres": Fraction(1, 1000), "litres": Fraction(1)},
}


def measurement_conversion(rng: random.Random) -> Problem:
    units = UNITS[rng.choice(sorted(UNITS))]
    src, dst = rng.sample(sorted(units), 2)
    while True:  # both the question and the answer must be short terminating decimals
        value = Fraction(rng.randint(1, 9999), rng.choice([1, 1, 10, 100]))
        answer = value * units[src] / units[dst]
        text = fmt_num(answer)
        if "/" not in text and len(text) <= 10:
            break
    q = rng.choice(
        [
            f"How many {dst} are there in {fmt_num(value)} {src}?",
            f"What is {fmt_num(value)} {src} in {dst}?",
            f"Convert {fmt_num(value)} {src} to {dst}.",
        ]
    )
    return Problem("measurement__conversion", q, text)


GENERATORS: dict[str, Callable[[random.Random], Problem]] = {
    "arithmetic__add_sub": arithmetic_add_sub,
    "arithmetic__mul_div": arithmetic_mul_div,
    "arithmetic__mixed": arithmetic_mixed,
    "arithmetic__add_fractions": arithmetic_fractions,
    "algebra__linear_1d": algebra_linear_1d,
    "algebra__linear_2d": algebra_linear_2d,
    "polynomials__expand": polynomials_expand,
    "polynomials__collect": polynomials_collect,
    "polynomials__evaluate": polynomials_evaluate,
    "polynomials__add": polynomials_combine,
    "calculus__differentiate": calculus_differentiate,
    "numbers__gcd_lcm": numbers_gcd_lcm,
    "numbers__is_prime": numbers_is_prime,
    "numbers__div_remainder": numbers_remainder,
    "numbers__factors": numbers_factors,
    "measurement__conversion": measurement_conversion,
}


def problem(rng: random.Random, module: str | None = None) -> Problem:
    """One problem from ``module`` (a GENERATORS key) or from a module chosen by ``rng``."""
    if module is None:
        module = rng.choice(sorted(GENERATORS))
    if module not in GENERATORS:
        raise ValueError(f"unknown math module {module!r}; choose from {sorted(GENERATORS)}")
    return GENERATORS[module](rng)


def document(seed: int, index: int, n_problems: int = PROBLEMS_PER_DOC) -> str:
    """Corpus document ``index`` for ``seed``: problems from mixed modules, blank-line separated."""
    rng = random.Random(f"smoe-math:{seed}:{index}")
    return "\n\n".join(problem(rng).text() for _ in range(n_problems))
