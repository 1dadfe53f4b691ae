"""Local file readers that name every unreadable byte, line or file instead of raising a raw traceback.

Each reader yields `(label, index, row)` like `sources.iter_rows`; `row` is a dict, or an `InvalidRow`
(rule `malformed_row`) for a record that cannot be read, so `data.on_invalid` decides (`drop` lists it
with its line and reading goes on). What cannot be skipped alone stops with a `PipelineError` naming the
file, the line (or byte offset, or Parquet row group) and the fix, under either policy: a file that is
not the compression its suffix says or is truncated, a corrupt Parquet file, a JSON array that is broken
(an array cannot be resynchronised after an error), a CSV quote that is never closed, a CSV byte that is
not UTF-8 (a CSV record may span lines, so one line cannot be skipped alone).

Records are physical where the format has them, and every one is counted (read = written + dropped): a
JSON Lines record is one non-blank line (its row index counts non-blank lines); a CSV record is one row,
which spans several lines only through a quoted field holding a newline. CSV quoting is strict (a quote
must close its field), and a multi-line record of another width than the header is a runaway quote that
swallowed lines: refused, naming the line where the quote opens. A one-line CSV row with more or fewer
fields than the header is a malformed row (not padded with nulls).

JSON is strict: `NaN`, `Infinity` and `-Infinity` (which Python's `json` accepts by default) are refused,
as are an object with the same key twice, at any depth (Python's `json` would keep the last value and lose
the other silently), a trailing comma or anything after the closing `]` of an array, a lone UTF-16
surrogate escape (`"\\ud800"`: not a character, it cannot be written as UTF-8) and nesting deeper than
`MAX_DEPTH`.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import io
import json
import lzma
import re
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.core.errors import PipelineError
from pipeline.data.invalid import InvalidRow

BOM = codecs.BOM_UTF8
# what a decompressor raises on data it cannot read (zstandard's error is an Exception subclass, added below)
DECOMPRESS_ERRORS: tuple = (OSError, EOFError, lzma.LZMAError, zlib.error)
TOOLS = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}
_LONE_SURROGATE_ESCAPE = re.compile(
    r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)
_SURROGATE = re.compile("[\\ud800-\\udfff]")
_LONE_CR = re.compile(rb"\r(?!\n)")
# deeper rows are refused when read: later steps walk rows recursively and would hit Python's recursion limit
MAX_DEPTH = 100

RowStream = Iterator[tuple[str, int, "dict | InvalidRow"]]


class _NotJSON(ValueError):
    """A `NaN` / `Infinity` literal: Python's json reads it, JSON does not have it."""


def _refuse_constant(name: str):
    raise _NotJSON(name)


class _DuplicateKey(ValueError):
    """An object with the same key twice: Python's json keeps the last value, silently losing the other."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    row = dict(pairs)
    if len(row) < len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return row


STRICT_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)


def open_binary(path: Path) -> io.BufferedIOBase:
    """A byte stream over a file, decompressing by suffix."""
    kind = path.suffix.lower()
    if kind == ".gz":
        return gzip.open(path, "rb")
    if kind == ".bz2":
        return bz2.open(path, "rb")
    if kind == ".xz":
        return lzma.open(path, "rb")
    if kind == ".zst":
        try:
            import zstandard
        except ImportError:
            raise PipelineError(
                f"{path}: reading .zst needs the zstandard package (pip install zstandard), or decompress the file."
            ) from None
        return io.BufferedReader(_ZstdStream(zstandard, path))
    return open(path, "rb")


class _ZstdStream(io.RawIOBase):
    """The decompressed bytes of a .zst file (one or more frames), frame by frame; a file that ends inside a
    frame raises EOFError like gzip's (zstandard's `stream_reader` ends such a file silently, losing the rest)."""

    CHUNK = 1 << 14  # compressed bytes fed at a time (the output of one feed is what they decompress to)

    def __init__(self, zstandard, path: Path):
        self.decompressor, self.file = zstandard.ZstdDecompressor(), open(path, "rb")
        self.frame = None  # the decompressor of the frame being read; None between frames
        self.pending, self.at = memoryview(b""), 0  # decompressed bytes not yet returned

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.at == len(self.pending):
            data = self.file.read(self.CHUNK)
            if not data:
                if self.frame is not None:
                    raise EOFError("Compressed file ended before the end of its last zstd frame")
                return 0
            out = []
            while data:  # a chunk may end one frame and start the next
                self.frame = self.frame or self.decompressor.decompressobj()
                out.append(self.frame.decompress(data))
                data = self.frame.unused_data if self.frame.eof else b""
                if self.frame.eof:
                    self.frame = None
            self.pending, self.at = memoryview(b"".join(out)), 0
        n = min(len(buffer), len(self.pending) - self.at)
        buffer[:n] = self.pending[self.at : self.at + n]
        self.at += n
        return n

    def close(self) -> None:
        self.file.close()
        super().close()


def _decompress_errors() -> tuple:
    zstandard = sys.modules.get("zstandard")
    return DECOMPRESS_ERRORS + ((zstandard.ZstdError,) if zstandard is not None else ())


@contextmanager
def reading(path: Path, where: Callable[[], str]):
    """Turn a decompression or I/O failure into an error naming the file, how far it got, and the fix."""
    try:
        yield
    except _decompress_errors() as err:
        tool = TOOLS.get(path.suffix.lower())
        fix = (
            f"The file is truncated or corrupt, or is not {tool} data despite its {path.suffix} suffix: "
            f"re-download or re-create it (`{tool} -t {path.name}` checks it), or rename it to its real format."
            if tool
            else "Check the file and the disk, then re-run."
        )
        raise PipelineError(f"{path}: cannot read it {where()} ({type(err).__name__}: {err}). {fix}") from None


def physical_lines(path: Path, handle) -> Iterator[tuple[int, int, bytes]]:
    """`(line_number, byte_offset, line)` of a byte stream (decompressed offsets), the UTF-8 BOM removed.
    A lone carriage return ends a line too, as in text mode."""
    line_number, offset = 0, 0
    with reading(path, lambda: f"after line {line_number}" if line_number else "at its start"):
        for raw in handle:
            if line_number == 0 and raw.startswith(BOM):
                raw, offset = raw[len(BOM) :], len(BOM)
            parts = _LONE_CR.split(raw) if b"\r" in raw else [raw]
            for index, part in enumerate(parts):
                line_number += 1
                yield line_number, offset, part + (b"\r" if index < len(parts) - 1 else b"")
                offset += len(part) + (index < len(parts) - 1)


def not_utf8(err: UnicodeDecodeError, line: bytes, line_offset: int) -> str:
    """What is wrong with a line that is not UTF-8, with the byte, its column and its offset in the file."""
    if line_offset + err.start == 0 and line.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return (
            "the file is UTF-16 (it starts with a UTF-16 byte-order mark); convert it with `iconv -f utf-16 -t utf-8`"
        )
    return (
        f"byte 0x{line[err.start]:02x} at column {err.start + 1} (byte offset {line_offset + err.start} in the "
        "file) is not UTF-8; save the file as UTF-8 (e.g. `iconv -f cp1252 -t utf-8`)"
    )


def _lone_surrogate(text: str, value) -> str | None:
    """The first lone surrogate escape of a JSON text whose parsed `value` holds one (None if it holds none)."""
    if "\\u" not in text:
        return None
    match = _LONE_SURROGATE_ESCAPE.search(text)
    if match is None:
        return None
    stack = [value]
    while stack:  # confirm on the parsed value: "\\\\ud800" (an escaped backslash) is not a surrogate
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return f"a lone surrogate escape {match.group()} at column {match.start() + 1}"
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _too_deep(text: str, value) -> bool:
    """Whether `value` (parsed from `text`) nests lists and objects more than MAX_DEPTH levels deep."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return False  # too few brackets to be that deep: the common case costs two counts
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


SURROGATE_FIX = (
    "is not a character and cannot be written as UTF-8; fix the escape (a pair such as \\ud83d\\ude00 "
    "encodes one character) or remove it"
)
CONSTANT_FIX = "which is not JSON (write null, or the number as a string)"
DEPTH_FIX = f"nests arrays or objects more than {MAX_DEPTH} levels deep; flatten the row"
DUPLICATE_FIX = "JSON would keep only the last value; remove one of them"


def parse_json_line(raw: bytes, line_number: int, offset: int) -> dict | InvalidRow:
    """One JSON Lines record, or the `InvalidRow` saying why the line cannot be read."""
    where = f"line {line_number}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return InvalidRow("malformed_row", f"{where}: {not_utf8(err, raw, offset)}")
    try:
        row = STRICT_DECODER.decode(text.rstrip("\r\n"))  # so an error at the line's end is on this line
    except json.JSONDecodeError as err:
        return InvalidRow("malformed_row", f"{where} is not valid JSON ({err.msg} at column {err.colno})")
    except _NotJSON as err:
        return InvalidRow("malformed_row", f"{where} holds {err}, {CONSTANT_FIX}")
    except _DuplicateKey as err:
        return InvalidRow("malformed_row", f"{where} has the key {err.args[0]!r} twice in one object ({DUPLICATE_FIX})")
    except RecursionError:
        return InvalidRow("malformed_row", f"{where} {DEPTH_FIX}")
    if _too_deep(text, row):
        return InvalidRow("malformed_row", f"{where} {DEPTH_FIX}")
    surrogate = _lone_surrogate(text, row)
    if surrogate:
        return InvalidRow("malformed_row", f"{where}: {surrogate} {SURROGATE_FIX}")
    if not isinstance(row, dict):
        return InvalidRow("malformed_row", f"{where} is a JSON {type(row).__name__}, not an object")
    return row


def read_json_lines(path: Path, handle, label: str) -> RowStream:
    index = 0
    for line_number, offset, raw in physical_lines(path, handle):
        if not raw.strip():
            continue  # blank lines are not rows
        yield label, index, parse_json_line(raw, line_number, offset)
        index += 1


def starts_with_array(path: Path, handle) -> bool:
    """Whether the (decompressed) stream starts, after a BOM and whitespace, with `[`."""
    with reading(path, lambda: "at its start"):
        head = handle.read(4096)
    return head.removeprefix(BOM).lstrip().startswith(b"[")


class _ArrayText:
    """The decoded text of a JSON array, read in chunks into a bounded buffer, with line numbers for messages."""

    def __init__(self, path: Path, handle, label: str, chunk: int):
        self.path, self.handle, self.label, self.chunk = path, handle, label, chunk
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.buffer, self.pos, self.eof = "", 0, False
        self.lines_before, self.bytes_read = 0, 0  # newlines dropped from the buffer; bytes read from the stream

    def more(self) -> bool:
        """Read another chunk (dropping what was consumed); False at the end of the file."""
        with reading(self.path, lambda: f"after line {self.line()}"):
            data = self.handle.read(self.chunk)
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as err:
            pending = len(self.decoder.getstate()[0])
            offset = self.bytes_read - pending + err.start
            raise PipelineError(
                f"{self.label}: byte offset {offset} (near line {self.line()}) is not UTF-8; save the "
                "file as UTF-8 (e.g. `iconv -f cp1252 -t utf-8`)."
            ) from None
        self.bytes_read += len(data)
        self.lines_before += self.buffer.count("\n", 0, self.pos)
        self.buffer, self.pos = self.buffer[self.pos :] + text, 0
        self.eof = not data
        return bool(data)

    def line(self, pos: int | None = None) -> int:
        return self.lines_before + self.buffer.count("\n", 0, self.pos if pos is None else pos) + 1

    def skip_space(self) -> str:
        """The next non-whitespace character ('' at the end of the file), without consuming it."""
        while True:
            while self.pos < len(self.buffer) and self.buffer[self.pos].isspace():
                self.pos += 1
            if self.pos < len(self.buffer) or not self.more():
                return self.buffer[self.pos : self.pos + 1]


def read_json_array(path: Path, handle, label: str, chunk: int) -> RowStream:
    """The items of a top-level JSON array, decoded one at a time with a bounded buffer; strict JSON."""
    text, index = _ArrayText(path, handle, label, chunk), 0
    text.skip_space()
    text.pos += 1  # the "[" (starts_with_array checked it)

    def broken(problem: str) -> PipelineError:
        return PipelineError(
            f"{label}: row {index}: {problem} at line {text.line()} [rule malformed_row]; a JSON array "
            "cannot be resynchronised after an error, so fix the file (or convert it to JSON Lines, "
            "where a bad line can be dropped)."
        )

    if text.skip_space() == "]":
        text.pos += 1
    else:
        while True:
            if text.skip_space() == "":
                raise PipelineError(
                    f"{label}: the JSON array is not closed (after row {index - 1}); the file is truncated."
                )
            while True:
                try:
                    row, end = STRICT_DECODER.raw_decode(text.buffer, text.pos)
                    if end < len(text.buffer) or text.eof or not text.more():
                        break  # a value that ends the buffer may go on in the next chunk (a number)
                except json.JSONDecodeError as err:
                    if text.eof or not text.more():
                        raise broken(f"invalid JSON ({err.msg})") from None
                except _NotJSON as err:
                    raise broken(f"{err} literal, {CONSTANT_FIX},") from None
                except _DuplicateKey as err:
                    raise broken(f"an object has the key {err.args[0]!r} twice ({DUPLICATE_FIX})") from None
                except RecursionError:
                    raise broken(f"the item {DEPTH_FIX},") from None
            start, item_text = text.pos, text.buffer[text.pos : end]
            text.pos = end
            surrogate = _lone_surrogate(item_text, row)
            if _too_deep(item_text, row):
                row = InvalidRow("malformed_row", f"array item at line {text.line(start)} {DEPTH_FIX}")
            elif surrogate:
                row = InvalidRow("malformed_row", f"array item at line {text.line(start)}: {surrogate} {SURROGATE_FIX}")
            elif not isinstance(row, dict):
                row = InvalidRow(
                    "malformed_row",
                    f"array item at line {text.line(start)} is a JSON {type(row).__name__}, not an object",
                )
            yield label, index, row
            index += 1
            separator = text.skip_space()
            if separator == "]":
                text.pos += 1
                break
            if separator != ",":
                raise broken(f"expected ',' or ']' after the item, found {separator or 'the end of the file'!r}")
            text.pos += 1
            if text.skip_space() == "]":
                raise broken("a trailing comma before ']' (strict JSON has none; remove it)")
    if text.skip_space() != "":
        raise PipelineError(
            f"{label}: text after the closing ']' of the JSON array at line {text.line()}; a JSON file "
            "holds one array (several arrays or objects: use JSON Lines, one object per line)."
        )


def read_json(path: Path, chunk: int) -> RowStream:
    """A JSON array (the file starts with `[`) or JSON Lines."""
    with open_binary(path) as handle:
        array = starts_with_array(path, handle)
    with open_binary(path) as handle:
        if array:
            yield from read_json_array(path, handle, str(path), chunk)
        else:
            yield from read_json_lines(path, handle, str(path))


class _CsvLines:
    """The decoded lines fed to `csv.reader`, keeping the current record's lines to locate an unclosed quote."""

    def __init__(self, path: Path, handle, label: str):
        self.lines, self.label, self.record = physical_lines(path, handle), label, []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line_number, offset, raw = next(self.lines)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise PipelineError(
                f"{self.label}: CSV line {line_number}: {not_utf8(err, raw, offset)}. A CSV record may "
                "span lines, so this line cannot be dropped alone."
            ) from None
        self.record.append((line_number, text))
        return text

    def open_quote(self) -> tuple[int, int]:
        """(line, column) of the quote that opens the field still open at the end of a line of this record
        (its first line if none is)."""
        inside, opened = False, None
        for line_number, text in self.record:
            for column, char in enumerate(text, start=1):
                if char == '"':
                    inside = not inside
                    if inside:
                        where = (line_number, column)
            if inside:
                opened = opened or where
                break
        return opened or (self.record[0][0], 1)


def _runaway_quote(label: str, lines: _CsvLines, problem: str) -> PipelineError:
    line, column = lines.open_quote()
    last = lines.record[-1][0]
    return PipelineError(
        f"{label}: CSV line {line}: the quoted field opening at column {column} {problem} (the record "
        f"runs to line {last}); a quote that is not closed reads the lines after it as one field, and "
        'those rows would be lost. Close the quote, double a quote inside a quoted field (""), or '
        "quote a field that starts with a quote."
    )


def read_csv(path: Path) -> RowStream:
    """CSV rows as dicts (empty cells read as null); quoting is strict, and a row of the wrong width is malformed."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    label = str(path)
    with open_binary(path) as handle:
        lines = _CsvLines(path, handle, label)
        reader = csv.reader(lines, strict=True)
        header, index = None, 0
        while True:
            lines.record = []
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise _runaway_quote(label, lines, f"is malformed ({err})") from None
            if not fields:
                continue  # a blank line is not a row
            if header is None:
                header = fields
                duplicates = sorted({name for name in header if header.count(name) > 1})
                if duplicates:
                    raise PipelineError(
                        f"{label}: the CSV header names {duplicates} more than once, so one of each "
                        "would be lost; rename the columns."
                    )
                continue
            first, last = lines.record[0][0], lines.record[-1][0]
            if len(fields) != len(header):
                if last > first:  # a quoted newline swallowed lines: a runaway quote
                    raise _runaway_quote(
                        label,
                        lines,
                        f"holds a newline and leaves the record with {len(fields)} "
                        f"fields, the header has {len(header)}",
                    )
                more = "more" if len(fields) > len(header) else "fewer"
                yield (
                    label,
                    index,
                    InvalidRow(
                        "malformed_row",
                        f"CSV line {first} has {more} fields than the header "
                        f"({len(fields)}, the header has {len(header)})",
                    ),
                )
            else:
                yield label, index, {k: (v if v != "" else None) for k, v in zip(header, fields)}
            index += 1
