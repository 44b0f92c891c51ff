"""Is a generated answer right? A Geo3K answer matcher.

Geo3K answers are numbers written in LaTeX-ish text: "80", "5 \\sqrt { 3 }", "\\frac { 7 } { 2 }", "2 \\pi",
"14.5". A model may wrap its answer in `\\boxed{}` or prefix it with "Answer:". Both sides are normalised,
then compared as numbers (relative tolerance 1e-5, so 8.66 does not match 5√3 = 8.660254 but 8.6603 does)
when both evaluate, else as normalised strings.
"""

from __future__ import annotations

import ast
import math
import operator
import re

_BOXED = re.compile(r"\\boxed\s*{")


def extract_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced; None if there is none."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i, depth, out = starts[-1], 1, []
    while i < len(text):
        c = text[i]
        depth += c == "{"
        depth -= c == "}"
        if depth == 0:
            return "".join(out)
        out.append(c)
        i += 1
    return None


def _strip(text: str) -> str:
    text = text.strip()
    boxed = extract_boxed(text)
    if boxed is not None:
        text = boxed
    text = re.sub(r"(?i)^\s*(the\s+)?(final\s+)?answer\s*(is)?\s*[:=]?\s*", "", text)
    text = re.sub(r"^[a-zA-Z]\s*=\s*", "", text)  # "x = 5"
    text = text.replace("$", "").rstrip(". ")
    text = re.sub(r"\^\s*{?\s*\\circ\s*}?|°|\\degree", "", text)
    return text.strip()


def _latex_to_expr(text: str) -> str:
    s = text
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    # \frac {a} {b} -> ((a)/(b)), innermost first
    frac = re.compile(r"\\frac\s*{([^{}]*)}\s*{([^{}]*)}")
    sqrt_n = re.compile(r"\\sqrt\s*\[([^\]]*)\]\s*{([^{}]*)}")
    sqrt = re.compile(r"\\sqrt\s*{([^{}]*)}")
    for _ in range(10):
        new = frac.sub(r"((\1)/(\2))", s)
        new = sqrt_n.sub(r"((\2)**(1/(\1)))", new)
        new = sqrt.sub(r"sqrt(\1)", new)
        if new == s:
            break
        s = new
    s = re.sub(r"\\sqrt\s*(\d+(?:\.\d+)?)", r"sqrt(\1)", s)  # \sqrt3
    s = s.replace("\\pi", " pi ").replace("π", " pi ").replace("\\times", "*").replace("\\cdot", "*")
    s = s.replace("^", "**").replace("{", "(").replace("}", ")").replace(",", "")
    s = s.replace("√", "sqrt")
    # implicit multiplication: "5 sqrt(3)", "2 pi", "3(4)"
    s = re.sub(r"(\d|\))\s*(?=sqrt|pi|\()", r"\1*", s)
    s = re.sub(r"(pi)\s*(?=\d|sqrt|\()", r"\1*", s)
    return s.strip()


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv, ast.Pow: operator.pow}


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Name) and node.id == "pi":
        return math.pi
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "sqrt" and len(node.args) == 1:
        return math.sqrt(_eval(node.args[0]))
    raise ValueError(f"unsupported expression: {ast.dump(node)[:40]}")


def to_number(text: str) -> float | None:
    """The numeric value of an answer string, or None if it is not a plain expression."""
    expr = _latex_to_expr(_strip(text))
    if not expr or len(expr) > 200:
        return None
    try:
        value = _eval(ast.parse(expr, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None
    return value if math.isfinite(value) else None


def normalize(text: str) -> str:
    return re.sub(r"\s+", "", _strip(text)).lower()


def is_correct(prediction: str, reference: str, rel_tol: float = 1e-5) -> bool:
    pred = prediction.split("<|im_end|>")[0]
    a, b = to_number(pred), to_number(reference)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)
    return normalize(pred) == normalize(reference) and normalize(reference) != ""
