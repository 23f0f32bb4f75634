"""Evaluation text: WikiText-2 raw, one PG-19 book, or any UTF-8 file, as one string.

    load_text("wikitext2")                   test split, "\\n\\n".join(rows) as in the HF perplexity guide
    load_text("wikitext2", "validation")
    load_text("pg19")                        first PG-19 test book (Gutenberg id 10146), LF line endings
    load_text("pg19:10321")                  another book by Gutenberg id
    load_text("file:notes.txt")

Order of sources: a local data directory (`data_dir`, else env `KVLAB_DATA_DIR`) when it holds the
file, otherwise the Hugging Face hub; when both fail, `DatasetUnavailableError` names both options.
A local copy must give exactly the hub's text, since token counts and PPL depend on every byte.
Local layout (that of /work/shared/data):

    <data_dir>/wikitext-2-raw-v1/wiki.test.raw, wiki.valid.raw
    <data_dir>/pg19/<split>/<book id>.txt
"""

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from kvlab.errors import ConfigError, DatasetUnavailableError

DATA_DIR_ENV = "KVLAB_DATA_DIR"
DATASETS = ("wikitext2", "pg19", "file:PATH")

WIKITEXT_FILES = {"test": "wiki.test.raw", "validation": "wiki.valid.raw", "train": "wiki.train.raw"}
PG19_SPLITS = ("test", "validation", "train")
# The first book of the PG-19 test split (the one StreamingLLM evaluates on). Other splits have no
# default: their first book depends on the listing order, so the caller names one.
PG19_DEFAULT_TEST_BOOK = "10146"

T = TypeVar("T")


class _BookNotFound(Exception):
    """The hub answered, but the split has no such book (a user error, not an outage)."""


@dataclass(frozen=True, slots=True)
class Text:
    """An evaluation text and where it came from (enough to reproduce it)."""

    text: str = field(repr=False)
    name: str  # "wikitext2", "pg19:10146", "file:PATH"
    split: str | None
    source: str  # "local file /data/wikitext-2-raw-v1/wiki.test.raw" or "hub wikitext/wikitext-2-raw-v1"

    @property
    def description(self) -> str:
        split = f" ({self.split})" if self.split else ""
        return f"{self.name}{split} from {self.source}, {len(self.text):,} characters"


def load_text(name: str, split: str | None = None, data_dir: str | os.PathLike | None = None) -> Text:
    """The text of dataset `name` (one of `DATASETS`; "pg19:<book id>" picks a PG-19 book).

    Raises ConfigError for an unknown name, split or book id and DatasetUnavailableError when
    neither the local data directory nor the hub provides the text.
    """
    if name.startswith("file:"):
        if split is not None:
            raise ConfigError(f"a file: dataset has no splits, got split {split!r}")
        return _load_file(Path(name.removeprefix("file:")))
    local_dir = _resolve_data_dir(data_dir)
    if name == "wikitext2":
        return _load_wikitext2(split or "test", local_dir)
    if name == "pg19" or name.startswith("pg19:"):
        book_id = name.partition(":")[2] or None
        return _load_pg19(split or "test", book_id, local_dir)
    raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} (or pg19:<book id>)")


def _resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    return Path(chosen).expanduser() if chosen is not None else None


def _load_file(path: Path) -> Text:
    try:
        # Universal newlines, as for PG-19: one line-ending form (LF) everywhere.
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetUnavailableError(f"text file {path} does not exist") from None
    except UnicodeDecodeError as error:
        where = f"{error.reason} at byte {error.start}"
        raise DatasetUnavailableError(f"text file {path} is not UTF-8 ({where})") from None
    except OSError as error:
        raise DatasetUnavailableError(f"cannot read text file {path}: {error.strerror}") from None
    return Text(text=text, name=f"file:{path}", split=None, source=f"local file {path.resolve()}")


def _load_wikitext2(split: str, local_dir: Path | None) -> Text:
    if split not in WIKITEXT_FILES:
        raise ConfigError(f"unknown wikitext2 split {split!r}; choose one of {', '.join(WIKITEXT_FILES)}")
    relative = Path("wikitext-2-raw-v1") / WIKITEXT_FILES[split]
    if local_dir is not None and (local_dir / relative).is_file():
        path = local_dir / relative
        with path.open(encoding="utf-8") as file:
            rows = [_wikitext_row(line) for line in file]
        return Text(text=_join_wikitext(rows), name="wikitext2", split=split, source=f"local file {path}")

    def from_hub() -> list[str]:
        from datasets import load_dataset  # slow import; only when the hub is needed

        return load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]

    rows = _from_hub("wikitext2", split, relative, local_dir, from_hub)
    source = "hub wikitext/wikitext-2-raw-v1"
    return Text(text=_join_wikitext(rows), name="wikitext2", split=split, source=source)


def _wikitext_row(line: str) -> str:
    """One row of the HF dataset: a line of the raw file with its newline; whitespace-only -> ""."""
    return line if line.strip() else ""


def _join_wikitext(rows: list[str]) -> str:
    # The HF perplexity guide's corpus: rows joined by a blank line. Rows keep their own "\n".
    return "\n\n".join(rows)


def _load_pg19(split: str, book_id: str | None, local_dir: Path | None) -> Text:
    if split not in PG19_SPLITS:
        raise ConfigError(f"unknown pg19 split {split!r}; choose one of {', '.join(PG19_SPLITS)}")
    if book_id is None:
        if split != "test":
            raise ConfigError(f"pg19 {split} has no default book; name one as pg19:<Gutenberg id>")
        book_id = PG19_DEFAULT_TEST_BOOK
    if not book_id.isdigit():
        raise ConfigError(f"pg19 book id must be a Gutenberg number (e.g. pg19:10146), got {book_id!r}")
    relative = Path("pg19") / split / f"{book_id}.txt"
    name = f"pg19:{book_id}"
    if local_dir is not None and (local_dir / relative).is_file():
        path = local_dir / relative
        # The official files are CRLF; text mode gives LF, which is what the hub's `text` holds.
        text = path.read_text(encoding="utf-8")
        return Text(text=text, name=name, split=split, source=f"local file {path} (CRLF read as LF)")

    def from_hub() -> str:
        return _pg19_book_from_hub(split, book_id)

    text = _from_hub(name, split, relative, local_dir, from_hub)
    return Text(text=text, name=name, split=split, source="hub deepmind/pg19 (streamed)")


def _pg19_book_from_hub(split: str, book_id: str) -> str:
    from datasets import load_dataset

    try:
        books = load_dataset("deepmind/pg19", split=split, streaming=True)
    except RuntimeError as error:
        # datasets >= 4 refuses loading scripts; the hub's automatic parquet export has the same rows.
        if "scripts are no longer supported" not in str(error):
            raise
        books = load_dataset("deepmind/pg19", split=split, streaming=True, revision="refs/convert/parquet")
    for book in books:
        # `url` ends in the Gutenberg id: http://www.gutenberg.org/ebooks/10146
        if book["url"].rstrip("/").rsplit("/", 1)[-1] == book_id:
            return book["text"]
    raise _BookNotFound(f"book {book_id} is not in the pg19 {split} split")


def _from_hub(name: str, split: str, relative: Path, local_dir: Path | None, fetch: Callable[[], T]) -> T:
    try:
        return fetch()
    except _BookNotFound as error:
        raise DatasetUnavailableError(str(error)) from None
    except Exception as error:  # hub and datasets errors come in many types; all mean "not here"
        where = (
            f"{local_dir} has no {relative}"
            if local_dir is not None
            else f"no local data directory given (--data-dir or {DATA_DIR_ENV})"
        )
        raise DatasetUnavailableError(
            f"{name} ({split}) is unavailable: {where}, and the Hugging Face hub failed "
            f"({type(error).__name__}); pass --data-dir DIR or set {DATA_DIR_ENV}=DIR to a folder "
            f"holding {relative}"
        ) from None
