"""The bundled toy verifiable task: small additions as harmony conversations with known answers.

Offline and deterministic. Two uses:
  - reinforcement learning prompts (`rl.prompts = "arithmetic"`): the question alone, with the
    answer in the row's "answer" for the exact-match reward;
  - a warm start (`data.dataset = "arithmetic_chat"`): the same questions answered, for a short
    supervised run that teaches the reply format first (as real RL starts from an instruct model).
Questions are "What is A + B?" with A, B in 0 .. MAX_TERM - 1; the answer is the number alone in
the final channel, after one line of reasoning in the analysis channel.
"""

from __future__ import annotations

import random

MAX_TERM = 10
INSTRUCTIONS = "Answer with the number only."


def arithmetic_rows(n: int = 2000, seed: int = 0, answered: bool = False) -> list[dict]:
    """n rows of the task (the MAX_TERM**2 = 100 distinct questions in a seeded order, repeated as needed);
    answered=True adds the assistant's reply (supervised warm start)."""
    pairs = [(a, b) for a in range(MAX_TERM) for b in range(MAX_TERM)]
    random.Random(seed).shuffle(pairs)
    rows = []
    for i in range(n):
        a, b = pairs[i % len(pairs)]
        messages = [
            {"role": "system", "content": INSTRUCTIONS},
            {"role": "user", "content": f"What is {a} + {b}?"},
        ]
        if answered:
            messages.append({"role": "assistant", "thinking": f"{a} plus {b}.", "content": str(a + b)})
        rows.append({"reasoning_effort": "low", "messages": messages, "answer": str(a + b)})
    return rows
