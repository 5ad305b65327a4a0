"""The special tokens of o200k_harmony (gpt-oss's tokenizer), defined once.

Ids are fixed by the released tokenizer (tiktoken's o200k_harmony; tested in tests/data). Every
other module that needs an id or a stop token imports it from here.
"""

from __future__ import annotations

VOCAB_SIZE = 201088  # o200k_harmony's n_vocab (o200k_base's 199998 BPE ids + specials and reserved ids)

STARTOFTEXT_ID = 199998  # <|startoftext|>: Hugging Face's bos_token_id
EOT_ID = 199999  # <|endoftext|>: joins documents; Hugging Face's pad_token_id
RETURN_ID = 200002  # <|return|>: ends the assistant's final answer; Hugging Face's eos_token_id
CALL_ID = 200012  # <|call|>: ends a tool call

STOP_IDS = (RETURN_ID, EOT_ID, CALL_ID)  # generation stops at any of them
