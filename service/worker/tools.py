"""Tools for the shipped teams. ``calculator`` evaluates arithmetic over the ``ast`` module, never ``eval``.

A FunctionTool in a component config is stored as the function's source code and exec'd on load, so the tool
function itself is a self-contained wrapper (it imports this module); the evaluator is ordinary code here.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable

Number = int | float

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 1000
MAX_INT_BITS = 4096  # keeps huge integer arithmetic (and its CPU time) bounded

_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    """An expression the calculator refuses; the message is meant for the user (and the model)."""


def evaluate(expression: str) -> Number:
    """The value of an arithmetic expression: numbers, + - * / // % **, unary +/-, parentheses."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression too long (at most {MAX_EXPRESSION_CHARS} characters)")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from exc
    return _eval(tree.body)


def _eval(node: ast.expr) -> Number:
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, int | float)
        and not isinstance(node.value, bool)
    ):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _binary(node.op, _eval(node.left), _eval(node.right))
    raise CalculatorError(
        f"unsupported element {type(node).__name__!r}: only numbers, + - * / // % ** and ()"
    )


def _binary(op: ast.operator, left: Number, right: Number) -> Number:
    if isinstance(op, ast.Pow):
        if abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponent too large (at most {MAX_EXPONENT})")
        if isinstance(left, int) and isinstance(right, int) and abs(left).bit_length() * right > MAX_INT_BITS:
            raise CalculatorError("result too large")
    try:
        result = _BINARY[type(op)](left, right)
    except ZeroDivisionError as exc:
        raise CalculatorError("division by zero") from exc
    except OverflowError as exc:
        raise CalculatorError("result too large") from exc
    if isinstance(result, complex):
        raise CalculatorError("the result is not a real number")
    if isinstance(result, int) and result.bit_length() > MAX_INT_BITS:
        raise CalculatorError("result too large")
    return result


def format_number(value: Number) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value)


def calculate(expression: str) -> str:
    """The result as text. A refused expression raises CalculatorError: AutoGen then reports the tool call as
    failed (``is_error: true``), with the message for the model and the user."""
    return format_number(evaluate(expression))


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression (numbers, + - * / // % **, parentheses) and return the result."""
    # Self-contained on purpose: a component config stores this function's source and exec's it on load.
    from service.worker.tools import calculate

    return calculate(expression)
