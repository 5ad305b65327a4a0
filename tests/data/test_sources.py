"""Where documents come from (sources.py): files and globs, their types, JSON lines, the KJV."""

import bz2
import gzip
import json
import lzma

import pytest

from gptoss_titan.data.sources import (
    JsonLine,
    Utf8Check,
    document_text,
    document_tokens,
    expand,
    file_documents,
    file_items,
    kjv_documents,
)
from gptoss_titan.model.tokens import EOT_ID
from gptoss_titan.runtime.errors import DataError


def test_kjv_is_a_real_corpus():
    docs = list(kjv_documents())
    assert len(docs) == 1189  # chapters
    assert docs[0].startswith("Genesis 1\n1 In the beginning God created the heaven and the earth.")


def test_document_text_of_text_and_json_lines():
    assert document_text("plain") == "plain"
    assert document_text(JsonLine("f.jsonl", 3, '{"body": "hi", "text": 1}', "body")) == "hi"
    for raw, field, message in [
        ('{"text": broken', "text", "f.jsonl:3 is not valid JSON"),
        ('{"body": "x"}', "text", "f.jsonl:3 has no field 'text'"),
        ('["text"]', "text", "f.jsonl:3 has no field 'text'"),
        ('{"text": 5}', "text", "f.jsonl:3: field 'text' is not a string"),
    ]:
        with pytest.raises(DataError, match=message):
            document_text(JsonLine("f.jsonl", 3, raw, field))


def test_document_tokens_are_ordinary_text_then_endoftext():
    class Encoder:  # records what it was asked to encode
        def encode_ordinary(self, text):
            return [len(text), ord(text[0])]

    assert document_tokens(Encoder(), "<|endoftext|>") == [13, ord("<"), EOT_ID]


def test_expand_sorts_glob_matches_and_names_what_is_wrong(tmp_path):
    for name in ("b.txt", "a.txt", "c.jsonl.gz", "d.parquet"):
        (tmp_path / name).write_text("")
    assert [p.name for p in expand([str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl.gz")])] == [
        "a.txt",
        "b.txt",
        "c.jsonl.gz",
    ]
    with pytest.raises(DataError, match="matches no file"):
        expand([str(tmp_path / "*.md")])
    with pytest.raises(DataError, match="not found"):
        expand([str(tmp_path / "missing.txt")])
    for name in ("notes.md", "d.parquet.gz"):  # unknown type; parquet is compressed inside, not around
        (tmp_path / name).write_text("")
        with pytest.raises(DataError, match="has an unknown type"):
            expand([str(tmp_path / name)])


def test_file_items_read_text_json_lines_and_compressed_files(tmp_path):
    (tmp_path / "a.txt").write_text("one whole\n\ndocument")
    lines = '{"text": "first"}\n\n{"text": "second", "id": 2}\n'
    (tmp_path / "b.jsonl").write_text(lines)
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(lines)
    with bz2.open(tmp_path / "d.json.bz2", "wt") as f:
        f.write(lines)
    with lzma.open(tmp_path / "e.txt.xz", "wt") as f:
        f.write("xz text")
    files = [str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.jsonl.gz", "d.json.bz2", "e.txt.xz")]
    items = list(file_items(files))
    assert items[0] == "one whole\n\ndocument" and items[-1] == "xz text"
    assert items[1] == JsonLine(str(tmp_path / "b.jsonl"), 1, '{"text": "first"}\n', "text")
    assert [i.line for i in items[1:-1]] == [1, 3] * 3  # blank lines are no documents
    assert list(file_documents(files)) == ["one whole\n\ndocument"] + ["first", "second"] * 3 + ["xz text"]


def test_parquet_rows_of_the_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", None, "", "b"], "n": [1, 2, 3, 4]}), tmp_path / "t.parquet")
    assert list(file_items([str(tmp_path / "t.parquet")], "body")) == ["a", "b"]  # empty rows skipped
    with pytest.raises(DataError, match="has no column 'text'"):
        list(file_items([str(tmp_path / "t.parquet")]))
    with pytest.raises(DataError, match="column 'n' holds int, not text"):
        list(file_items([str(tmp_path / "t.parquet")], "n"))


def test_a_zstd_file_without_zstandard_says_what_to_install(tmp_path, monkeypatch):
    import sys

    (tmp_path / "a.jsonl.zst").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # not installed (or hidden)
    with pytest.raises(DataError, match="pip install zstandard"):
        list(file_items([str(tmp_path / "a.jsonl.zst")]))


def test_json_lines_are_parsed_where_they_are_turned_into_text(tmp_path):
    """The reading process only splits lines; a malformed one fails when its text is asked for."""
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n{broken\n")
    items = list(file_items([str(tmp_path / "bad.jsonl")]))
    assert document_text(items[0]) == "fine"
    with pytest.raises(DataError, match="bad.jsonl:2 is not valid JSON"):
        document_text(items[1])


@pytest.mark.parametrize("suffix,opener", [(".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)])
def test_a_truncated_compressed_file_is_one_data_error_naming_it(tmp_path, suffix, opener):
    path = tmp_path / f"c.jsonl{suffix}"
    with opener(path, "wt") as f:
        f.write("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(2000)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        DataError, match=rf"c.jsonl{suffix}' is a truncated or damaged {suffix[1:]} file \(after line \d+"
    ):
        list(file_items([str(path)]))
    path.write_bytes(b"\x1f\x8b" + b"garbage" * 10 if suffix == ".gz" else b"garbage" * 10)
    with pytest.raises(DataError, match="is a truncated or damaged"):
        list(file_items([str(path)]))


def test_invalid_utf8_is_replaced_and_counted_or_refused_with_strict(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "bad \xff here"}\n{"text": "\xc3"}\n')
    (tmp_path / "b.txt").write_bytes(b"text \xfe\xfe")
    check = Utf8Check()
    docs = [
        document_text(i) for i in file_items([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")], utf8=check)
    ]
    assert docs == ["fine", "bad \ufffd here", "\ufffd", "text \ufffd\ufffd"]
    assert check.count == 3 and check.first == f"{tmp_path / 'a.jsonl'}:2"
    assert check.summary().startswith("3 document(s) held invalid UTF-8, replaced by U+FFFD (the first: ")
    with pytest.raises(
        DataError, match=r"a.jsonl:2 is not valid UTF-8 \(byte 14: b'\\xff he'\); fix or remove"
    ):
        list(file_items([str(tmp_path / "a.jsonl")], utf8=Utf8Check(strict=True)))
    with pytest.raises(DataError, match=r"b.txt is not valid UTF-8 \(byte 5: .*drop --strict"):
        list(file_items([str(tmp_path / "b.txt")], utf8=Utf8Check(strict=True)))


def test_text_files_read_with_universal_newlines(tmp_path):
    """\r\n and \r become \n in .txt documents, as text-mode reading gives (the same tokens as
    before the readers went binary)."""
    (tmp_path / "w.txt").write_bytes(b"line one\r\nline two\rline three\n")
    assert list(file_documents([str(tmp_path / "w.txt")])) == ["line one\nline two\nline three\n"]
