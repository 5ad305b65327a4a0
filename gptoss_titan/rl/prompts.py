"""Prompts for reinforcement learning: a JSONL of conversations (or the bundled toy task), rendered
by harmony for completion, handed out in a seeded order.

A row is a chat row (data/chat.py) whose conversation ends with the user's turn, plus anything
the reward needs:
  {"messages": [{"role": "system", ...}?, {"role": "user", "content": "What is 2 + 3?"}],
   "reasoning_effort": "low", "tools": [...]?, "answer": "5", ...}
Every field but messages, tools, reasoning_effort and current_date is the row's metadata, passed to
the reward function. A bad row stops the run before anything is written (file:line, exit 2).

Order: each pass over the rows is a permutation seeded by (training.seed, pass); step s takes the
global prompts s*P .. (s+1)*P - 1 (P = rl.prompts_per_step) and data-parallel rank r its share.
The position is the count of prompts handed out, saved in checkpoints, so a resumed run continues
with the same prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.errors import DataError

CHAT_KEYS = ("messages", "tools", "reasoning_effort", "current_date")


@dataclass
class Prompt:
    tokens: list[int]  # harmony's completion render, ending in <|start|>assistant
    conversation: dict  # the row's conversation fields
    metadata: dict  # the row's other fields


def load_prompts(source: str, max_prompt_tokens: int, needs_answer: bool) -> list[Prompt]:
    """rl.prompts ("arithmetic" or a .jsonl path) -> its prompts, every row checked."""
    from ..data.chat import ChatError, prompt

    if source == "arithmetic":
        from ..data.arithmetic import arithmetic_rows

        rows, where = list(enumerate(arithmetic_rows(), 1)), "arithmetic (bundled)"
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(
                f'rl.prompts {source!r} not found; pass a .jsonl of conversations or "arithmetic" (the toy task)'
            )
        rows, where = [], str(path)
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    try:
                        rows.append((lineno, json.loads(raw.decode("utf-8"))))
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise DataError(
                            f"{path}:{lineno}: not a JSON object ({e}); fix or remove the line"
                        ) from None
    out = []
    for lineno, row in rows:
        if not isinstance(row, dict):
            raise DataError(f'{where}:{lineno}: expected a JSON object with "messages"')
        msgs = row.get("messages")
        if (
            isinstance(msgs, list)
            and msgs
            and isinstance(msgs[-1], dict)
            and msgs[-1].get("role") == "assistant"
        ):
            raise DataError(
                f"{where}:{lineno}: a prompt ends with the user's turn; remove the assistant's reply"
            )
        try:
            tokens = prompt(row)
        except ChatError as e:
            raise DataError(f"{where}:{lineno}: {e}") from None
        if len(tokens) > max_prompt_tokens:
            raise DataError(
                f"{where}:{lineno}: the prompt has {len(tokens)} tokens, over the {max_prompt_tokens} that "
                "rl.max_new_tokens leaves of training.seq_len; shorten it, raise training.seq_len or lower "
                "rl.max_new_tokens"
            )
        if needs_answer and "answer" not in row:
            raise DataError(f'{where}:{lineno}: the exact_match reward needs an "answer" field in every row')
        conv = {k: row[k] for k in CHAT_KEYS if k in row}
        out.append(Prompt(tokens, conv, {k: v for k, v in row.items() if k not in CHAT_KEYS}))
    if not out:
        raise DataError(f"rl.prompts {source!r} holds no prompt")
    return out


class PromptLoader:
    """This data-parallel rank's prompts, step after step (the Stateful 'dataloader' of an RL run)."""

    def __init__(self, prompts: list[Prompt], per_step: int, dp_rank: int, dp_degree: int, seed: int):
        self.prompts, self.per_step = prompts, per_step
        self.dp_rank, self.dp_degree, self.seed = dp_rank, dp_degree, seed
        self.seen = 0  # global prompts handed out so far
        self._cached: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts)))
        return self._cached[1]

    def next_prompts(self) -> list[Prompt]:
        share = self.per_step // self.dp_degree
        start = self.seen + self.dp_rank * share
        n = len(self.prompts)
        picked = [self.prompts[self._order(k // n)[k % n]] for k in range(start, start + share)]
        self.seen += self.per_step
        return picked

    def state_dict(self) -> dict:
        return {"prompts_seen": self.seen, "num_prompts": len(self.prompts)}

    def load_state_dict(self, state: dict) -> None:
        self.seen = int(state["prompts_seen"])
