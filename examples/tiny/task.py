"""The tiny default's synthetic task: integer addition and subtraction with checkable answers.

A problem is ``a+b=`` or ``a-b=`` where each operand has 1 to 3 digits (the digit count is drawn
uniformly, then the value uniformly among numbers with that many digits, so ``7`` is as likely an
operand length as ``512``). Subtraction always puts the larger operand first, so every answer is
a non-negative integer written in decimal without leading zeros (0 to 1998). Prompts carry no
spaces and no answer: ``"12+345="`` -> ``"357"``.

Every function here is pure apart from the ``random.Random`` it is handed.
"""

from __future__ import annotations

import random
import re

MAX_OPERAND_DIGITS = 3
OPERATORS = ("+", "-")

# The last "a<op>b=" in a string; searching (not matching) also finds the problem inside a
# chat-rendered prompt such as "<s>Q:12+3=\nA:".
_PROBLEM_RE = re.compile(r"(\d+)([+-])(\d+)=")


def _operand(rng: random.Random) -> int:
    """Draws an operand: a digit count in [1, MAX_OPERAND_DIGITS], then a value with that many digits."""
    digits = rng.randint(1, MAX_OPERAND_DIGITS)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randrange(low, 10**digits)


def solve(a: int, op: str, b: int) -> str:
    """Returns the answer text of ``a <op> b``."""
    if op == "+":
        return str(a + b)
    if op == "-":
        return str(a - b)
    raise ValueError(f"unknown operator {op!r}; known: {OPERATORS}")


def make_problem(rng: random.Random) -> tuple[str, str]:
    """Draws one problem.

    Args:
        rng: the only source of randomness.

    Returns:
        ``(prompt, answer)``, e.g. ``("12+345=", "357")``.
    """
    a, b = _operand(rng), _operand(rng)
    op = rng.choice(OPERATORS)
    if op == "-" and a < b:
        a, b = b, a
    return f"{a}{op}{b}=", solve(a, op, b)


def answer_of(prompt: str) -> str:
    """Computes the answer of the last problem written in ``prompt``.

    Raises:
        ValueError: if ``prompt`` contains no ``a<op>b=`` problem.
    """
    matches = _PROBLEM_RE.findall(prompt)
    if not matches:
        raise ValueError(f"no arithmetic problem in prompt {prompt!r}")
    a, op, b = matches[-1]
    return solve(int(a), op, int(b))


def is_correct(response: str, answer: str) -> bool:
    """Whether ``response`` is exactly ``answer`` once surrounding whitespace is stripped."""
    return response.strip() == answer.strip()


def exact_match_reward(prompt: str, response: str) -> float:
    """Reward function: 1.0 if ``response`` answers the problem in ``prompt``, else 0.0.

    The answer is computed from the prompt itself, so no answer key is needed.
    """
    return 1.0 if is_correct(response, answer_of(prompt)) else 0.0


def _change_one_digit(answer: str, rng: random.Random) -> str:
    """Replaces one digit of ``answer`` by a different one, never creating a leading zero."""
    position = rng.randrange(len(answer))
    forbidden = {answer[position]}
    if position == 0 and len(answer) > 1:
        forbidden.add("0")
    digit = rng.choice([d for d in "0123456789" if d not in forbidden])
    return answer[:position] + digit + answer[position + 1 :]


def wrong_answer(answer: str, rng: random.Random) -> str:
    """Returns a plausible wrong answer: off by one, off by ten (a missed carry), or one digit changed.

    Args:
        answer: a correct answer, a non-negative decimal integer.
        rng: the only source of randomness.

    Returns:
        A non-negative decimal integer without leading zeros that differs from ``answer``.
    """
    value = int(answer)
    candidates = [str(v) for v in (value + 1, value - 1, value + 10, value - 10) if v >= 0]
    candidates.append(_change_one_digit(str(value), rng))
    return rng.choice(candidates)
