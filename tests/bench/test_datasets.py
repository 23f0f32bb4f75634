"""load_text gives exactly the Hugging Face text, from the local copies in shared/data (SOURCES.md)."""

import hashlib
import os
import time
from pathlib import Path

import pytest

from kvlab.bench.core.datasets import DATA_DIR_ENV, Text, load_text
from kvlab.errors import ConfigError, DatasetUnavailableError

SHARED_DATA = Path(os.environ.get(DATA_DIR_ENV, "."))
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "wikitext-2-raw-v1" / "wiki.test.raw").is_file(), reason="shared data copies missing"
)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hf_wikitext_rows(path: Path) -> list[str]:
    """The HF dataset's rows, built from the facts: one row per line, newline kept, blank lines -> ""."""
    raw = path.read_bytes().decode("utf-8")
    assert "\r" not in raw and raw.endswith("\n")
    lines = [line + "\n" for line in raw.split("\n")[:-1]]
    return ["" if line.strip() == "" else line for line in lines]


@needs_shared_data
@pytest.mark.parametrize(
    ("split", "filename", "num_rows", "num_file_chars", "file_start", "sha"),
    [
        (
            "test",
            "wiki.test.raw",
            4358,
            1_288_556,
            " \n = Robert Boulter = \n \n Robert Boulter is an English film",
            "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
        ),
        (
            "validation",
            "wiki.valid.raw",
            3760,
            1_144_748,
            " \n = Homarus gammarus = \n",
            "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7",
        ),
    ],
)
def test_wikitext2_is_the_guide_text(split, filename, num_rows, num_file_chars, file_start, sha):
    path = SHARED_DATA / "wikitext-2-raw-v1" / filename
    raw = path.read_bytes()
    assert sha256(raw) == sha
    assert len(raw.decode()) == num_file_chars and raw.decode().startswith(file_start)

    rows = hf_wikitext_rows(path)
    assert len(rows) == num_rows
    num_blank = sum(row == "" for row in rows)
    text = load_text("wikitext2", split)
    assert isinstance(text, Text) and text.split == split and str(path) in text.source
    assert text.text == "\n\n".join(rows)
    # Blank lines (" \n", 2 chars) become "", and num_rows - 1 separators of 2 chars are added.
    assert len(text.text) == num_file_chars - 2 * num_blank + 2 * (num_rows - 1)


@needs_shared_data
def test_wikitext2_default_split_is_test_and_starts_like_the_guide_corpus():
    text = load_text("wikitext2")
    assert text.split == "test"
    assert text.text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    assert len(text.text) == 1_294_336


@needs_shared_data
def test_pg19_default_book_is_the_lf_form():
    text = load_text("pg19")
    assert text.name == "pg19:10146" and text.split == "test"
    assert len(text.text) == 249_431 and "\r" not in text.text
    assert sha256(text.text.encode()) == "5d3822a84681d2d9a243a4215e15346a84d0df49defe3e53539653ffd8707a9d"
    assert text.text.startswith("ST. PAUL***\n\n\nE-text prepared by Josephine Paolucci")
    assert text.text.endswith("\n***")
    # The official bytes on disk are CRLF; only the line endings differ.
    raw = (SHARED_DATA / "pg19" / "test" / "10146.txt").read_bytes()
    assert sha256(raw) == "f8dd4334fd8d422cd2f9153ffbff9b097611569592d7ca09fc6fe7881336d331"
    assert raw.decode().replace("\r\n", "\n") == text.text


def test_pg19_book_by_id_from_a_data_dir_argument(tmp_path):
    book = tmp_path / "pg19" / "validation" / "123.txt"
    book.parent.mkdir(parents=True)
    book.write_bytes(b"TITLE\r\n\r\nSome text.\r\n***")
    text = load_text("pg19:123", "validation", data_dir=tmp_path)
    assert text.text == "TITLE\n\nSome text.\n***"
    assert text.name == "pg19:123" and str(book) in text.source


def test_data_dir_argument_wins_over_the_environment(tmp_path, monkeypatch):
    (tmp_path / "wikitext-2-raw-v1").mkdir()
    (tmp_path / "wikitext-2-raw-v1" / "wiki.valid.raw").write_text(" \n = A = \n \n b c \n", encoding="utf-8")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "elsewhere"))
    text = load_text("wikitext2", "validation", data_dir=tmp_path)
    assert text.text == "\n\n = A = \n\n\n\n\n b c \n"


def test_file_dataset_reads_utf8_with_lf(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes("héllo\r\nworld\n".encode())
    text = load_text(f"file:{path}")
    assert text.text == "héllo\nworld\n" and text.split is None and text.name == f"file:{path}"


def test_file_dataset_errors(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="does not exist"):
        load_text(f"file:{tmp_path / 'missing.txt'}")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DatasetUnavailableError, match="not UTF-8"):
        load_text(f"file:{tmp_path / 'latin1.txt'}")
    with pytest.raises(ConfigError, match="no splits"):
        load_text(f"file:{tmp_path / 'latin1.txt'}", "test")


@pytest.mark.parametrize(
    ("name", "split", "message"),
    [
        ("wikitext103", None, "wikitext2, pg19, file:PATH"),
        ("wikitext2", "dev", "test, validation, train"),
        ("pg19", "dev", "test, validation, train"),
        ("pg19", "validation", "no default book"),
        ("pg19:ten", None, "Gutenberg number"),
    ],
)
def test_unknown_names_and_splits_list_the_valid_ones(name, split, message):
    with pytest.raises(ConfigError, match=message):
        load_text(name, split)


@pytest.mark.parametrize(
    ("name", "relative"), [("wikitext2", "wikitext-2-raw-v1/wiki.test.raw"), ("pg19", "pg19/test/10146.txt")]
)
def test_offline_without_local_data_fails_fast_with_both_options(name, relative, tmp_path, monkeypatch):
    datasets_config = pytest.importorskip("datasets.config")
    # Offline, as conftest sets it before any import, and with an empty cache so that no earlier
    # download can answer (the same switches the datasets test-suite flips).
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets_config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    started = time.perf_counter()
    with pytest.raises(DatasetUnavailableError) as raised:
        load_text(name)
    assert time.perf_counter() - started < 10
    message = str(raised.value)
    assert f"{tmp_path} has no {relative}" in message
    assert "--data-dir" in message and DATA_DIR_ENV in message and "hub" in message
    assert "\n" not in message
