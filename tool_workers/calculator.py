"""A safe arithmetic calculator: the expression is parsed with ``ast`` and walked by
hand, so only numbers and arithmetic operators can ever run (no eval, no names).
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import ClassVar

from pydantic import Field

from tool_workers.tools import Tool, ToolArgs, ToolError, ToolOutput

__all__ = ["Calculator", "CalculatorArgs", "evaluate", "format_number"]

MAX_EXPRESSION_LENGTH = 500
# Bounds that keep every evaluation to microseconds: a big int power costs time and
# memory proportional to its digits, so we refuse before computing, not after.
MAX_EXPONENT = 10_000
MAX_RESULT_DIGITS = 300
MAX_ABS_RESULT = 10.0**MAX_RESULT_DIGITS

Number = int | float

_BINARY_OPS: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY_OPS: dict[type[ast.unaryop], Callable[[Number], Number]] = {
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
_OP_NAMES: dict[type[ast.operator], str] = {
    ast.BitXor: "^ (use ** for powers)",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.MatMult: "@",
}


class CalculatorArgs(ToolArgs):
    expression: str = Field(
        min_length=1,
        max_length=MAX_EXPRESSION_LENGTH,
        description=(
            "Arithmetic expression with numbers, + - * / // % ** and parentheses, "
            "e.g. '(2 + 3) * 4 ** 2'."
        ),
    )


class Calculator(Tool[CalculatorArgs]):
    name: ClassVar[str] = "calculator"
    description: ClassVar[str] = (
        "Evaluate an arithmetic expression exactly (integers stay exact). "
        "Supports numbers, + - * / // % **, unary minus and parentheses; no variables or functions."
    )
    args_model = CalculatorArgs
    timeout_s = 5.0

    async def __call__(self, args: CalculatorArgs) -> ToolOutput:
        return ToolOutput(output=format_number(evaluate(args.expression)))


def evaluate(expression: str) -> Number:
    """Evaluate an arithmetic expression; raise ToolError for anything else."""
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise ToolError(f"expression is longer than {MAX_EXPRESSION_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"invalid expression: {exc.msg}") from None
    except (RecursionError, MemoryError, ValueError):
        # ValueError: NUL bytes; the others: absurd nesting the parser gives up on.
        raise ToolError("invalid expression: too deeply nested or malformed") from None
    try:
        return _eval(tree.body)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError(f"result too large (limit 1e{MAX_RESULT_DIGITS})") from None
    except RecursionError:
        raise ToolError("expression too deeply nested") from None


def _eval(node: ast.expr) -> Number:
    if isinstance(node, ast.Constant):
        # bool is an int subclass and complex literals parse as constants: refuse both.
        if type(node.value) not in (int, float):
            raise ToolError(f"unsupported literal {node.value!r}: only numbers are allowed")
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp):
        unary = _UNARY_OPS.get(type(node.op))
        if unary is None:
            raise ToolError(f"unsupported unary operator {type(node.op).__name__}")
        return _checked(unary(_eval(node.operand)))
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            return _checked(_power(left, right))
        binary = _BINARY_OPS.get(type(node.op))
        if binary is None:
            name = _OP_NAMES.get(type(node.op), type(node.op).__name__)
            raise ToolError(f"unsupported operator {name}")
        return _checked(binary(left, right))
    if isinstance(node, ast.Name):
        raise ToolError(f"names are not allowed: {node.id!r}")
    if isinstance(node, ast.Call):
        raise ToolError("function calls are not allowed")
    if isinstance(node, ast.Attribute):
        raise ToolError("attribute access is not allowed")
    raise ToolError(f"unsupported syntax: {type(node).__name__}")


def _power(base: Number, exponent: Number) -> Number:
    if abs(exponent) > MAX_EXPONENT:
        raise ToolError(f"exponent {format_number(exponent)} is too large (limit {MAX_EXPONENT})")
    # Estimate an int power's digit count before computing it: 9**9999 would be exact
    # but ~9500 digits of work just to be refused.
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and exponent > 0
        and abs(base) > 1
        and exponent * math.log10(abs(base)) > MAX_RESULT_DIGITS
    ):
        raise ToolError(f"result too large (limit 1e{MAX_RESULT_DIGITS})")
    result = base**exponent
    if isinstance(result, complex):
        raise ToolError("result is not a real number (fractional power of a negative number)")
    return result


def _checked(value: Number) -> Number:
    if isinstance(value, float) and math.isnan(value):
        raise ToolError("result is not a number")
    if abs(value) > MAX_ABS_RESULT:
        raise ToolError(f"result too large (limit 1e{MAX_RESULT_DIGITS})")
    return value


def format_number(value: Number) -> str:
    """Integers (and integral floats) without a decimal point, other floats to 15 digits."""
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    # 15 significant digits always survive a float round trip, and hide noise like 0.1+0.2.
    return format(value, ".15g")
