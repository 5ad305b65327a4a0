"""Loading a JobConfig from a TOML file plus `--section.field=value` overrides, and `--help`.

Loading is strict: unknown sections or keys are errors that suggest the closest valid name, and
every value is type-checked; `validate()` runs at the end.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
import typing
from pathlib import Path

from ..model.args import ModelArgs
from .job_config import ConfigError, JobConfig
from .lora_checks import validate_lora
from .rl_checks import validate_rl
from .validation import closest, validate

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# Table fields: (section, field) -> the dataclass whose fields its entries set.
TABLES = {"model": {"args": ModelArgs}}


def _field_types(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(where: str, value, tp):
    origin = typing.get_origin(tp)
    if origin in (list,):
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list of {_type_name(item)}, got {value!r}")
        return [_check_value(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):  # a table of a list of tables ([[data.sources]])
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table ({', '.join(_field_types(tp))}), got {value!r}")
        types_ = _field_types(tp)
        for k in value:
            if k not in types_:
                raise ConfigError(f"unknown key {where}.{k}{closest(k, list(types_))}")
        return tp(**{k: _check_value(f"{where}.{k}", v, types_[k]) for k, v in value.items()})
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"internal: unsupported union type for {where}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _parse_cli_value(where: str, text: str, tp):
    """A command-line string -> a typed value (lists are comma separated)."""
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return [_parse_cli_value(where, t, item) for t in text.split(",") if t != ""]
    if dataclasses.is_dataclass(tp) and hasattr(tp, "parse"):
        return tp.parse(text)
    try:
        if tp is bool:
            low = text.lower()
            if low not in ("true", "false", "1", "0"):
                raise ValueError
            return low in ("true", "1")
        return tp(text)
    except ValueError:
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {text!r}") from None


def _apply_table(table: dict, where: str, schema, key: str, value, from_cli: bool, origin: str) -> None:
    """One entry of a table field (`[model.args]` / --model.args.n_layers=4), typed by `schema`'s fields."""
    types_ = _field_types(schema)
    if key not in types_:
        raise ConfigError(f"unknown key {where}.{key} in {origin}{closest(key, list(types_))}")
    tp = types_[key]
    table[key] = (
        _parse_cli_value(f"{where}.{key}", value, tp)
        if from_cli
        else _check_value(f"{where}.{key}", value, tp)
    )


def _apply(cfg: JobConfig, section: str, key: str, value, from_cli: bool, origin: str) -> None:
    sections = {f.name: f for f in dataclasses.fields(JobConfig)}
    if section not in sections:
        raise ConfigError(f"unknown section [{section}] in {origin}{closest(section, list(sections))}")
    sub = getattr(cfg, section)
    types_ = _field_types(type(sub))
    name, _, item = key.partition(".")
    if name in TABLES.get(section, {}):  # a table field: --section.table.item=value, or [section.table]
        table, schema = getattr(sub, name), TABLES[section][name]
        if item:
            _apply_table(table, f"{section}.{name}", schema, item, value, from_cli, origin)
        elif from_cli or not isinstance(value, dict):
            raise ConfigError(
                f"{section}.{name} is a table: set its entries as --{section}.{name}.FIELD=VALUE "
                f"or in a [{section}.{name}] table"
            )
        else:
            for k, v in value.items():
                _apply_table(table, f"{section}.{name}", schema, k, v, from_cli, origin)
        return
    if key not in types_:
        raise ConfigError(f"unknown key {section}.{key} in {origin}{closest(key, list(types_))}")
    where = f"{section}.{key}"
    tp = types_[key]
    typed = _parse_cli_value(where, value, tp) if from_cli else _check_value(where, value, tp)
    setattr(sub, key, typed)


def load_toml(cfg: JobConfig, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {path!r} not found; pass an existing TOML file, e.g. train_configs/debug_model.toml"
        )
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"config file {path!r} is not valid TOML ({e}); fix the syntax at that place"
        ) from None
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"top-level key {section!r} in {path} must be a [section] table")
        for key, value in table.items():
            _apply(cfg, section, key, value, from_cli=False, origin=path)
    cfg.job.config_file = str(p)


def help_text() -> str:
    lines = ["usage: train [--config FILE.toml] [--section.field=value ...]", "", "options (default):"]
    for sec in dataclasses.fields(JobConfig):
        cls = type(getattr(JobConfig(), sec.name))
        src = _field_comments(cls)
        lines.append(f"  [{sec.name}]")
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            lines.append(f"    --{sec.name}.{f.name}={default!r}  {src.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def _field_comments(cls) -> dict[str, str]:
    """Field name -> its trailing '# comment' in this file (the docs live in one place)."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        s = line.strip()
        if ":" in s and "#" in s and not s.startswith(("#", "class", '"')):
            out[s.split(":", 1)[0].strip()] = s.split("#", 1)[1].strip()
    return out


def parse_args(argv: list[str]) -> JobConfig:
    """`--config F` (or `--job.config_file F`) then `--section.field=value` overrides, in order."""
    cfg = JobConfig()
    overrides: list[tuple[str, str]] = []
    config_file = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --section.field=value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"option --{name} needs a value: --{name}=VALUE")
            value, i = argv[i + 1], i + 1
        if name in ("config", "job.config_file"):
            config_file = value
        elif "." not in name:
            raise ConfigError(f"option --{name} is not of the form --section.field; see --help")
        else:
            overrides.append((name, value))
        i += 1
    if config_file:
        load_toml(cfg, config_file)
    for name, value in overrides:
        section, _, key = name.partition(".")
        _apply(cfg, section, key, value, from_cli=True, origin="command line")
    validate(cfg)
    validate_lora(cfg)
    validate_rl(cfg)
    return cfg


def check_before_launch(argv: list[str]) -> None:
    """The launch scripts' check of the workers' arguments: the config (every check) and its data folders."""
    cfg = parse_args(argv)
    if cfg.comm.mode == "fake_backend":  # a dry run reads no data
        return
    for folder in [cfg.data.dataset_path] if cfg.data.dataset_path else [s.path for s in cfg.data.sources]:
        if not ((Path(folder) / "meta.json").is_file() or (Path(folder) / "train.bin").is_file()):
            raise ConfigError(
                f"data folder {folder!r} has no meta.json (nor train.bin); "
                "create it with scripts/prepare_data.py --output <folder>"
            )
