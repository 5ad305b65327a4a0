"""RL prompts (rl/prompts.py): the JSONL's checks (file:line), the bundled task, and the seeded
order split over data-parallel ranks, resumable from its count."""

import json

import pytest

from gptoss_titan.data.arithmetic import arithmetic_rows
from gptoss_titan.rl.prompts import PromptLoader, load_prompts
from gptoss_titan.runtime.errors import DataError


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_prompts_file_rows_and_metadata(tmp_path):
    rows = [
        {
            "messages": [{"role": "user", "content": "Hi?"}],
            "answer": "hello",
            "id": 7,
            "reasoning_effort": "high",
        }
    ]
    (p,) = load_prompts(write(tmp_path / "p.jsonl", rows), 1000, needs_answer=True)
    assert p.metadata == {"answer": "hello", "id": 7} and p.conversation["reasoning_effort"] == "high"
    assert p.tokens[-2:] == [200006, 173781]  # <|start|>assistant: the model writes next


@pytest.mark.parametrize(
    "row, words",
    [
        ("{not json", "p.jsonl:2: not a JSON object"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "p.jsonl:2: a prompt ends with the user's turn",
        ),
        ({"messages": [{"role": "robot", "content": "x"}]}, "p.jsonl:2: message 0: role 'robot'"),
        (
            {"messages": [{"role": "user", "content": "x"}]},
            'p.jsonl:2: the exact_match reward needs an "answer"',
        ),
        (
            {"messages": [{"role": "user", "content": "word " * 300}], "answer": 1},
            "p.jsonl:2: the prompt has",
        ),
    ],
)
def test_bad_prompt_rows_name_file_and_line(tmp_path, row, words):
    good = {"messages": [{"role": "user", "content": "ok"}], "answer": 1}
    with pytest.raises(DataError, match=words):
        load_prompts(write(tmp_path / "p.jsonl", [good, row]), 200, needs_answer=True)
    with pytest.raises(DataError, match="not found"):
        load_prompts(str(tmp_path / "missing.jsonl"), 200, True)


def test_bundled_arithmetic_task():
    prompts = load_prompts("arithmetic", 4000, needs_answer=True)
    assert len(prompts) == len(arithmetic_rows()) and all(
        str(eval(p.conversation["messages"][-1]["content"][8:-1])) == p.metadata["answer"]
        for p in prompts[:50]
    )


def test_loader_order_split_and_resume(tmp_path):
    prompts = load_prompts("arithmetic", 4000, True)[:10]
    ranks = [PromptLoader(prompts, 4, r, 2, seed=3) for r in range(2)]
    steps = [[p for loader in ranks for p in loader.next_prompts()] for _ in range(5)]  # 20 prompts: 2 passes
    flat = [id(p) for s in steps for p in s]
    assert sorted(flat[:10]) == sorted(map(id, prompts)) and sorted(flat[10:]) == sorted(map(id, prompts))
    assert flat[:10] != flat[10:]  # each pass its own order
    again = PromptLoader(prompts, 4, 1, 2, seed=3)
    again.load_state_dict(ranks[1].state_dict() | {"prompts_seen": 8})
    assert [id(p) for p in again.next_prompts()] == [id(p) for p in steps[2][2:]]
