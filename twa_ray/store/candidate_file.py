"""One candidate = one Arrow IPC file: writing it, reading its footer, projecting columns.

File layout (contract): an Arrow IPC *file* (random-access format) with one record batch
of one row. One column per parameter tensor, named after the parameter, of type
``fixed_size_list<float32>[numel]`` (the flattened tensor, row-major). The candidate's
info dict is JSON in the schema metadata under ``twa_ray.info``.

Row ranges: :func:`locate_values` finds where each column's float32 values lie in the file
from the record batch's message header alone (Arrow IPC: magic, schema message, record
batch message = 8-byte prefix + flatbuffer metadata + body), so :func:`read_value_ranges`
reads just the wanted element ranges: slices of the memory map locally, ranged reads on
other filesystems such as S3. On a local filesystem the same offsets let several writers
fill one file in row pieces: :func:`write_zero_candidate_file` lays the file out with its
values as holes, :func:`write_value_ranges` writes a piece.
"""

from __future__ import annotations

import json
import os
import struct
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
    "open_source",
    "locate_values",
    "read_value_ranges",
    "write_zero_candidate_file",
    "write_value_ranges",
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
    with fs.open_output_stream(path) as sink:
        _write_ipc(sink, names, arrays, info_json)


def _write_ipc(sink, names: Sequence[str], arrays: Sequence[np.ndarray], info_json: str) -> None:
    """The candidate file's bytes into ``sink`` (a pyarrow or Python file object)."""
    fields = [pa.field(n, _column_type(a.size), nullable=False) for n, a in zip(names, arrays)]
    schema = pa.schema(
        fields,
        metadata={INFO_KEY: info_json.encode("utf-8"), FORMAT_KEY: str(FILE_FORMAT_VERSION).encode()},
    )
    columns = [
        pa.FixedSizeListArray.from_arrays(pa.array(a, type=pa.float32()), a.size) for a in arrays
    ]
    batch = pa.record_batch(columns, schema=schema)
    with pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(batch)


class _HoleWriter:
    """A Python file object for Arrow that seeks over all-zero writes instead of writing
    them: the file holds the same bytes (a hole reads as zeros) without writing them."""

    closed = False

    def __init__(self, file) -> None:
        self.file = file
        self.written = 0  # bytes actually written

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if np.frombuffer(view, dtype=np.uint8).any():
            self.file.write(view)
            self.written += len(view)
        else:
            self.file.seek(len(view), os.SEEK_CUR)
        return len(view)

    def tell(self) -> int:
        return self.file.tell()

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:  # the caller closes the file
        self.closed = True


def write_zero_candidate_file(path: str, names: Sequence[str], numels: Sequence[int], info_json: str) -> int:
    """Write a candidate whose values are all zero to the local file ``path`` (the caller
    writes to a temp name and moves it), for :func:`write_value_ranges` to fill in.

    The values are holes: only the headers and footer (a few hundred bytes plus about 200
    per column) are written, whatever the size of the tensors. Returns the bytes written.
    """
    arrays = [np.zeros(n, dtype=np.float32) for n in numels]  # untouched pages: no memory used
    with open(path, "wb") as file:
        sink = _HoleWriter(file)
        _write_ipc(sink, names, arrays, info_json)
        file.truncate(file.tell())  # the size, in case the file ends in a hole
    return sink.written


def write_value_ranges(
    path: str, numels: Sequence[int], ranges: Sequence[Sequence[tuple[int, int]]], values: np.ndarray
) -> int:
    """Overwrite elements ``[start, end)`` of every column's values of the local candidate
    file ``path`` with consecutive slices of ``values`` (the inverse of :func:`read_value_ranges`).

    Args:
        numels: per column (file order) its number of values.
        ranges: per column (file order) its element ranges ``[start, end)`` (a list, possibly
            empty), increasing and disjoint.
        values: float32, shape (sum of the ranges' lengths,); taken in column and range order.
    Returns:
        Bytes written: 4 per element.
    """
    with open_source(pafs.LocalFileSystem(), path, is_local=True) as source:
        offsets, _ = locate_values(source, path, numels)
    data = np.ascontiguousarray(values, dtype="<f4")
    at, nbytes = 0, 0
    with open(path, "r+b") as file:
        for offset, runs in zip(offsets, ranges):
            for start, end in runs:
                if end > start:
                    file.seek(offset + 4 * start)
                    file.write(memoryview(data[at:at + end - start]).cast("B"))
                    nbytes += 4 * (end - start)
                    at += end - start
    return nbytes


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
    with open_source(fs, path, is_local) as source:
        if included_fields is None:
            reader = pa.ipc.open_file(source)
        else:
            if len(included_fields) == 0:
                raise ValueError("included_fields must not be empty (empty means all columns in Arrow)")
            options = pa.ipc.IpcReadOptions(included_fields=list(included_fields))
            reader = pa.ipc.open_file(source, options=options)
        yield reader


@contextmanager
def open_source(fs: pafs.FileSystem, path: str, is_local: bool) -> Iterator[pa.NativeFile]:
    """The file as a random-access source: a memory map when local, else ``fs.open_input_file``
    (whose ``read_at`` is a ranged read on object stores). Nothing is read on opening."""
    source = pa.memory_map(path, "r") if is_local else fs.open_input_file(path)
    try:
        yield source
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


# --------------------------------------------------------------------------- row ranges
_MAGIC = b"ARROW1"
_CONTINUATION = b"\xff\xff\xff\xff"
_HEADER_RECORD_BATCH = 3  # MessageHeader union tag in Arrow's Message.fbs


class _Table:
    """One flatbuffers table of an Arrow IPC message's metadata (read-only, bounds-checked)."""

    def __init__(self, buf: bytes, pos: int):
        self.buf, self.pos = buf, pos
        self.vtable = pos - _unpack("<i", buf, pos)
        self.vtable_size = _unpack("<H", buf, self.vtable)

    def _field(self, index: int) -> int:
        """Absolute position of field ``index`` (its id in the .fbs), 0 when absent."""
        slot = 4 + 2 * index
        if slot >= self.vtable_size:
            return 0
        offset = _unpack("<H", self.buf, self.vtable + slot)
        return self.pos + offset if offset else 0

    def scalar(self, index: int, fmt: str, default: int) -> int:
        pos = self._field(index)
        return _unpack(fmt, self.buf, pos) if pos else default

    def table(self, index: int) -> "_Table | None":
        pos = self._field(index)
        return _Table(self.buf, pos + _unpack("<I", self.buf, pos)) if pos else None

    def int64_pairs(self, index: int) -> list[tuple[int, int]]:
        """A vector of 16-byte structs of two int64 (FieldNode, Buffer)."""
        pos = self._field(index)
        if not pos:
            return []
        vec = pos + _unpack("<I", self.buf, pos)
        count = _unpack("<I", self.buf, vec)
        if vec + 4 + 16 * count > len(self.buf):
            raise struct.error("vector runs past the metadata")
        return [struct.unpack_from("<qq", self.buf, vec + 4 + 16 * k) for k in range(count)]


def _unpack(fmt: str, buf: bytes, pos: int) -> int:
    return struct.unpack_from(fmt, buf, pos)[0]


def _read_at(source: pa.NativeFile, nbytes: int, offset: int) -> pa.Buffer:
    """``nbytes`` at ``offset``: a slice of the map when memory-mapped, else one ranged read."""
    source.seek(offset)
    return source.read_buffer(nbytes)


def _message_prefix(source: pa.NativeFile, pos: int, size: int) -> tuple[int, int]:
    """(metadata position, metadata length) of the IPC message starting at ``pos``."""
    if pos + 8 > size:
        raise ValueError("the file ends inside a message header")
    prefix = _read_at(source, 8, pos).to_pybytes()
    if prefix[:4] == _CONTINUATION:
        return pos + 8, _unpack("<i", prefix, 4)
    return pos + 4, _unpack("<i", prefix, 0)  # before Arrow 0.15: no continuation marker


def locate_values(source: pa.NativeFile, path: str, numels: Sequence[int]) -> tuple[list[int], int]:
    """Where each column's float32 values start in a candidate file, from its headers only.

    Reads the file magic and the schema message's length (16 bytes), the record batch's
    8-byte prefix and its metadata (about 100 bytes + 80 per column); no tensor data.

    Args:
        numels: per column (file order) its number of values (the store's numels).
    Returns:
        (offsets, header_bytes): per column the absolute byte offset of its first value;
        the bytes read to find them.
    Raises:
        ValueError: not a candidate file of this layout (names ``path``): other magic,
            message kinds, column count or sizes, or compressed buffers.
    """
    size = source.size()
    try:
        head = _read_at(source, 8, 0).to_pybytes()
        if head[:6] != _MAGIC:
            raise ValueError("not an Arrow IPC file (no ARROW1 magic)")
        schema_meta, schema_len = _message_prefix(source, 8, size)  # the schema: no body
        batch_pos = schema_meta + schema_len
        meta_pos, meta_len = _message_prefix(source, batch_pos, size)
        if meta_len <= 0 or meta_pos + meta_len > size:
            raise ValueError(f"record batch metadata of {meta_len} bytes at {meta_pos} does not fit the file")
        meta = _read_at(source, meta_len, meta_pos).to_pybytes()
        header_bytes = 3 * 8 + meta_len  # magic, the two message prefixes, the batch's metadata
        message = _Table(meta, _unpack("<I", meta, 0))
        kind = message.scalar(1, "<B", 0)
        if kind != _HEADER_RECORD_BATCH:
            raise ValueError(f"the message after the schema has header type {kind}, expected a record batch")
        body_length = message.scalar(3, "<q", 0)
        batch = message.table(2)
        if batch is None:
            raise ValueError("the record batch message has no header")
        if batch.table(3) is not None:
            raise ValueError("compressed record batch (the store writes uncompressed files)")
        nodes, buffers = batch.int64_pairs(1), batch.int64_pairs(2)
    except struct.error as exc:
        raise ValueError(f"candidate file {path}: malformed record batch metadata ({exc})") from exc
    except ValueError as exc:
        raise ValueError(f"candidate file {path}: {exc}") from exc
    body = meta_pos + meta_len
    if body + body_length > size:
        raise ValueError(f"candidate file {path}: the record batch body runs past the end of the file")
    n_cols = len(numels)
    if len(nodes) != 2 * n_cols or len(buffers) != 3 * n_cols:
        raise ValueError(f"candidate file {path}: {len(nodes)} field nodes and {len(buffers)} buffers, expected "
                         f"{2 * n_cols} and {3 * n_cols} for {n_cols} fixed_size_list<float32> columns")
    offsets = []
    for j, numel in enumerate(numels):
        # per column: the list's node and validity buffer, then its float child's node, validity and values
        (rows, list_nulls), (count, nulls) = nodes[2 * j], nodes[2 * j + 1]
        start, length = buffers[3 * j + 2]
        if (rows, list_nulls, count, nulls) != (1, 0, numel, 0) or length < 4 * numel or start < 0 \
                or start + 4 * numel > body_length:
            raise ValueError(f"candidate file {path}: column {j} holds {count} values in {rows} row(s) "
                             f"({nulls + list_nulls} nulls, {length} bytes), expected {numel} non-null float32")
        offsets.append(body + start)
    return offsets, header_bytes


def read_value_ranges(
    source: pa.NativeFile,
    path: str,
    numels: Sequence[int],
    ranges: Sequence[Sequence[tuple[int, int]]],
    dest: np.ndarray,
) -> int:
    """Copy elements ``[start, end)`` of every column's values into consecutive slices of ``dest``.

    Args:
        numels: per column (file order) its number of values.
        ranges: per column (file order) its element ranges ``[start, end)`` (a list, possibly
            empty); each is one slice of the memory map, or one ranged read.
        dest: float32, shape (sum of the ranges' lengths,); filled in column and range order.
    Returns:
        Bytes read from ``source``: the headers (:func:`locate_values`) plus 4 per element.
    """
    offsets, nbytes = locate_values(source, path, numels)
    at = 0
    for offset, runs in zip(offsets, ranges):
        for start, end in runs:
            if end > start:
                chunk = _read_at(source, 4 * (end - start), offset + 4 * start)
                if chunk.size != 4 * (end - start):
                    raise ValueError(f"candidate file {path}: short read ({chunk.size} of {4 * (end - start)} bytes)")
                dest[at:at + end - start] = np.frombuffer(chunk, dtype="<f4")
                nbytes += 4 * (end - start)
                at += end - start
    return nbytes
