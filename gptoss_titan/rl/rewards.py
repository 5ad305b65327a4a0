"""Rewards: the parsed harmony reply, the built-in reward terms, and `rl.reward`'s formula.

`rl.reward` is a sum of terms, each a name with an optional weight:
  "exact_match"                          the built-in exact match (1 or 0)
  "exact_match + 0.2*format - 0.1*length"
  "my_rewards:score + 0.1*format"        a function of yours: module:function, importable from the
                                         working folder or installed
A reward function is called as fn(prompt, reply, metadata):
  prompt    the row's conversation ({"messages": [...], ...} as in the prompts file)
  reply     a `Reply`: the completion parsed by harmony (analysis, final, tool calls, text, ...)
  metadata  the row's other fields ("answer", and anything you put there)
and returns a float, or a dict of named floats (components, logged as reward/<term>.<name>, summed
into the term). A function that raises, or returns something else or a non-finite number, gives
the completion `rl.reward_default` for that term and is counted (`reward_errors`), with a warning.

Built-ins:
  exact_match  1 if the final channel's text equals str(metadata["answer"]) (both stripped of
               surrounding whitespace and a trailing period) in a reply that was not cut off, else 0
  format       1 if the reply is well-formed harmony ending in <|return|> with a final message,
               or in <|call|> after a tool call; else 0
  length       DAPO's soft overlong penalty: 0 up to 3/4 of rl.max_new_tokens, then falling
               linearly to -1 at rl.max_new_tokens (truncated replies get -1)
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from ..model.tokens import CALL_ID, EOT_ID, RETURN_ID
from ..runtime.errors import UserError
from ..runtime.log import logger


class RewardError(UserError):
    """A bad rl.reward (a name, a module, a function): one line, exit 2."""


@dataclass
class Reply:
    """One completion, as a reward function sees it."""

    tokens: list[int]  # the sampled tokens, the stop token included
    text: str  # tokens decoded (special tokens shown)
    analysis: str  # the analysis channel's text (messages joined by newlines)
    final: str | None  # the final channel's text; None when there is none
    tool_calls: list[dict] = field(default_factory=list)  # [{"name": ..., "arguments": str}]
    well_formed: bool = False  # parsed by harmony and ended by <|return|> or <|call|>
    truncated: bool = False  # rl.max_new_tokens reached before a stop token
    max_new_tokens: int = 0


def parse_reply(tokens: list[int], max_new_tokens: int, truncated: bool | None = None) -> Reply:
    """Sampled tokens (after the prompt's `<|start|>assistant`) -> Reply, by openai-harmony.
    truncated: whether sampling ran out of rl.max_new_tokens before a stop token (the rollout knows;
    by default: the reply does not end in a stop token)."""
    from openai_harmony import Role

    from ..data.chat import harmony

    enc = harmony()
    ended = bool(tokens) and tokens[-1] in (RETURN_ID, CALL_ID, EOT_ID)
    reply = Reply(list(tokens), enc.decode(tokens), "", None, truncated=not ended if truncated is None else truncated,
                  max_new_tokens=max_new_tokens)  # fmt: skip
    try:
        msgs = enc.parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)
    except Exception:  # malformed harmony (the model's fault, not the user's): text only
        return reply
    analysis, finals = [], []
    for m in msgs:
        text = "".join(c.text for c in m.content if hasattr(c, "text"))
        if m.channel == "analysis":
            analysis.append(text)
        elif m.channel == "final":
            finals.append(text)
        elif m.recipient and m.recipient.startswith("functions."):
            reply.tool_calls.append({"name": m.recipient.removeprefix("functions."), "arguments": text})
    reply.analysis = "\n".join(analysis)
    reply.final = "\n".join(finals) if finals else None
    by_return = tokens[-1:] == [RETURN_ID] and reply.final is not None
    by_call = tokens[-1:] == [CALL_ID] and bool(reply.tool_calls)
    reply.well_formed = by_return or by_call
    return reply


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip()).removesuffix(".").strip()


def exact_match(prompt: dict, reply: Reply, metadata: dict) -> float:
    if reply.final is None or reply.truncated or "answer" not in metadata:
        return 0.0
    return float(_norm(reply.final) == _norm(str(metadata["answer"])))


def format_reward(prompt: dict, reply: Reply, metadata: dict) -> float:
    return float(reply.well_formed)


def length_penalty(prompt: dict, reply: Reply, metadata: dict) -> float:
    if reply.truncated:
        return -1.0
    soft = 0.75 * reply.max_new_tokens
    over = len(reply.tokens) - soft
    return -min(1.0, over / (reply.max_new_tokens - soft)) if over > 0 else 0.0


BUILTINS: dict[str, Callable] = {
    "exact_match": exact_match,
    "format": format_reward,
    "length": length_penalty,
}


@dataclass
class Term:
    name: str  # as written: a built-in or module:function
    weight: float
    fn: Callable


_NUM = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_TERM = re.compile(
    rf"\s*(?P<sign>[+-])?\s*(?:(?P<w>{_NUM})\s*\*\s*)?(?P<name>[A-Za-z_][\w.]*(?::[A-Za-z_]\w*)?)\s*"
)


def parse_reward(spec: str) -> list[Term]:
    """rl.reward's formula -> its terms, each function imported (RewardError: one line, the fix)."""
    if not spec.strip():
        raise RewardError('rl.reward is empty; name a reward, e.g. rl.reward = "exact_match + 0.1*format"')
    terms, pos = [], 0
    while pos < len(spec):
        m = _TERM.match(spec, pos)
        if m is None or m.end() == pos or (terms and not m["sign"]):
            rest = spec[pos:].strip()
            raise RewardError(
                f"rl.reward: cannot read {rest!r} in {spec!r}; write terms [WEIGHT*]NAME joined by + or - "
                f"(NAME: {', '.join(BUILTINS)} or module:function)"
            )
        w = float(m["w"]) if m["w"] else 1.0
        terms.append(Term(m["name"], -w if m["sign"] == "-" else w, _resolve(m["name"])))
        pos = m.end()
    return terms


def _resolve(name: str) -> Callable:
    if ":" not in name:
        if name not in BUILTINS:
            raise RewardError(
                f"rl.reward: {name!r} is not a built-in reward ({', '.join(BUILTINS)}); name your own "
                "as module:function"
            )
        return BUILTINS[name]
    module, fn_name = name.split(":")
    if os.getcwd() not in sys.path and "" not in sys.path:  # the working folder, as `python -m` has it
        sys.path.append(os.getcwd())
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # ImportError, or the module raised while importing
        why = f"{type(e).__name__}: {e}".splitlines()[0]
        raise RewardError(
            f"rl.reward: module {module!r} cannot be imported ({why}); put {module}.py in the working "
            "folder or install it"
        ) from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise RewardError(
            f"rl.reward: module {module!r} has no function {fn_name!r}; define "
            f"def {fn_name}(prompt, reply, metadata) -> float"
        )
    return fn


class RewardModel:
    """Scores completions with rl.reward's terms; errors give `default` and are counted."""

    def __init__(self, spec: str, default: float):
        self.terms = parse_reward(spec)
        self.default = default
        self.errors = 0  # in the current step (the trainer reads and resets it)

    def __call__(self, prompt: dict, reply: Reply, metadata: dict) -> tuple[float, dict[str, float]]:
        """-> (total, {component name: value}) of one completion."""
        total, parts = 0.0, {}
        for term in self.terms:
            value = self._call(term, prompt, reply, metadata)
            if isinstance(value, dict):
                for k, v in value.items():
                    parts[f"{term.name}.{k}"] = v
                value = sum(value.values())
            parts[term.name] = value
            total += term.weight * value
        return total, parts

    def _call(self, term: Term, prompt: dict, reply: Reply, metadata: dict) -> float | dict[str, float]:
        try:
            value = term.fn(prompt, reply, metadata)
            if isinstance(value, dict):
                value = {str(k): float(v) for k, v in value.items()}
                ok = all(math.isfinite(v) for v in value.values())
            else:
                value = float(value)
                ok = math.isfinite(value)
            if not ok:
                raise ValueError(f"returned a non-finite value {value!r}")
            return value
        except Exception as e:
            self.errors += 1
            if self.errors == 1:  # once per step: the count is in the metrics
                why = f"{type(e).__name__}: {e}".splitlines()[0]
                logger.info(f"warning: reward {term.name} failed ({why}); the completion gets {self.default}")
            return self.default
