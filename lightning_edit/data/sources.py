"""Where raw records come from: local files / directories or a Hugging Face hub dataset.

:func:`load_records` returns plain ``dict`` records, exactly as written in the source, for
:func:`lightning_edit.data.formats.records_to_requests` to normalize.

Why JSON is not read through ``datasets``: its ``json`` builder converts the records to one Arrow
table, and Arrow gives every record the union of all records' keys. A key that some records lack
comes back as ``None`` in those records (``{"a": 1}`` next to ``{"a": 2, "c": [...]}`` is read as
``{"a": 1, "c": None}``), and ints are widened to floats in a column that also holds floats.
Benchmark files mix record shapes (CounterFact with and without ``generation_prompts``, AKEW's
per-rewrite extras), so ``.json`` / ``.jsonl`` files are parsed with the standard library, which
round-trips them exactly. Parquet / CSV files and hub datasets *are* Arrow tables already; they go
through ``datasets.load_dataset`` and lose their ``None`` values on the way out (an absent key and
a ``None`` mean the same thing to the record converters).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_edit.errors import InputError, MissingFileError

# File extension -> datasets' packaged builder.
_BUILDERS: dict[str, str] = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

DataFiles = str | Sequence[str] | Mapping[str, str | Sequence[str]]
"""``data_files`` as ``datasets.load_dataset`` takes it: one path, a list, or ``{split: paths}``."""


def load_records(
    path: str,
    split: str = "train",
    data_files: DataFiles | None = None,
    name: str | None = None,
    field: str | None = None,
    cache_dir: str | None = None,
) -> list[dict[str, Any]]:
    """Read raw edit records.

    ``path`` is, in this order:

    * a local ``.json`` (top-level array of objects, or an object whose ``field`` key holds the
      array), ``.jsonl``, ``.parquet`` or ``.csv`` file (``split`` is ignored: a file is one split);
    * a local directory: its files of one of those types, split by file name as ``datasets`` does
      (``train.json`` / ``test.json``; all files are ``train`` if no name mentions a split), or
      ``data_files`` relative to the directory;
    * a builder name (``json``, ``parquet``, ``csv``) together with ``data_files``;
    * otherwise a Hugging Face hub dataset id, loaded with ``load_dataset(path, name, split=split)``
      (this needs network access or a warm ``datasets`` cache).

    Args:
        path: file, directory, builder name or hub id (see above).
        split: the split to read from a directory or a hub dataset.
        data_files: files to read (with a directory or builder name ``path``); a ``{split: files}``
            mapping is indexed with ``split``.
        name: hub dataset configuration name.
        field: for a JSON file whose top level is an object, the key holding the records.
        cache_dir: ``datasets`` cache folder for parquet / csv / hub loads (default: its own).

    Returns:
        The records as dicts, in file order.

    Raises:
        MissingFileError: (a ``FileNotFoundError``) a path that looks local does not exist, or a hub
            load failed.
        InputError: (a ``ValueError``) unreadable or malformed files, mixed file types, bad arguments.
    """
    local = Path(os.path.expanduser(path))
    if local.is_file():
        if data_files is not None:
            raise InputError(f"data_files={data_files!r} given together with the file {path!r}; pass one of them")
        return _read_files([local], field, cache_dir)
    if local.is_dir():
        files = _directory_files(local, split, data_files)
        return _read_files(files, field, cache_dir)
    if path in set(_BUILDERS.values()) | {"jsonl"}:
        if data_files is None:
            raise InputError(f"the {path!r} builder needs data_files")
        files = [Path(os.path.expanduser(f)) for f in _select_split(data_files, split)]
        for f in files:
            if not f.is_file():
                raise MissingFileError(f"data file {str(f)!r} does not exist")
        return _read_files(files, field, cache_dir, builder="json" if path == "jsonl" else path)
    if local.suffix in _BUILDERS or path.startswith((".", "/", "~")):
        raise MissingFileError(f"no such file or directory: {path!r}")
    return _load_hub(path, split, data_files, name, field, cache_dir)


def _select_split(data_files: DataFiles, split: str) -> list[str]:
    """``data_files`` as a list of paths for ``split``."""
    if isinstance(data_files, Mapping):
        if split not in data_files:
            raise InputError(f"split {split!r} not in data_files (splits: {sorted(data_files)})")
        data_files = data_files[split]
    if isinstance(data_files, (str, os.PathLike)):
        return [str(data_files)]
    return [str(f) for f in data_files]


def _directory_files(directory: Path, split: str, data_files: DataFiles | None) -> list[Path]:
    """The files of ``split`` in ``directory``: ``data_files`` relative to it, or the supported
    files found there, assigned to splits by datasets' file-name patterns."""
    if data_files is not None:
        files = [directory / f for f in _select_split(data_files, split)]
        for f in files:
            if not f.is_file():
                raise MissingFileError(f"data file {str(f)!r} does not exist")
        return files
    from datasets.data_files import DataFilesDict, get_data_patterns

    # The same split inference as load_dataset(<directory>): train.json -> train, test.json -> test.
    patterns = get_data_patterns(str(directory))
    by_split = DataFilesDict.from_patterns(patterns, base_path=str(directory), allowed_extensions=list(_BUILDERS))
    if split not in by_split:
        raise InputError(f"no {split!r} files in {str(directory)!r} (found splits: {sorted(map(str, by_split))})")
    files = sorted(Path(f) for f in by_split[split] if Path(f).suffix in _BUILDERS)
    if not files:
        raise MissingFileError(f"no {'/'.join(_BUILDERS)} files for split {split!r} in {str(directory)!r}")
    return files


def _read_files(
    files: list[Path], field: str | None, cache_dir: str | None, builder: str | None = None
) -> list[dict[str, Any]]:
    """Records of all ``files`` (one type), concatenated in order."""
    builders = {builder or _BUILDERS.get(f.suffix) for f in files}
    if None in builders:
        bad = [str(f) for f in files if f.suffix not in _BUILDERS]
        raise InputError(f"unsupported file type {bad}; expected {', '.join(_BUILDERS)}")
    if len(builders) > 1:
        raise InputError(f"files of different types cannot be read as one dataset: {[str(f) for f in files]}")
    (kind,) = builders
    if kind == "json":
        records: list[dict[str, Any]] = []
        for f in files:
            records.extend(_read_json_file(f, field))
        return records
    if field is not None:
        raise InputError(f"field={field!r} only applies to JSON files, not {kind}")
    import datasets

    try:
        dataset = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir)
    except Exception as err:  # datasets wraps a reader's error in its own DatasetGenerationError
        cause = err if isinstance(err, UnicodeDecodeError) else err.__cause__
        if not isinstance(cause, UnicodeDecodeError):
            raise
        names = ", ".join(repr(str(f)) for f in files)
        raise InputError(f"{names}: not UTF-8 text ({cause.reason} at byte {cause.start}); save the file as UTF-8") from None
    return [_drop_nulls(r) for r in dataset.to_list()]


def _read_json_file(path: Path, field: str | None) -> list[dict[str, Any]]:
    """A ``.json`` file (array, or object with ``field``) or a ``.jsonl`` file (one object per
    line, blank lines skipped), parsed exactly."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise InputError(f"{str(path)!r} line {line}: not UTF-8 text (byte {raw[err.start:err.start + 1]!r} at offset "
                         f"{err.start}); save the file as UTF-8") from None
    if path.suffix == ".jsonl":
        records = []
        for line_no, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 is valid inside JSON
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise InputError(f"{str(path)!r} line {line_no}: invalid JSON ({err.msg})") from None
        if field is not None:
            raise InputError(f"field={field!r} applies to a .json file holding one object, not to .jsonl {str(path)!r}")
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"{str(path)!r}: invalid JSON ({err.msg} at line {err.lineno})") from None
        if field is not None:
            if not isinstance(data, dict) or field not in data:
                raise InputError(f"{str(path)!r}: no top-level key {field!r} (field=...)")
            data = data[field]
        elif isinstance(data, dict):
            lists = [k for k, v in data.items() if isinstance(v, list)]
            raise InputError(
                f"{str(path)!r} holds one JSON object, not an array of records; pass field=<key> naming the "
                f"array (keys holding arrays: {lists})"
            )
        if not isinstance(data, list):
            raise InputError(f"{str(path)!r}: expected an array of records, got {type(data).__name__}")
        records = data
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputError(f"{str(path)!r}: record {i} is a {type(record).__name__}, not a JSON object")
    return records


def _drop_nulls(value: Any) -> Any:
    """Remove ``None``-valued keys from dicts, recursively (also inside lists).

    Arrow fills keys a record did not have (at any nesting level) with ``None``; dropping them gives
    back the record as written, up to explicit ``null`` values, which the converters treat as
    absent anyway.
    """
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _load_hub(
    path: str, split: str, data_files: DataFiles | None, name: str | None, field: str | None, cache_dir: str | None
) -> list[dict[str, Any]]:
    """``datasets.load_dataset`` of a hub id, with a clear error when it cannot be reached."""
    import datasets

    kwargs: dict[str, Any] = {"split": split, "cache_dir": cache_dir}
    if data_files is not None:
        kwargs["data_files"] = data_files
    if field is not None:
        kwargs["field"] = field
    try:
        dataset = datasets.load_dataset(path, name, **kwargs)
    except Exception as err:  # ConnectionError offline, DatasetNotFoundError, bad split ... all end here
        raise MissingFileError(
            f"{path!r} is not a local file or directory, and loading it as a Hugging Face hub dataset failed "
            f"({type(err).__name__}: {err}). Offline, download the data first and pass the path of a local "
            ".json / .jsonl / .parquet / .csv file or directory."
        ) from err
    return [_drop_nulls(r) for r in dataset.to_list()]
