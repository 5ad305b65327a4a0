"""Checkpoint integrity records (checkpoint/integrity.py): every file a save writes gets its size and
XXH3-64 recorded; a missing, truncated, zero-filled or bit-flipped file is found before loading.
(The trainer's resume passing over a damaged step: tests/reliability/test_chaos.py.)"""

import json
import re
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
import xxhash

from gptoss_titan.checkpoint.integrity import (
    IntegrityWriter,
    expected_files,
    file_record,
    find_damage,
    verify,
)


@pytest.fixture
def step(tmp_path):
    """A one-process DCP save through IntegrityWriter, with the step's own config.json."""
    folder = tmp_path / "step-1"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    state = {"model": {"w": torch.arange(4096.0), "b": torch.ones(8)}}
    with warnings.catch_warnings():  # DCP's note that a save without a process group is a one-process save
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.save(state, storage_writer=IntegrityWriter(str(folder)), no_dist=True)
    return folder


def test_file_record_is_size_and_xxh3(tmp_path):
    f = tmp_path / "f"
    data = bytes(range(256)) * 40000  # 10 MB: more than one read chunk
    f.write_bytes(data)
    assert file_record(f) == {"size": len(data), "xxh3": xxhash.xxh3_64(data).hexdigest()}


def test_a_save_records_every_file_it_wrote(step):
    records = {p.name for p in step.glob("integrity_*.json")}
    assert records == {
        "integrity___0_.json",
        "integrity_metadata.json",
    }  # rank 0's data, then rank 0's metadata
    want = expected_files(step)
    data_files = {p.name for p in step.glob("*.distcp")}
    assert set(want) == data_files | {".metadata", "config.json"} and data_files
    assert all(want[name] == file_record(step / name) for name in want)
    assert find_damage(step) is None and verify(step) is None  # verify: no process group, every file


def biggest(step):
    return max(step.glob("*.distcp"), key=lambda f: f.stat().st_size)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda s: (s / ".metadata").unlink(), r"^its .metadata is missing$"),
        (lambda s: biggest(s).unlink(), r"^file __0_0.distcp is missing$"),
        (
            lambda s: biggest(s).write_bytes(biggest(s).read_bytes()[:100]),
            r"has 100 bytes, \d+ were written$",
        ),
        (
            lambda s: biggest(s).write_bytes(bytes(biggest(s).stat().st_size)),
            r"does not match its checksum \(xxh3 \w+, written \w+\)$",
        ),
        (lambda s: (s / "config.json").write_text("[]"), r"^file config.json does not match its checksum"),
    ],
    ids=["no_metadata", "missing", "truncated", "zero_filled", "own_file_changed"],
)
def test_damage_is_named(step, damage, match):
    damage(step)
    assert find_damage(step) is not None
    assert verify(step) is not None
    assert re.search(match, find_damage(step)), find_damage(step)


def test_a_flipped_bit(step):
    f = biggest(step)
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    f.write_bytes(bytes(raw))
    assert find_damage(step).startswith(f"file {f.name} does not match its checksum")


def test_ranks_share_the_files_to_check(step):
    """Rank i of n checks every n-th file (sorted by name): together they check each file once."""
    names = sorted(expected_files(step))
    assert len(names) == 3  # .metadata, __0_0.distcp, config.json
    (step / names[1]).unlink()
    assert [find_damage(step, (i, 3)) for i in range(3)] == [None, f"file {names[1]} is missing", None]
    assert find_damage(step, (0, 2)) is None and find_damage(step, (1, 2)) is not None


def test_unreadable_records_and_folders_without_records(step):
    (step / "integrity___0_.json").write_text("{not json")
    assert "integrity___0_.json" in find_damage(step)  # an unreadable record is damage, not a pass
    for record in step.glob("integrity_*.json"):
        record.unlink()
    assert find_damage(step) is None  # written before records existed: its .metadata is all we check
    (step / "integrity_metadata.json").write_text(json.dumps({"config.json": {"size": "x", "xxh3": 1}}))
    assert verify(step).startswith("file config.json has ")
    # a record of the wrong shape: find_damage raises, verify (which every rank must finish) says so
    (step / "integrity_metadata.json").write_text(json.dumps({"config.json": 5}))
    with pytest.raises(AttributeError):
        find_damage(step)
    assert verify(step).startswith("it cannot be read (AttributeError: ")
