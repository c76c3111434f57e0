"""Math generator: every answer re-derived independently (sympy, math), and seeded determinism."""

import math
import random
import re

import pytest

from smoe.data import math_gen

sympy = pytest.importorskip("sympy")
S = lambda text: sympy.sympify(text, rational=True)  # noqa: E731 - decimals as exact rationals

# Unit sizes written out here, independently of math_gen.UNITS.
UNIT = {
    "millimetres": S("1/1000"), "centimetres": S("1/100"), "metres": 1, "kilometres": 1000,
    "milligrams": S("1/1000"), "grams": 1, "kilograms": 1000, "tonnes": 10**6,
    "seconds": 1, "minutes": 60, "hours": 60 * 60, "days": 24 * 60 * 60, "weeks": 7 * 24 * 60 * 60,
    "millilitres": S("1/1000"), "litres": 1,
}  # fmt: skip


def expected(p: math_gen.Problem):
    """(expected answer as a sympy value or string, whether to compare the answer text exactly)."""
    q = p.question
    if p.module in ("arithmetic__add_sub", "arithmetic__mixed", "arithmetic__add_fractions"):
        expr = re.fullmatch(r"(?:What is|Calculate|Work out) (.*)[?.]", q)[1]
        return S(expr), False
    if p.module == "arithmetic__mul_div":
        if m := re.fullmatch(r"Multiply (\S+) and (\S+)\.", q):
            return S(m[1]) * S(m[2]), False
        m = re.fullmatch(r"What is (\S+) divided by (\S+)\?", q)
        return S(m[1]) / S(m[2]), False
    if p.module == "algebra__linear_1d":
        lhs, rhs, v = re.fullmatch(r"Solve (.*) = (.*) for (\w)\.", q).groups()
        ((sol,),) = sympy.linsolve([S(lhs) - S(rhs)], [sympy.Symbol(v)])
        return sol, False
    if p.module == "algebra__linear_2d":
        e1, e2, v = re.fullmatch(r"Solve (.*), (.*) for (\w)\.", q).groups()
        eqs = [S(a) - S(b) for a, b in (e1.split(" = "), e2.split(" = "))]
        unknowns = sorted(set().union(*(e.free_symbols for e in eqs)), key=str)
        ((*sol,),) = sympy.linsolve(eqs, unknowns)
        return dict(zip(unknowns, sol))[sympy.Symbol(v)], False
    if p.module in ("polynomials__expand", "polynomials__collect"):
        expr = re.fullmatch(r"(?:Expand|Collect the terms in) (.*)\.", q)[1]
        return sympy.expand(S(expr)), True
    if p.module == "polynomials__evaluate":
        f, v, poly, x = re.fullmatch(
            r"Let (\w)\((\w)\) = (.*)\. (?:What is|Calculate) \1\((-?\d+)\)[?.]", q
        ).groups()
        return S(poly).subs(sympy.Symbol(v), int(x)), False
    if p.module == "polynomials__add":
        v, f, g, a, sign, b = re.fullmatch(
            r"Let f\((\w)\) = (.*)\. Let g\(\1\) = (.*)\. What is (-?\d+)\*f\(\1\) ([+-]) (\d+)\*g\(\1\)\?", q
        ).groups()
        b = int(b) if sign == "+" else -int(b)
        return sympy.expand(int(a) * S(f) + b * S(g)), True
    if p.module == "calculus__differentiate":
        m = re.fullmatch(r"Differentiate (.*) with respect to (\w)\.", q)
        if m:
            return sympy.expand(sympy.diff(S(m[1]), sympy.Symbol(m[2]))), True
        order, poly, v = re.fullmatch(
            r"(?:What is|Find) the (first|second) derivative of (.*) wrt (\w)[?.]", q
        ).groups()
        return sympy.expand(sympy.diff(S(poly), sympy.Symbol(v), 1 if order == "first" else 2)), True
    nums = [int(n) for n in re.findall(r"\d+", q)]
    if p.module == "numbers__gcd":
        return math.gcd(*nums), False
    if p.module == "numbers__lcm":
        return math.lcm(*nums), False
    if p.module == "numbers__is_prime":
        return str(sympy.isprime(nums[0])), True
    if p.module == "numbers__div_remainder":
        return sympy.Mod(nums[0], nums[1]), False
    if p.module == "numbers__list_prime_factors":
        return ", ".join(map(str, sympy.primefactors(nums[0]))), True
    if p.module == "numbers__is_factor":
        return str(sympy.Integer(nums[1]) % nums[0] == 0), True
    if p.module == "measurement__conversion":
        m = re.fullmatch(
            r"(?:How many (\w+) are there in (\S+) (\w+)\?|What is (\S+) (\w+) in (\w+)\?|Convert (\S+) (\w+) to (\w+)\.)",
            q,
        )
        g = [x for x in m.groups() if x]
        dst, value, src = (g[0], g[1], g[2]) if q.startswith("How many") else (g[2], g[0], g[1])
        return S(value) * UNIT[src] / UNIT[dst], False
    raise AssertionError(f"no independent check for module {p.module}")


@pytest.mark.parametrize("module", sorted(math_gen.GENERATORS))
def test_answers_match_independent_computation(module):
    rng = random.Random(f"test:{module}")
    seen = set()
    for _ in range(80):
        p = math_gen.problem(rng, module)
        seen.add(p.module)
        want, exact_text = expected(p)
        if isinstance(want, str):
            assert p.answer == want, p
        elif exact_text:  # an expanded polynomial: equal, and written without brackets
            assert sympy.expand(S(p.answer) - want) == 0, p
            assert "(" not in p.answer, p
        else:
            assert S(p.answer) == want, p
            assert "." not in p.answer or not p.answer.endswith(("0", ".")), p  # shortest decimal form
    assert seen  # e.g. numbers__gcd_lcm yields both numbers__gcd and numbers__lcm


def test_example_from_issue_format():
    p = math_gen.Problem("algebra__linear_1d", "Solve 3*x + 5 = 20 for x.", "5")
    assert p.text() == "Question: Solve 3*x + 5 = 20 for x.\nAnswer: 5"
    assert expected(p)[0] == 5


def test_fmt_num_and_poly():
    from fractions import Fraction

    assert [math_gen.fmt_num(Fraction(n, d)) for n, d in [(5, 1), (-1, 4), (7, 3), (-21, 20), (1, 1000)]] == [
        "5", "-0.25", "7/3", "-1.05", "0.001",
    ]  # fmt: skip
    assert math_gen.fmt_poly([-12, -5, 2], "x") == "2*x**2 - 5*x - 12"
    assert math_gen.fmt_poly([0, -1, 0, 1], "t") == "t**3 - t"
    assert math_gen.fmt_poly([0, 0], "t") == "0"


def test_documents_are_seeded_and_deterministic():
    a = [math_gen.document(0, i) for i in range(5)]
    assert a == [math_gen.document(0, i) for i in range(5)]
    assert a != [math_gen.document(1, i) for i in range(5)]
    assert len(set(a)) == 5
    doc = a[0].split("\n\n")
    assert len(doc) == math_gen.PROBLEMS_PER_DOC
    assert all(re.fullmatch(r"Question: .+\nAnswer: .+", block) for block in doc)


def test_all_modules_appear_in_documents():
    modules = set()
    rng = random.Random(0)
    for _ in range(2000):
        modules.add(math_gen.problem(rng).module.split("__")[0])
    assert modules == {"arithmetic", "algebra", "polynomials", "calculus", "numbers", "measurement"}
