"""One candidate = one Arrow IPC file: writing it, reading its footer, projecting columns.

File layout (contract): an Arrow IPC *file* (random-access format) with one record batch
of one row. One column per parameter tensor, named after the parameter, of type
``fixed_size_list<float32>[numel]`` (the flattened tensor, row-major). The candidate's
info dict is JSON in the schema metadata under ``twa_ray.info``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

__all__ = [
    "INFO_KEY",
    "FORMAT_KEY",
    "FILE_FORMAT_VERSION",
    "write_candidate_file",
    "open_candidate",
    "read_schema",
    "decode_info",
    "check_schema",
    "column_values",
]

INFO_KEY = b"twa_ray.info"
FORMAT_KEY = b"twa_ray.format"
FILE_FORMAT_VERSION = 1


def _column_type(numel: int) -> pa.DataType:
    return pa.list_(pa.float32(), numel)


def write_candidate_file(
    fs: pafs.FileSystem,
    path: str,
    names: Sequence[str],
    arrays: Sequence[np.ndarray],
    info_json: str,
) -> None:
    """Write one candidate to ``path`` (the caller writes to a temp name and moves it).

    Args:
        names: parameter names, one per column, in store order.
        arrays: per parameter a contiguous 1-D float32 array of shape (numel_i,).
        info_json: the candidate's info, already JSON-encoded.
    """
    fields = [pa.field(n, _column_type(a.size), nullable=False) for n, a in zip(names, arrays)]
    schema = pa.schema(
        fields,
        metadata={INFO_KEY: info_json.encode("utf-8"), FORMAT_KEY: str(FILE_FORMAT_VERSION).encode()},
    )
    columns = [
        pa.FixedSizeListArray.from_arrays(pa.array(a, type=pa.float32()), a.size) for a in arrays
    ]
    batch = pa.record_batch(columns, schema=schema)
    with fs.open_output_stream(path) as sink:
        with pa.ipc.new_file(sink, schema) as writer:
            writer.write_batch(batch)


@contextmanager
def open_candidate(
    fs: pafs.FileSystem,
    path: str,
    is_local: bool,
    included_fields: Sequence[int] | None = None,
) -> Iterator[pa.ipc.RecordBatchFileReader]:
    """Open a candidate file; only the footer is read until a batch is requested.

    Memory-maps when the filesystem is local. With ``included_fields`` (indices into the
    file's schema, must be non-empty) only those columns' buffers are read; the reader's
    schema is then the projected one, in file order. Arrays obtained from the reader
    may reference the mapped file: copy what you need before leaving the block.
    """
    source = pa.memory_map(path, "r") if is_local else fs.open_input_file(path)
    try:
        if included_fields is None:
            reader = pa.ipc.open_file(source)
        else:
            if len(included_fields) == 0:
                raise ValueError("included_fields must not be empty (empty means all columns in Arrow)")
            options = pa.ipc.IpcReadOptions(included_fields=list(included_fields))
            reader = pa.ipc.open_file(source, options=options)
        yield reader
    finally:
        source.close()


def read_schema(fs: pafs.FileSystem, path: str, is_local: bool) -> pa.Schema:
    """The schema (with metadata) from the file footer; reads no tensor data.

    Raises:
        pyarrow.ArrowInvalid: the file is not a complete Arrow IPC file (e.g. truncated).
    """
    with open_candidate(fs, path, is_local) as reader:
        if reader.num_record_batches != 1:
            raise pa.ArrowInvalid(f"expected 1 record batch, found {reader.num_record_batches}")
        return reader.schema


def decode_info(schema: pa.Schema, path: str) -> dict:
    """The candidate's info dict from the schema metadata ({} when absent)."""
    raw = (schema.metadata or {}).get(INFO_KEY)
    if raw is None:
        return {}
    try:
        info = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"candidate file {path}: metadata {INFO_KEY.decode()!r} is not valid JSON: {exc}") from exc
    if not isinstance(info, dict):
        raise ValueError(f"candidate file {path}: metadata {INFO_KEY.decode()!r} is not a JSON object")
    return info


def _check_type(field: pa.Field, numel: int, path: str) -> None:
    t = field.type
    if not (pa.types.is_fixed_size_list(t) and t.list_size == numel and t.value_type == pa.float32()):
        raise ValueError(
            f"candidate file {path}: column {field.name!r} has type {t}, "
            f"expected fixed_size_list<float32>[{numel}]"
        )


def check_schema(schema: pa.Schema, names: Sequence[str], numels: Sequence[int], path: str) -> None:
    """Check that a candidate file's columns match the store's parameters exactly."""
    if list(schema.names) != list(names):
        missing = [n for n in names if n not in schema.names]
        extra = [n for n in schema.names if n not in names]
        raise ValueError(
            f"candidate file {path} does not match the store's parameters "
            f"(missing columns {missing}, unexpected columns {extra}, or a different order)"
        )
    for field, numel in zip(schema, numels):
        _check_type(field, numel, path)


def column_values(batch: pa.RecordBatch, name: str, numel: int, path: str) -> np.ndarray:
    """The single row of column ``name`` as a read-only float32 numpy view, shape (numel,).

    Zero-copy: the view references Arrow memory (possibly a memory map).
    """
    if batch.num_rows != 1:
        raise ValueError(f"candidate file {path}: expected 1 row, found {batch.num_rows}")
    idx = batch.schema.get_field_index(name)
    if idx < 0:
        raise ValueError(f"candidate file {path}: column {name!r} is missing")
    _check_type(batch.schema.field(idx), numel, path)
    col = batch.column(idx)
    if col.null_count:
        raise ValueError(f"candidate file {path}: column {name!r} is null")
    values = col.flatten()
    if values.null_count or len(values) != numel:
        raise ValueError(f"candidate file {path}: column {name!r} has null or missing values")
    return values.to_numpy(zero_copy_only=True)
