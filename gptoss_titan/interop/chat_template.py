"""The harmony chat template written into exported `tokenizer_config.json`.

A Jinja template that renders an OpenAI-style conversation exactly as `data/chat.py` does with the
official openai-harmony renderer, token for token (tested against harmony on varied conversations):
system message (identity, knowledge cutoff, optional `current_date`, `reasoning_effort` low|medium|
high, default medium, channels), a developer message with the system/developer prompts as
`# Instructions` and the tools as harmony's TypeScript-like `namespace functions` (the same rules as
harmony's JSON-schema renderer: descriptions, titles, examples, defaults, enums, nullable, arrays,
nested objects, oneOf), user turns, assistant `thinking` (analysis channel), `tool_calls`
(commentary to=functions.NAME, `<|constrain|>json`, `<|call|>`), `content` (final), tool results
(`name`, or the name of the last call). The reasoning of a finished earlier turn (one that has a
final answer) is dropped, as at inference; the current turn keeps it. A conversation that ends with
an assistant answer ends in `<|return|>` (harmony's training render); `add_generation_prompt` ends
the prompt with `<|start|>assistant`.

Written here rather than copied from the release: the release's template has its own conventions
(today's date always, different handling of earlier reasoning); this one is pinned to what we train
on. Only core Jinja, `tojson` and `raise_exception` (compact JSON for defaults is built here).
"""

HARMONY_CHAT_TEMPLATE = r"""
{%- macro is_list(x) -%}{%- if x is iterable and x is not string and x is not mapping -%}1{%- endif -%}{%- endmacro -%}
{%- macro has_list(s, key) -%}{%- if s is mapping and key in s and is_list(s[key]) -%}1{%- endif -%}{%- endmacro -%}
{%- macro is_enum(s) -%}{%- if has_list(s, 'enum') and s['enum'] | length > 0 -%}1{%- endif -%}{%- endmacro -%}
{%- macro json(v) -%}
{%- if v is mapping -%}{{ '{' }}{%- for k, x in v.items() -%}{{ k | tojson }}:{{ json(x) }}{{ ',' if not loop.last }}{%- endfor -%}{{ '}' }}
{%- elif is_list(v) -%}[{%- for x in v -%}{{ json(x) }}{{ ',' if not loop.last }}{%- endfor -%}]
{%- else -%}{{ v | tojson }}
{%- endif -%}
{%- endmacro -%}
{%- macro dflt(s, json_enum) -%}
{%- if s['default'] is string and not is_enum(s) -%}default: "{{ s['default'] }}"
{%- elif s['default'] is string and not json_enum -%}default: {{ s['default'] }}
{%- else -%}default: {{ json(s['default']) }}
{%- endif -%}
{%- endmacro -%}
{%- macro nullable(s, t) -%}
{%- if s is mapping and s['nullable'] is sameas true and 'null' not in t %} | null{%- endif -%}
{%- endmacro -%}
{%- macro ts(s, indent) -%}
{%- if has_list(s, 'oneOf') -%}
{%- for v in s['oneOf'] -%}
{%- set t = ts(v, indent ~ '   ') -%}
{%- set notes = ([v['description']] if v is mapping and v['description'] is string else [])
    + ([dflt(v, true)] if v is mapping and 'default' in v else []) -%}
{{- '\n' ~ indent ~ ' | ' ~ t ~ nullable(v, t) -}}
{%- if notes %} // {{ notes | join(' ') }}{%- endif -%}
{%- endfor -%}
{%- elif has_list(s, 'type') and s['type'] | select('string') | list | length > 0 -%}
{%- set ns = namespace(out=[]) -%}
{%- for t in s['type'] if t is string -%}
{%- set ns.out = ns.out + ['number' if t == 'integer' else t] -%}
{%- endfor -%}
{{- ns.out | join(' | ') -}}
{%- elif s is mapping and s['type'] is string -%}
{%- if s['type'] == 'object' -%}
{%- if s['description'] is string -%}{{ indent }}// {{ s['description'] ~ '\n' }}{%- endif -%}
{{- '{\n' -}}
{%- if s['properties'] is mapping -%}
{%- set required = s['required'] if has_list(s, 'required') else [] -%}
{%- for key, val in s['properties'].items() -%}
{%- set m = val is mapping -%}
{%- set mark = '' if key in required else '?' -%}
{%- if m and val['title'] is string -%}{{ indent }}// {{ val['title'] ~ '\n' ~ indent }}//{{ '\n' }}{%- endif -%}
{%- if m and 'oneOf' not in val and val['description'] is string -%}{{ indent }}// {{ val['description'] ~ '\n' }}{%- endif -%}
{%- if has_list(val, 'examples') and val['examples'] | length > 0 -%}
{{- indent }}// Examples:{{ '\n' -}}
{%- for ex in val['examples'] if ex is string -%}{{ indent }}// - "{{ ex }}"{{ '\n' }}{%- endfor -%}
{%- endif -%}
{%- if has_list(val, 'oneOf') -%}
{%- set first = val['oneOf'][0] if val['oneOf'] | length > 0 else none -%}
{%- set pdesc = val['description'] if val['description'] is string else none -%}
{%- set above = pdesc is not none and not (first is mapping and first['description'] is string
    and first['description'] == pdesc) -%}
{%- if above -%}{{ indent }}// {{ pdesc ~ '\n' }}{%- endif -%}
{%- if 'default' in val -%}{{ indent }}// {{ dflt(val, false) ~ '\n' }}{%- endif -%}
{{- indent ~ key ~ mark }}:{{ '\n' -}}
{%- for v in val['oneOf'] -%}
{%- set t = ts(v, indent ~ '   ') -%}
{%- set own = v['description'] if v is mapping and v['description'] is string and v['description'] != pdesc
    and not (loop.first and above) else none -%}
{%- set notes = ([own] if own is not none else []) + ([dflt(v, false)] if v is mapping and 'default' in v else []) -%}
{{- indent }} | {{ t ~ nullable(v, t) -}}
{%- if notes %} // {{ notes | join(' ') }}{%- endif -%}
{{- '\n' -}}
{%- endfor -%}
{{- indent }},{{ '\n' -}}
{%- else -%}
{%- set t = ts(val, indent ~ '    ') -%}
{{- indent ~ key ~ mark }}: {{ t ~ nullable(val, t) }},
{%- if m and 'oneOf' not in val and 'default' in val %} // {{ dflt(val, false) }}{%- endif -%}
{{- '\n' -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- indent }}}
{%- elif s['type'] == 'string' -%}
{%- set vals = s['enum'] | select('string') | list if has_list(s, 'enum') else [] -%}
{%- if vals -%}{%- for v in vals -%}"{{ v }}"{{ ' | ' if not loop.last }}{%- endfor -%}{%- else -%}string{%- endif -%}
{%- elif s['type'] in ['number', 'integer'] -%}number
{%- elif s['type'] == 'boolean' -%}boolean
{%- elif s['type'] == 'array' -%}{{ ts(s['items'], indent) ~ '[]' if 'items' in s else 'Array<any>' }}
{%- else -%}any
{%- endif -%}
{%- else -%}any
{%- endif -%}
{%- endmacro -%}
{%- macro lines(text) -%}
{%- set body = text[:-1] if text.endswith('\n') else text -%}
{%- if text -%}{%- for line in body.split('\n') -%}// {{ line[:-1] if line.endswith('\r') else line }}{{ '\n' }}{%- endfor -%}{%- endif -%}
{%- endmacro -%}

{#- what the conversation holds: instructions, tools, user turns, finished turns -#}
{%- set tools = tools or [] -%}
{%- set ns = namespace(instructions=[], users=0, done=[]) -%}
{%- for m in messages -%}
{%- if m['role'] in ['system', 'developer'] -%}{%- set ns.instructions = ns.instructions + [m['content']] -%}
{%- elif m['role'] == 'user' -%}{%- set ns.users = ns.users + 1 -%}
{%- elif m['role'] == 'assistant' and m['content'] -%}{%- set ns.done = ns.done + [ns.users] -%}
{%- endif -%}
{%- endfor -%}

{#- system -#}
{%- set effort = reasoning_effort or 'medium' -%}
{%- if effort not in ['low', 'medium', 'high'] -%}
{{- raise_exception('reasoning_effort ' ~ effort ~ ' is not one of low, medium, high') -}}
{%- endif -%}
{%- set head = ['You are ChatGPT, a large language model trained by OpenAI.', 'Knowledge cutoff: 2024-06'] -%}
{%- if current_date is defined and current_date -%}{%- set head = head + ['Current date: ' ~ current_date] -%}{%- endif -%}
{%- set channels = '# Valid channels: analysis, commentary, final. Channel must be included for every message.' -%}
{%- if tools -%}
{%- set channels = channels ~ "\nCalls to these tools must go to the commentary channel: 'functions'." -%}
{%- endif -%}
<|start|>system<|message|>{{ head | join('\n') ~ '\n\nReasoning: ' ~ effort ~ '\n\n' ~ channels }}<|end|>

{#- developer: instructions and tools -#}
{%- if ns.instructions or tools -%}
<|start|>developer<|message|>
{%- if ns.instructions -%}# Instructions{{ '\n\n' ~ ns.instructions | join('\n\n') }}{{ '\n\n' if tools }}{%- endif -%}
{%- if tools -%}
# Tools{{ '\n\n' }}## functions{{ '\n\n' }}namespace functions {{ '{\n\n' -}}
{%- for t in tools -%}
{%- set f = t['function'] if t is mapping and 'function' in t else t -%}
{{- lines(f['description'] or '') -}}
{%- if f['parameters'] is defined and f['parameters'] is not none -%}
type {{ f['name'] }} = (_: {{ ts(f['parameters'], '') }}) => any;{{ '\n\n' }}
{%- else -%}
type {{ f['name'] }} = () => any;{{ '\n\n' }}
{%- endif -%}
{%- endfor -%}
{{- '} // namespace functions' -}}
{%- endif -%}
<|end|>
{%- endif -%}

{#- the messages -#}
{%- set st = namespace(turn=0, call='') -%}
{%- for m in messages -%}
{%- if m['role'] == 'user' -%}
{%- set st.turn = st.turn + 1 -%}
<|start|>user<|message|>{{ m['content'] }}<|end|>
{%- elif m['role'] == 'assistant' -%}
{%- if m['thinking'] and not (st.turn < ns.users and st.turn > 0 and st.turn in ns.done) -%}
<|start|>assistant<|channel|>analysis<|message|>{{ m['thinking'] }}<|end|>
{%- endif -%}
{%- for c in m['tool_calls'] or [] -%}
{%- set f = c['function'] if 'function' in c else c -%}
{%- set st.call = f['name'] -%}
<|start|>assistant to=functions.{{ f['name'] }}<|channel|>commentary <|constrain|>json<|message|>
{{- f['arguments'] if f['arguments'] is string else (f['arguments'] or {}) | tojson -}}
<|call|>
{%- endfor -%}
{%- if m['content'] -%}
<|start|>assistant<|channel|>final<|message|>{{ m['content'] }}
{{- '<|return|>' if loop.last and not add_generation_prompt else '<|end|>' -}}
{%- endif -%}
{%- elif m['role'] == 'tool' -%}
{%- set name = m['name'] or st.call -%}
{%- if not name -%}{{ raise_exception('a tool message needs the name of the tool it answers') }}{%- endif -%}
<|start|>functions.{{ name }} to=assistant<|channel|>commentary<|message|>{{ m['content'] }}<|end|>
{%- elif m['role'] not in ['system', 'developer'] -%}
{{- raise_exception('role ' ~ m['role'] ~ ' is not one of system, developer, user, assistant, tool') -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}
"""
