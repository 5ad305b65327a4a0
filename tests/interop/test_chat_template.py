"""The chat template written into exports renders conversations exactly as openai-harmony does (our
`chat.render` for training, `chat.prompt` for generation), token for token through transformers'
`apply_chat_template` on the exported tokenizer."""

import pytest

from gptoss_titan.data.chat import prompt, render

transformers = pytest.importorskip("transformers")

SCHEMA = {
    "type": "object",
    "description": "Top-level object note.",
    "properties": {
        "city": {"type": "string", "description": "The city"},
        "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
        "days": {"type": "integer", "description": "how many\ndays", "default": 3},
        "ratio": {"type": "number", "title": "Ratio", "examples": ["0.5", "1"], "nullable": True},
        "flag": {"type": "boolean", "default": False},
        "tags": {
            "type": "array",
            "items": {"type": "string", "enum": ["x", "y"]},
            "default": ["x", {"k": [1, 2.5]}],
        },
        "anyarr": {"type": "array"},
        "opt": {"type": ["string", "null", "integer"]},
        "mode": {"type": "string", "default": "fast"},
        "choice": {
            "description": "Pick one",
            "default": 1,
            "oneOf": [
                {"type": "string", "description": "by name", "default": "a"},
                {"type": "integer", "nullable": True, "description": "Pick one"},
                {"type": "object", "properties": {"k": {"type": "number"}}},
            ],
        },
        "choice2": {"oneOf": [{"type": "string", "description": "same"}, {"type": "boolean"}]},
        "nested": {
            "type": "object",
            "description": "Inner",
            "properties": {"a": {"type": "string"}, "b": {"type": "array", "items": {"type": "object"}}},
            "required": ["a"],
        },
        "free": {},
        "weird": {"type": "null"},
    },
    "required": ["city", "mode"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "lookup", "description": "Look up.\nTwo lines.\n", "parameters": SCHEMA},
    },
    {"type": "function", "function": {"name": "noargs", "description": "No args."}},
    {"type": "function", "function": {"name": "empty", "description": "", "parameters": {"type": "object"}}},
    {
        "type": "function",
        "function": {
            "name": "top_oneof",
            "description": "Either.",
            "parameters": {"oneOf": [{"type": "string", "default": "q", "enum": ["q"]}, {"type": "number"}]},
        },
    },
]


def _call(name, args):
    return {"function": {"name": name, "arguments": args}}


CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    {
        "reasoning_effort": "low",
        "current_date": "2026-11-30",
        "messages": [
            {"role": "developer", "content": "Answer with a verse."},
            {"role": "user", "content": "Genesis 1:1?"},
            {"role": "assistant", "thinking": "Recall it.", "content": "In the beginning…"},
        ],
    },
    {
        "tools": TOOLS,
        "reasoning_effort": "high",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "thinking": "Use the tool.",
                "tool_calls": [_call("lookup", {"city": "Paris é"})],
            },
            {"role": "tool", "name": "lookup", "content": '{"t": 20}'},
            {"role": "assistant", "thinking": "20 degrees.", "content": "20C."},
            {"role": "user", "content": "And tomorrow?"},
            {
                "role": "assistant",
                "thinking": "Call again.",
                "tool_calls": [_call("lookup", '{"city":"Paris"}')],
            },
            {"role": "tool", "name": "lookup", "content": "21"},
            {"role": "assistant", "content": "21C."},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "thinking": "Close.", "content": "Bye"},
        ],
    },
    {  # ends with a tool call; an earlier turn without a final answer keeps its reasoning
        "tools": TOOLS[1:2],
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "thinking": "unfinished"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "thinking": "t", "tool_calls": [_call("noargs", {}), _call("noargs", {})]},
        ],
    },
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from gptoss_titan.interop.hf_tokenizer import write_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(folder, 4096)
    return transformers.AutoTokenizer.from_pretrained(folder)


def _apply(tok, conv, messages, **kw):
    extra = {k: conv[k] for k in ("reasoning_effort", "current_date") if k in conv}
    return tok.apply_chat_template(
        messages, tools=conv.get("tools"), tokenize=True, return_dict=False, **extra, **kw
    )


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_template_renders_like_harmony(tok, i):
    conv = CONVERSATIONS[i]
    msgs = conv["messages"]
    assert _apply(tok, conv, msgs) == render(conv)[0]
    for k in range(1, len(msgs)):  # every prompt along the way: after a user or a tool message
        if msgs[k - 1]["role"] in ("user", "tool"):
            sub = dict(conv, messages=msgs[:k])
            assert _apply(tok, conv, msgs[:k], add_generation_prompt=True) == prompt(sub), k


def test_template_tool_schema_text(tok):
    """A few of harmony's TypeScript renderings spelled out, so a change in either side shows."""
    text = tok.apply_chat_template(
        [{"role": "user", "content": "x"}], tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    for piece in (
        "// Look up.\n// Two lines.\ntype lookup = (_: // Top-level object note.\n{\n// The city\ncity: string,\n",
        'unit?: "c" | "f", // default: c\n',
        '// Ratio\n//\n// Examples:\n// - "0.5"\n// - "1"\nratio?: number | null,\n',
        'tags?: "x" | "y"[], // default: ["x",{"k":[1,2.5]}]\n',
        "opt?: string | null | number,\n",
        'mode: string, // default: "fast"\n',
        '// Pick one\n// default: 1\nchoice?:\n | string // default: "a"\n | number | null\n',
        "type noargs = () => any;\n\ntype empty = (_: {\n}) => any;\n",
        'type top_oneof = (_: \n | "q" // default: "q"\n | number) => any;',
        "Calls to these tools must go to the commentary channel: 'functions'.",
    ):
        assert piece in text, piece


def test_template_rejects_bad_input(tok):
    with pytest.raises(Exception, match="reasoning_effort"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], reasoning_effort="max", tokenize=False)
    with pytest.raises(Exception, match="role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)
    # a tool result without a name answers the last call
    msgs = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [_call("noargs", {})]},
        {"role": "tool", "content": "ok"},
    ]
    text = tok.apply_chat_template(msgs, tools=TOOLS[1:2], tokenize=False, add_generation_prompt=True)
    assert "<|start|>functions.noargs to=assistant<|channel|>commentary<|message|>ok<|end|>" in text
