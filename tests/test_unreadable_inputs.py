"""Every unreadable or wrong input is named (file, line / row / byte offset, what is wrong, the fix), never a
raw traceback, and nothing is silently lost: under `data.on_invalid: drop` an unreadable JSON line is dropped
and listed like any invalid row while a file that cannot be read at all is an error; rows read = written +
dropped, counted in physical records (lines for JSON Lines, rows for CSV)."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import stages.normalize as normalize_stage
from pipeline.config.params import check_params
from pipeline.core.errors import PipelineError

GOOD = [
    {"prompt": f"Is fact {i} true?", "chosen": f" Yes, fact {i} holds.", "rejected": f" No, fact {i} fails."}
    for i in range(5)
]
GOOD_LINES = [json.dumps(row).encode() for row in GOOD]
AT = 2  # the 0-based row of the bad record; it is on line 3


def jsonl(bad: bytes, at: int = AT) -> bytes:
    lines = list(GOOD_LINES)
    lines.insert(at, bad)
    return b"\n".join(lines) + b"\n"


def json_array(text: str) -> bytes:
    """GOOD as a JSON array, one item per line, with `text` in place of the separator after the first item."""
    items = [json.dumps(row) for row in GOOD]
    return ("[" + items[0] + text + ",\n".join(items[1:]) + "]\n").encode()


def csv_bytes(rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([["prompt", "chosen", "rejected"]] + rows)
    return out.getvalue().encode()


CSV_GOOD = [[row["prompt"], row["chosen"], row["rejected"]] for row in GOOD]
CSV_TEXT = csv_bytes(CSV_GOOD).decode()


def parquet_bytes(rows=GOOD * 40) -> bytes:
    sink = io.BytesIO()
    pq.write_table(
        pa.Table.from_pylist([dict(r, prompt=f"{r['prompt']} {i}") for i, r in enumerate(rows)]),
        sink,
        compression="snappy",
        row_group_size=50,
    )
    return sink.getvalue()


def run(tmp_path, path, policy="error", **data):
    params = check_params({"data": {"train": str(path), "on_invalid": policy, "eval_fraction": 0.2, **data}})
    return normalize_stage.run(params, tmp_path / f"out-{policy}")


def dropped(tmp_path, report, policy="drop"):
    return [
        json.loads(line) for line in (tmp_path / f"out-{policy}" / report["dropped_rows_file"]).read_text().splitlines()
    ]


def raises(tmp_path, path, policy="error", **data) -> str:
    with pytest.raises(PipelineError) as err:
        run(tmp_path, path, policy, **data)
    assert not (tmp_path / f"out-{policy}").exists()
    return str(err.value)


# ---- one test per case ------------------------------------------------------------------------------------

BAD_LINES = {  # what is on line 3 -> what the message says is wrong there (and the fix)
    "non_utf8": (
        b'{"prompt": "Q", "chosen": " caf\xe9", "rejected": " b"}',
        r"line 3: byte 0xe9 at column 32 \(byte offset \d+ in the file\) is not UTF-8; save the file as UTF-8",
    ),
    "surrogate": (
        b'{"prompt": "Q", "chosen": " \\ud800", "rejected": " b"}',
        r"line 3: a lone surrogate escape \\ud800 at column 29 is not a character .* fix the escape",
    ),
    "too_deep": (
        b"[" * 100_000 + b"]" * 100_000,
        r"line 3 nests arrays or objects more than 100 levels deep; flatten the row",
    ),
    "bad_json": (b'{"prompt": "Q", "chosen": ', r"line 3 is not valid JSON \(Expecting value at column 27\)"),
    "nan": (
        b'{"prompt": "Q", "chosen": " a", "rejected": " b", "score": NaN}',
        r"line 3 holds NaN, which is not JSON \(write null, or the number as a string\)",
    ),
    "duplicate_key": (
        b'{"prompt": "Q", "chosen": " a", "rejected": " b", "chosen": " c"}',
        r"line 3 has the key 'chosen' twice in one object \(JSON would keep only the last value; "
        r"remove one of them\)",
    ),
    "nested_duplicate_key": (
        b'{"prompt": [{"role": "user", "content": "Q", "role": "system"}], "chosen": " a", "rejected": " b"}',
        r"line 3 has the key 'role' twice in one object .*remove one of them",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_an_unreadable_json_line_is_named_under_error_and_dropped_under_drop(tmp_path, case):
    bad, what = BAD_LINES[case]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(jsonl(bad))
    message = raises(tmp_path, path)
    assert message.startswith(f"{path}: row {AT}: "), message
    assert re.search(what, message), message
    assert "[rule malformed_row]" in message and "data.on_invalid: drop" in message

    report = run(tmp_path, path, "drop")
    assert report["rows_read"] == 6 == sum(report["rows_written"].values()) + report["rows_dropped"]
    assert report["dropped_by_reason"] == {"malformed_row": 1}
    [entry] = dropped(tmp_path, report)
    assert (entry["source"], entry["row"], entry["rule"]) == (str(path), AT, "malformed_row")
    assert entry["detail"].startswith("line 3"), entry
    assert re.search(what, entry["detail"]), entry


def test_a_duplicate_key_is_never_read_as_its_last_value(tmp_path):
    """Python's json keeps the last of two equal keys: the row is refused instead, the file's rows still add up."""
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(
        jsonl(b'{"prompt": "Q", "chosen": " a", "rejected": " b", "rejected": " a"}', at=0)
        + b'{"prompt": "Q2", "chosen": " a", "rejected": " b", "meta": {"k": 1, "k": 2}}\n'
    )
    message = raises(tmp_path, path)
    assert message.startswith(f"{path}: row 0: line 1 has the key 'rejected' twice in one object"), message
    assert "remove one of them" in message and "data.on_invalid: drop" in message, message
    report = run(tmp_path, path, "drop")
    assert report["rows_read"] == 7 == sum(report["rows_written"].values()) + report["rows_dropped"]
    assert report["dropped_by_reason"] == {"malformed_row": 2}
    assert [(e["row"], e["detail"].split(" (")[0]) for e in dropped(tmp_path, report)] == [
        (0, "line 1 has the key 'rejected' twice in one object"),
        (6, "line 7 has the key 'k' twice in one object"),
    ]


def test_non_utf8_byte_offset_is_the_offset_in_the_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(jsonl(BAD_LINES["non_utf8"][0]))
    [entry] = dropped(tmp_path, run(tmp_path, path, "drop"))
    offset = int(entry["detail"].split("byte offset ")[1].split()[0])
    assert path.read_bytes()[offset] == 0xE9


def test_a_corrupt_or_empty_parquet_file_is_an_error_even_under_drop(tmp_path):
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    message = raises(tmp_path, empty, "drop")
    assert message.startswith(f"{empty}: not a readable Parquet file (0 bytes;") and "re-create it" in message, message

    data = bytearray(parquet_bytes())
    data[len(data) // 2 : len(data) // 2 + 40] = b"\xff" * 40  # inside a data page of a later row group
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(bytes(data))
    message = raises(tmp_path, corrupt, "drop")
    assert message.startswith(f"{corrupt}: cannot read the rows from row "), message
    assert "row group" in message and "byte offset" in message and "re-create it" in message, message


def test_a_gz_that_is_not_gzip_or_is_truncated_is_an_error_even_under_drop(tmp_path):
    fake = tmp_path / "pairs.jsonl.gz"
    fake.write_bytes(jsonl(GOOD_LINES[0]))
    message = raises(tmp_path, fake, "drop")
    assert message.startswith(f"{fake}: cannot read it at its start (BadGzipFile:"), message
    assert "`gzip -t pairs.jsonl.gz`" in message and "not gzip data" in message

    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(b"".join(line + b"\n" for line in GOOD_LINES * 200))[:-300])
    message = raises(tmp_path, truncated, "drop")
    assert message.startswith(f"{truncated}: cannot read it after line "), message
    assert "EOFError" in message and "truncated or corrupt" in message and "re-download" in message


def _zstd(data: bytes) -> bytes:
    zstandard = pytest.importorskip("zstandard")
    return zstandard.ZstdCompressor().compress(data)


def _splits(directory) -> dict:
    return {f.name: pq.read_table(f).to_pylist() for f in sorted(directory.glob("*.parquet"))}


@pytest.mark.parametrize("layout", ["one_frame", "two_frames", "array"])
def test_a_zst_file_reads_like_the_plain_file(tmp_path, layout):
    data = MANY_LINES if layout != "array" else json_array(",\n")
    plain = tmp_path / ("pairs.jsonl" if layout != "array" else "pairs.json")
    plain.write_bytes(data)
    packed = tmp_path / (plain.name + ".zst")
    half = len(data) // 2 if layout == "two_frames" else len(data)
    packed.write_bytes(_zstd(data[:half]) + (_zstd(data[half:]) if data[half:] else b""))
    reports = [run(tmp_path / name, path) for name, path in (("plain", plain), ("packed", packed))]
    assert reports[0]["rows_read"] == reports[1]["rows_read"] == (3000 if layout != "array" else len(GOOD))
    assert reports[0]["rows_written"] == reports[1]["rows_written"] and reports[1]["rows_dropped"] == 0
    assert _splits(tmp_path / "plain" / "out-error") == _splits(tmp_path / "packed" / "out-error") != {}


def test_a_zst_that_is_not_zstd_or_is_truncated_is_an_error_even_under_drop(tmp_path):
    fake = tmp_path / "pairs.jsonl.zst"
    fake.write_bytes(jsonl(GOOD_LINES[0]))
    for policy in ("error", "drop"):
        message = raises(tmp_path, fake, policy)
        assert message.startswith(f"{fake}: cannot read it at its start (ZstdError:"), message
        assert "`zstd -t pairs.jsonl.zst`" in message and "not zstd data" in message, message

    packed = _zstd(MANY_LINES)
    for name, content in (
        ("cut.jsonl.zst", packed[:-50]),
        ("cut_early.jsonl.zst", packed[: len(packed) // 3]),
        ("garbage_after.jsonl.zst", packed + b"garbage"),
    ):
        path = tmp_path / name
        path.write_bytes(content)
        for policy in ("error", "drop"):  # zstandard's stream_reader would end a cut file silently: rows lost
            message = raises(tmp_path, path, policy)
            assert message.startswith(f"{path}: cannot read it "), message
            assert "truncated or corrupt" in message and "re-download" in message and f"`zstd -t {name}`" in message
            assert ("EOFError" if name.startswith("cut") else "ZstdError") in message, message


def test_a_csv_quote_that_is_never_closed_is_refused_where_it_opens(tmp_path):
    lines = ["prompt,chosen,rejected\n"] + [f"Q{i},a{i},b{i}\n" for i in range(35)]
    lines[3] = 'Q2,"unclosed answer,b2\n'  # line 4: swallows every line after it
    path = tmp_path / "pairs.csv"
    path.write_text("".join(lines))
    for policy in ("error", "drop"):
        message = raises(tmp_path, path, policy)
        assert message.startswith(f"{path}: CSV line 4: the quoted field opening at column 4 "), message
        assert "record runs to line 36" in message and "Close the quote" in message, message

    lines.append('Q9,"x, y",z\n')  # a later quote closes the runaway one: still refused
    path.write_text("".join(lines))
    assert raises(tmp_path, path).startswith(f"{path}: CSV line 4: the quoted field opening at column 4 ")


def test_legit_multiline_csv_fields_are_one_record_each(tmp_path):
    rows = CSV_GOOD + [["Q multi", "line one\nline two, with a comma\n", 'she said ""no""\nthen left']]
    path = tmp_path / "pairs.csv"
    path.write_bytes(csv_bytes(rows))
    report = run(tmp_path, path)
    assert report["rows_read"] == 6 == sum(report["rows_written"].values()) and report["rows_dropped"] == 0


def test_csv_rows_of_the_wrong_width_are_dropped_and_counted(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text(CSV_TEXT + "Q5,only two\nQ6,a,b,c\n")
    message = raises(tmp_path, path)
    assert message.startswith(f"{path}: row 5: CSV line 7 has fewer fields than the header (2, the header has 3)")
    report = run(tmp_path, path, "drop")
    assert report["rows_read"] == 7 and report["rows_dropped"] == 2
    assert [(e["row"], e["detail"][:10]) for e in dropped(tmp_path, report)] == [(5, "CSV line 7"), (6, "CSV line 8")]


ITEMS = [json.dumps(row) for row in GOOD]


@pytest.mark.parametrize(
    "text, problem",
    [
        (
            "[" + ",\n".join(ITEMS) + ",\n]",
            "row 5: a trailing comma before ']' (strict JSON has none; remove it) at line 6",
        ),
        ("[" + "\n".join(ITEMS) + "]", "row 1: expected ',' or ']' after the item, found '{' at line 2"),
        (
            "[" + ITEMS[0] + ',\n{"prompt": "Q", "chosen": "a", "rejected": "b", "prompt": "R"}]',
            "row 1: an object has the key 'prompt' twice (JSON would keep only the last value; remove one of them) "
            "at line 2",
        ),
        (
            "[" + ",\n".join(ITEMS[:3]) + ',\n{"prompt": "Q", "chosen": [{"role": "assistant", "content": "a",\n'
            '"content": "b"}], "rejected": "b"}]',
            "row 3: an object has the key 'content' twice (JSON would keep only the last value; remove one of them) "
            "at line 4",
        ),
    ],
)
def test_a_json_array_must_be_strict(tmp_path, text, problem):
    path = tmp_path / "pairs.json"
    path.write_text(text)
    message = raises(tmp_path, path, "drop")
    assert message.startswith(f"{path}: {problem} [rule malformed_row]") and "fix the file" in message, message


def test_nan_and_infinity_are_not_json(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(
        "[" + json.dumps(GOOD[0]) + ',\n{"prompt": "Q", "chosen": "a", "rejected": "b", "score": -Infinity}]'
    )
    message = raises(tmp_path, path)
    assert message.startswith(f"{path}: row 1: -Infinity literal, which is not JSON") and "at line 2" in message


# ---- a corpus of malformed inputs -----------------------------------------------------------------------


def _gz_corrupt_middle() -> bytes:
    data = bytearray(gzip.compress(b"".join(line + b"\n" for line in GOOD_LINES * 50)))
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


def _saved_truncated(directory):
    import datasets

    datasets.Dataset.from_list(GOOD * 20).save_to_disk(str(directory))
    [arrow] = directory.glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:200])


MANY_LINES = b"".join(
    json.dumps({"prompt": f"Q{i}", "chosen": " a", "rejected": " b"}).encode() + b"\n" for i in range(3000)
)
CSV_LINES = CSV_TEXT.splitlines(keepends=True)
# name -> (file name, bytes, records expected under drop, or None: an error under drop too)
CORPUS = {
    "jsonl_non_utf8": ("a.jsonl", jsonl(b'{"prompt": "\xff"}'), 6),
    "jsonl_latin1": ("a.jsonl", jsonl('{"prompt": "café"}'.encode("latin-1")), 6),
    "jsonl_cut_multibyte": ("a.jsonl", jsonl(b'{"prompt": "\xe2\x82'), 6),
    "jsonl_nul_bytes": ("a.jsonl", jsonl(b"\x00\x00\x00"), 6),
    "jsonl_lone_high_surrogate": ("a.jsonl", jsonl(b'{"prompt": "\\ud800x", "chosen": "a", "rejected": "b"}'), 6),
    "jsonl_lone_low_surrogate": ("a.jsonl", jsonl(b'{"prompt": "\\udc00", "chosen": "a", "rejected": "b"}'), 6),
    "jsonl_deep_arrays": ("a.jsonl", jsonl(b"[" * 100_000), 6),
    "jsonl_deep_but_parsed": (
        "a.jsonl",
        jsonl(b'{"chosen": "a", "rejected": "b", "tools": ' + b'[{"a":' * 400 + b"1" + b"}]" * 400 + b"}"),
        6,
    ),
    "jsonl_deep_objects": ("a.jsonl", jsonl(b'{"a":' * 50_000 + b"1" + b"}" * 50_000), 6),
    "jsonl_nan": ("a.jsonl", jsonl(b'{"prompt": NaN, "chosen": "a", "rejected": "b"}'), 6),
    "jsonl_infinity": ("a.jsonl", jsonl(b'{"prompt": "Q", "chosen": "a", "rejected": "b", "x": Infinity}'), 6),
    "jsonl_truncated_line": ("a.jsonl", jsonl(b'{"prompt": "Q", "ch'), 6),
    "jsonl_extra_data": ("a.jsonl", jsonl(GOOD_LINES[0][:-1] + b' 3"} x'), 6),
    "jsonl_array_line": ("a.jsonl", jsonl(b"[1, 2]"), 6),
    "jsonl_string_line": ("a.jsonl", jsonl(b'"just text"'), 6),
    "jsonl_duplicate_key": ("a.jsonl", jsonl(b'{"prompt": "Q", "prompt": "R", "chosen": "a", "rejected": "b"}'), 6),
    "jsonl_nested_duplicate_key": (
        "a.jsonl",
        jsonl(b'{"prompt": "Q", "chosen": "a", "rejected": "b", "m": [{"x": 1, "y": {"z": 1, "z": 1}}]}'),
        6,
    ),
    "jsonl_utf16_file": ("a.jsonl", "\n".join(json.dumps(r) for r in GOOD).encode("utf-16"), None),
    "array_trailing_comma": ("a.json", json_array(",\n")[:-2] + b",\n]\n", None),
    "array_double_comma": ("a.json", json_array(",,\n"), None),
    "array_missing_comma": ("a.json", json_array("\n"), None),
    "array_leading_comma": ("a.json", b"[," + json_array(",\n")[1:], None),
    "array_text_after": ("a.json", json_array(",\n") + b"[]", None),
    "array_unclosed": ("a.json", json_array(",\n")[:-3], None),
    "array_nan": ("a.json", json_array(', {"x": NaN},\n'), None),
    "array_duplicate_key": (
        "a.json",
        json_array(',\n{"prompt": "Q", "chosen": "a", "rejected": "b", "chosen": "c"},\n'),
        None,
    ),
    "array_non_utf8": ("a.json", json_array(",\n").replace(b"fact 3", b"fact \xff"), None),
    "array_deep": ("a.json", json_array(",\n" + "[" * 100_000 + "]" * 100_000 + ",\n"), None),
    "array_surrogate_item": ("a.json", json_array(',\n{"prompt": "\\udfff", "chosen": "a", "rejected": "b"},\n'), 6),
    "array_deep_but_parsed": ("a.json", json_array(",\n" + "[" * 300 + "]" * 300 + ",\n"), 6),
    "array_number_item": ("a.json", json_array(",\n7,\n"), 6),
    "csv_unclosed_quote": ("a.csv", "".join(CSV_LINES[:3] + ['Q,"open,b\n'] + CSV_LINES[3:]).encode(), None),
    "csv_quote_closed_later": (
        "a.csv",
        "".join(CSV_LINES[:3] + ['Q,"open,b\n'] + CSV_LINES[3:] + ['Q,"c",d\n']).encode(),
        None,
    ),
    "csv_text_after_quote": ("a.csv", "".join(CSV_LINES[:3] + ['Q,"a"b,c\n'] + CSV_LINES[3:]).encode(), None),
    "csv_extra_fields": ("a.csv", "".join(CSV_LINES[:3] + ["Q,a,b,c\n"] + CSV_LINES[3:]).encode(), 6),
    "csv_fewer_fields": ("a.csv", "".join(CSV_LINES[:3] + ["Q,a\n"] + CSV_LINES[3:]).encode(), 6),
    "csv_non_utf8": ("a.csv", CSV_TEXT.encode().replace(b"fact 2", b"fact \xe9"), None),
    "csv_duplicate_header": ("a.csv", CSV_TEXT.replace("rejected", "chosen", 1).encode(), None),
    "parquet_empty": ("a.parquet", b"", None),
    "parquet_garbage": ("a.parquet", b"PAR1" + b"\x00garbage" * 100 + b"PAR1", None),
    "parquet_truncated": ("a.parquet", parquet_bytes()[:3000], None),
    "parquet_jsonl_inside": ("a.parquet", jsonl(GOOD_LINES[0]), None),
    "gz_not_gzip": ("a.jsonl.gz", jsonl(GOOD_LINES[0]), None),
    "gz_truncated": ("a.jsonl.gz", gzip.compress(MANY_LINES)[:-200], None),
    "gz_corrupt_middle": ("a.jsonl.gz", _gz_corrupt_middle(), None),
    "gz_empty": ("a.jsonl.gz", b"", None),
    "gz_csv_truncated": ("a.csv.gz", gzip.compress(CSV_TEXT.encode() * 50)[:-100], None),
    "gz_array_truncated": ("a.json.gz", gzip.compress(json_array(",\n") * 1)[:-20], None),
    "bz2_not_bz2": ("a.jsonl.bz2", jsonl(GOOD_LINES[0]), None),
    "bz2_truncated": ("a.jsonl.bz2", bz2.compress(MANY_LINES)[:-50], None),
    "xz_truncated": ("a.jsonl.xz", lzma.compress(MANY_LINES)[:-50], None),
    "save_to_disk_truncated": ("saved", None, None),
}


def test_the_corpus_is_large():
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_a_malformed_input_is_a_clear_error_or_a_counted_drop(tmp_path, name):
    file_name, content, records = CORPUS[name]
    path = tmp_path / file_name
    if content is None:
        _saved_truncated(path)
    else:
        path.write_bytes(content)
    message = raises(tmp_path, path, "error")  # any other exception fails the test
    assert message.startswith(str(path)), message
    assert "Traceback" not in message
    if records is None:
        message = raises(tmp_path, path, "drop")
        assert message.startswith(str(path)), message
        return
    report = run(tmp_path, path, "drop")
    assert report["rows_read"] == records == sum(report["rows_written"].values()) + report["rows_dropped"]
    assert report["rows_dropped"] == len(dropped(tmp_path, report)) >= 1
