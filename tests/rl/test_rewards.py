"""Rewards (rl/rewards.py): harmony replies parsed, the built-ins, rl.reward's formula and its
one-line errors, and a reward function that raises or returns garbage."""

import re
import sys

import pytest

from gptoss_titan.data.chat import harmony
from gptoss_titan.rl.rewards import (
    RewardError,
    RewardModel,
    exact_match,
    length_penalty,
    parse_reply,
    parse_reward,
)


def toks(text: str) -> list[int]:
    return harmony().encode(text, allowed_special="all")


def test_parse_reply_channels_tool_calls_and_malformed():
    r = parse_reply(
        toks(
            "<|channel|>analysis<|message|>2 plus 3.<|end|><|start|>assistant<|channel|>final<|message|> 5.<|return|>"
        ),
        24,
    )
    assert (r.analysis, r.final, r.well_formed, r.truncated) == ("2 plus 3.", " 5.", True, False)
    assert exact_match({}, r, {"answer": 5}) == 1.0 and exact_match({}, r, {"answer": "6"}) == 0.0
    call = parse_reply(
        toks('<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a":1}<|call|>'), 24
    )
    assert (
        call.tool_calls == [{"name": "add", "arguments": '{"a":1}'}]
        and call.well_formed
        and call.final is None
    )
    cut = parse_reply(toks("<|channel|>final<|message|>5"), 24)  # no <|return|>: parsed, not well-formed
    assert cut.final == "5" and not cut.well_formed and cut.truncated
    junk = parse_reply(toks("hello there"), 24)
    assert junk.final is None and not junk.well_formed and junk.text == "hello there"


def test_length_penalty_is_dapo_soft_overlong():
    def reply(n, stop=True):
        r = parse_reply(toks("<|channel|>final<|message|>5<|return|>"), 40)
        r.tokens, r.truncated = [0] * n, not stop
        return r

    assert length_penalty({}, reply(30), {}) == 0.0  # up to 3/4 of 40
    assert length_penalty({}, reply(35), {}) == pytest.approx(-0.5)
    assert length_penalty({}, reply(40, stop=False), {}) == -1.0


def test_reward_formula_weights_signs_and_user_functions(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def parts(prompt, reply, metadata):\n    return {'a': 1.0, 'b': 0.5}\n"
        "def boom(prompt, reply, metadata):\n    raise KeyError('oops')\n"
        "def nan(prompt, reply, metadata):\n    return float('nan')\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    terms = parse_reward("exact_match + 0.1*format - 2.5e-1*length + my_rewards:parts")
    assert [(t.name, t.weight) for t in terms] == [
        ("exact_match", 1.0),
        ("format", 0.1),
        ("length", -0.25),
        ("my_rewards:parts", 1.0),
    ]
    model = RewardModel("exact_match + 0.1*format + my_rewards:parts", default=-1.0)
    r = parse_reply(toks("<|channel|>final<|message|>7<|return|>"), 24)
    total, parts = model({}, r, {"answer": "7"})
    assert total == pytest.approx(1 + 0.1 + 1.5) and parts["my_rewards:parts.b"] == 0.5 and model.errors == 0
    bad = RewardModel("my_rewards:boom + my_rewards:nan + format", default=-1.0)
    total, parts = bad({}, r, {})
    assert total == pytest.approx(-1 - 1 + 1) and bad.errors == 2


@pytest.mark.parametrize(
    "spec, words",
    [
        ("", "rl.reward is empty"),
        ("exact", "'exact' is not a built-in reward"),
        ("no_such_module_xyz:f", "module 'no_such_module_xyz' cannot be imported"),
        ("json:no_such_function", "has no function 'no_such_function'"),
        ("2**format", "cannot read '2**format'"),
        ("format exact_match", "cannot read 'exact_match'"),
    ],
)
def test_bad_reward_formula_is_one_line(spec, words):
    with pytest.raises(RewardError, match=re.escape(words)) as e:
        parse_reward(spec)
    assert "\n" not in str(e.value)
