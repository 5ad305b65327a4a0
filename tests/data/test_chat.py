"""Chat rendering (harmony, offline) and loss masks: exactly the intended tokens, malformed input
named."""

import pytest

from gptoss_titan.data.chat import ChatError, harmony, render

TOOL_CONV = {
    "reasoning_effort": "low",
    "tools": [{"type": "function", "function": {"name": "calc", "description": "adds", "parameters": {}}}],
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "thinking": "Easy.", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {
            "role": "assistant",
            "thinking": "Use the tool.",
            "tool_calls": [{"function": {"name": "calc", "arguments": {"x": 3}}}],
        },
        {"role": "tool", "name": "calc", "content": "6"},
        {"role": "assistant", "content": "6"},
    ],
}


def spans(tokens, mask) -> list[str]:
    """The decoded runs of masked tokens."""
    enc, out, run = harmony(), [], []
    for t, m in zip(tokens + [None], mask + [False]):
        if m:
            run.append(t)
        elif run:
            out.append(enc.decode_utf8(run))
            run = []
    return out


def test_rendering_is_harmonys_own():
    from openai_harmony import (
        Author,
        Conversation,
        DeveloperContent,
        Message,
        ReasoningEffort,
        Role,
        SystemContent,
        ToolDescription,
    )

    enc = harmony()
    msgs = [
        Message.from_role_and_content(
            Role.SYSTEM, SystemContent.new().with_reasoning_effort(ReasoningEffort.LOW)
        ),
        Message.from_role_and_content(
            Role.DEVELOPER,
            DeveloperContent.new()
            .with_instructions("Be brief.")
            .with_function_tools([ToolDescription.new("calc", "adds", parameters={})]),
        ),
        Message.from_role_and_content(Role.USER, "What is 2+2?"),
        Message.from_role_and_content(Role.ASSISTANT, "Easy.").with_channel("analysis"),
        Message.from_role_and_content(Role.ASSISTANT, "4").with_channel("final"),
        Message.from_role_and_content(Role.USER, "And 3+3?"),
        Message.from_role_and_content(Role.ASSISTANT, "Use the tool.").with_channel("analysis"),
        Message.from_role_and_content(Role.ASSISTANT, '{"x": 3}')
        .with_channel("commentary")
        .with_recipient("functions.calc")
        .with_content_type("<|constrain|>json"),
        Message.from_author_and_content(Author.new(Role.TOOL, "functions.calc"), "6")
        .with_channel("commentary")
        .with_recipient("assistant"),
        Message.from_role_and_content(Role.ASSISTANT, "6").with_channel("final"),
    ]
    want = enc.render_conversation_for_training(Conversation.from_messages(msgs))
    tokens, _ = render(TOOL_CONV)
    assert tokens == want


def test_masks_cover_exactly_the_intended_tokens():
    tokens, mask = render(TOOL_CONV)  # last_turn
    assert spans(tokens, mask) == [
        "<|channel|>analysis<|message|>Use the tool.<|end|><|start|>assistant to=functions.calc<|channel|>commentary "
        '<|constrain|>json<|message|>{"x": 3}<|call|>',
        "<|channel|>final<|message|>6<|return|>",
    ]
    tokens, mask = render(TOOL_CONV, "final")
    assert spans(tokens, mask) == ["<|channel|>final<|message|>6<|return|>"]
    tokens, mask = render(TOOL_CONV, "all")
    assert (
        spans(tokens, mask)[0] == "<|channel|>final<|message|>4<|end|>"
    )  # turn 1's analysis is not rendered
    assert len(spans(tokens, mask)) == 3
    assert harmony().decode_utf8(tokens).endswith("<|start|>assistant<|channel|>final<|message|>6<|return|>")


@pytest.mark.parametrize(
    "conv, match",
    [
        ({"messages": []}, "non-empty"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]},
            "role 'robot'",
        ),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}, "needs content, thinking"),
        ({"messages": [{"role": "user", "content": 3}]}, "user content must be a string"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "must end with an assistant message"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}]},
            'needs the "name"',
        ),
        (
            {"reasoning_effort": "max", "messages": [{"role": "user", "content": "q"}]},
            "reasoning_effort 'max'",
        ),
    ],
)
def test_malformed_conversations_are_named(conv, match):
    with pytest.raises(ChatError, match=match):
        render(conv)


def test_last_turn_keeps_its_reasoning():
    """Harmony's default training render drops reasoning followed directly by the final answer; we
    keep the last turn's (it is what SFT teaches) and drop finished earlier turns' (as inference)."""
    from openai_harmony import Conversation, Message, RenderConversationConfig, Role, SystemContent

    enc = harmony()
    conv = {
        "messages": [
            {"role": "user", "content": "a?"},
            {"role": "assistant", "thinking": "t1", "content": "A"},
            {"role": "user", "content": "b?"},
            {"role": "assistant", "thinking": "t2", "content": "B"},
        ]
    }
    tokens, mask = render(conv)
    expected = [
        Message.from_role_and_content(Role.SYSTEM, SystemContent.new()),
        Message.from_role_and_content(Role.USER, "a?"),
        Message.from_role_and_content(Role.ASSISTANT, "A").with_channel("final"),
        Message.from_role_and_content(Role.USER, "b?"),
        Message.from_role_and_content(Role.ASSISTANT, "t2").with_channel("analysis"),
        Message.from_role_and_content(Role.ASSISTANT, "B").with_channel("final"),
    ]
    keep = RenderConversationConfig(auto_drop_analysis=False)
    assert tokens == enc.render_conversation_for_training(Conversation.from_messages(expected), keep)
    assert spans(tokens, mask) == [
        "<|channel|>analysis<|message|>t2<|end|><|start|>assistant<|channel|>final<|message|>B<|return|>"
    ]
    assert "t1" not in enc.decode_utf8(tokens)
