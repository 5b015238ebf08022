"""Where documents come from: a Hugging Face Hub dataset or local files, read lazily one document at a time.

A document is one row's text column in .jsonl, .jsonl.gz, .json and .parquet files. In a .txt file, documents are
separated by one or more blank lines (lines that are empty or hold only whitespace), so a paragraph-structured text
such as tinyshakespeare gives many documents; the separating blank lines are not part of any document.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from tinyseek.data.builtin import BUILTIN_CORPUS, is_builtin, is_builtin_corpus, without_held_out_stories
from tinyseek.data.hub import first_line, require_hub
from tinyseek.errors import ConfigError, FileError, InputError

LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".txt")
LOCAL_FILES_HINT = (
    "for local files pass --data PATH (a .jsonl, .jsonl.gz, .json, .parquet or .txt file, "
    "a directory or a glob pattern), or --data builtin for the TinyStories sample installed with tinyseek"
)
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Document:
    text: str
    group: str | None  # the value of the --split-by column, as a string; None without --split-by


@dataclass(frozen=True)
class Source:
    name: str  # short, filesystem-safe, for naming cache folders
    identity: dict  # everything that determines the documents, content hash included, but not where they are
    locations: list[str]  # the files read, or the Hub dataset name
    read_rows: Callable[[], Iterator[tuple[str, int, dict]]]  # (where, row number, row)
    text_column: str
    group_column: str | None
    num_rows: int | None = None

    def documents(self, max_documents: int | None = None) -> Iterator[Document]:
        """The non-blank documents, in source order; a row lacking a needed column is an InputError."""
        count = 0
        for where, row_number, row in self.read_rows():
            if max_documents is not None and count >= max_documents:
                return
            text = _column(row, self.text_column, where, row_number, "--text-column")
            if text is None:
                continue
            if not isinstance(text, str):
                raise InputError(
                    f"{where} row {row_number}: column {self.text_column!r} holds {type(text).__name__}, not text"
                )
            if not text.strip():
                continue
            group = None
            if self.group_column is not None:
                value = _column(row, self.group_column, where, row_number, "--split-by")
                group = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            count += 1
            yield Document(text, group)

    def has_column(self, column: str) -> bool:
        """Whether the first row has `column` (an empty source has every column: it has no row that lacks one)."""
        first = next(iter(self.read_rows()), None)
        return first is None or column in first[2]

    def grouped_by(self, column: str | None) -> Source:
        """The same documents, each with its value of `column` as its group (None: no groups)."""
        return replace(self, group_column=column, identity={**self.identity, "group_column": column})


def _column(row: dict, column: str, where: str, row_number: int, option: str):
    if column not in row:
        available = ", ".join(map(repr, row)) or "none"
        raise InputError(f"{where} row {row_number} has no column {column!r} (columns: {available}); check {option}")
    return row[column]


def open_source(
    spec: str | Path | Sequence[str | Path],
    *,
    text_column: str = "text",
    group_column: str | None = None,
    split: str = "train",
    streaming: bool = False,
) -> Source:
    """Local files (a file, directory, glob pattern or a list of them), `builtin` (the corpus installed with
    tinyseek) or, for an `org/name` spec, a Hub dataset."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    specs = [BUILTIN_CORPUS if is_builtin(one) else one for one in specs]
    if not specs:
        raise ConfigError("no data source given; " + LOCAL_FILES_HINT)
    local = [_local_files(str(one)) for one in specs]
    if all(files is not None for files in local):
        files = [file for group in local for file in group]
        return _local_source(specs, files, text_column, group_column)
    if len(specs) == 1 and HUB_NAME.match(str(specs[0])):
        return _hub_source(str(specs[0]), text_column, group_column, split, streaming)
    missing = next(str(one) for one, files in zip(specs, local) if files is None)
    raise FileError(f"no such file or directory: {missing}")


def _local_files(spec: str) -> list[Path] | None:
    """The corpus files `spec` names, or None when it names nothing on disk (it may be a Hub dataset)."""
    path = Path(spec).expanduser()
    if path.is_file():
        if not path.name.endswith(LOCAL_SUFFIXES):
            raise InputError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}")
        return [path]
    if path.is_dir():
        candidates = sorted(p for p in path.rglob("*") if p.is_file())
    elif glob.has_magic(spec):
        candidates = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    else:
        return None
    files = [p for p in candidates if p.name.endswith(LOCAL_SUFFIXES)]
    if not files:
        raise FileError(f"{spec} holds no corpus files ({', '.join(LOCAL_SUFFIXES)})")
    return files


def _content_sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _local_source(specs, files: list[Path], text_column: str, group_column: str | None) -> Source:
    def read_rows() -> Iterator[tuple[str, int, dict]]:
        for file in files:
            rows = _read_file(file, text_column)
            yield from without_held_out_stories(rows) if is_builtin_corpus(file) else rows

    name = files[0].name.split(".")[0] if len(files) == 1 else Path(str(specs[0])).name.split(".")[0] or "corpus"
    identity = {
        "kind": "local",
        "file_names": [file.name for file in files],
        "content_sha256": _content_sha256(files),
        "text_column": text_column,
        "group_column": group_column,
    }
    if any(map(is_builtin_corpus, files)):
        identity["held_out_stories"] = "left out"  # a cache prepared before they were is not reused
    return Source(slug(name), identity, [str(file) for file in files], read_rows, text_column, group_column)


def _read_file(file: Path, text_column: str) -> Iterator[tuple[str, int, dict]]:
    where = str(file)
    try:
        if file.name.endswith(".parquet"):
            yield from _read_parquet(file, where)
        elif file.name.endswith(".txt"):
            yield from ((where, number, {text_column: text, "file": where}) for number, text in _read_txt(file))
        elif file.name.endswith(".json"):
            yield from ((where, number, row) for number, row in enumerate(_read_json(file), 1))
        else:
            yield from _read_jsonl(file, where)
    except UnicodeDecodeError as error:
        raise InputError(f"{where} is not UTF-8 text ({error.reason}); convert it to UTF-8") from None
    except (OSError, EOFError) as error:
        raise FileError(f"cannot read {where}: {first_line(error)}") from None


def _read_jsonl(file: Path, where: str) -> Iterator[tuple[str, int, dict]]:
    opener = gzip.open if file.name.endswith(".gz") else open
    with opener(file, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{where} line {number} is not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{where} line {number} is not a JSON object")
            yield where, number, row


def _read_json(file: Path) -> list[dict]:
    """A JSON file holds a list of row objects, or one object of equally long columns."""
    with open(file, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as error:
            raise InputError(f"{file} is not valid JSON ({error.msg} at line {error.lineno})") from None
    if isinstance(data, dict) and data and all(isinstance(column, list) for column in data.values()):
        return [dict(zip(data, values)) for values in zip(*data.values())]
    if isinstance(data, list) and all(isinstance(row, dict) for row in data):
        return data
    raise InputError(f"{file} must hold a list of objects or an object of column lists")


def _read_parquet(file: Path, where: str) -> Iterator[tuple[str, int, dict]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table_file = pyarrow.parquet.ParquetFile(file)
        number = 0
        for batch in table_file.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield where, number, row
    except pyarrow.ArrowException as error:
        raise FileError(f"cannot read {where} as Parquet: {first_line(error)}") from None


def _read_txt(file: Path) -> Iterator[tuple[int, str]]:
    with open(file, encoding="utf-8") as handle:
        lines: list[str] = []
        number = 0
        for line in handle:
            if line.strip():
                lines.append(line)
            elif lines:
                number += 1
                yield number, "".join(lines).rstrip("\n")
                lines = []
        if lines:
            yield number + 1, "".join(lines).rstrip("\n")


def _hub_source(name: str, text_column: str, group_column: str | None, split: str, streaming: bool) -> Source:
    require_hub(f"dataset {name!r}", LOCAL_FILES_HINT)
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split, streaming=streaming)
    except Exception as error:  # datasets raises many unrelated types for "not there"; all mean the same here
        raise FileError(
            f"cannot load dataset {name!r} split {split!r} from the Hugging Face Hub: {first_line(error)}; "
            + LOCAL_FILES_HINT
        ) from None
    columns = dataset.column_names
    for column, option in ((text_column, "--text-column"), (group_column, "--split-by")):
        if column is not None and columns is not None and column not in columns:
            raise InputError(
                f"dataset {name!r} has no column {column!r} (columns: {', '.join(columns)}); check {option}"
            )
    # The downloaded files or the Hub's commit (streamed) pin the content, as a file hash does for local data.
    content = _downloaded_content(dataset) or _hub_revision(name)
    identity = {
        "kind": "hub",
        "name": name,
        "split": split,
        "content": content,
        "text_column": text_column,
        "group_column": group_column,
    }

    def read_rows() -> Iterator[tuple[str, int, dict]]:
        where = f"{name}[{split}]"
        return ((where, number, row) for number, row in enumerate(dataset, 1))

    num_rows = None if streaming else len(dataset)
    return Source(slug(name.split("/")[-1]), identity, [name], read_rows, text_column, group_column, num_rows)


def _downloaded_content(dataset) -> str | None:
    """What pins a downloaded dataset's rows: each Arrow file's size and name with its folders up to the config's
    (datasets names them after the configuration and the revision). Hashing the files' bytes would read gigabytes on
    every run. None when streamed."""
    files = [Path(entry["filename"]) for entry in getattr(dataset, "cache_files", None) or []]
    if not files:
        return None
    described = [[*file.parts[-4:], file.stat().st_size] for file in files]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()


def _hub_revision(name: str) -> str | None:
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(name).sha
    except Exception:  # only an identity detail: a dataset that loaded but cannot say its commit is still usable
        return None


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "data"
