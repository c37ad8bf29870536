"""ID sources: streaming readers that name the line of any bad input."""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.batch import expand
from app.launcher import sources
from app.launcher.plan import BatchPlan
from app.launcher.sources import InputError, Source


def payloads(src: Source, sizes=None) -> list:
    """The batches as they go on the wire."""
    return list(src.batches(iter(sizes) if sizes is not None else BatchPlan((), 1000).sizes()))


def read_all(src: Source, sizes=None) -> list[list]:
    """Each batch's IDs, whatever its wire form."""
    return [list(expand(b)) for b in payloads(src, sizes)]


def flat(batches) -> list:
    return [i for b in batches for i in expand(b)]


def text_file(tmp_path: Path, data: bytes, name: str = "ids.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def input_error(fn, *args) -> str:
    with pytest.raises(InputError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def ids_of(path: Path, **kw) -> list:
    src = Source.parse(str(path), **kw)
    return flat(read_all(src))


# -- text ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"a\nb\nc\n",
        b"a\nb\nc",  # no newline after the last line
        b"a\r\nb\r\nc\r\n",  # CRLF
        b"a\r\nb\r\nc",
        b"\xef\xbb\xbfa\nb\nc\n",  # UTF-8 BOM
        b"\xef\xbb\xbfa\r\nb\r\nc",
    ],
)
def test_text_line_ends_bom_and_last_line(tmp_path, data):
    path = text_file(tmp_path, data)
    src = Source.parse(str(path))
    assert src.fmt == "text"
    assert flat(read_all(src)) == ["a", "b", "c"]
    assert src.count() == 3


def test_text_keeps_ids_verbatim(tmp_path):
    ids = ["  padded ", "ünïcödé", "with,comma", '{"json": 1}', "tab\tinside", "42"]
    path = text_file(tmp_path, ("\n".join(ids) + "\n").encode())
    assert ids_of(path) == ids


@pytest.mark.parametrize(
    "data, line",
    [
        (b"a\n\nb\n", 2),
        (b"\na\n", 1),
        (b"a\nb\n\n", 3),  # a trailing blank line
        (b"a\nb\n\n\n", 3),
        (b"a\r\n\r\nb\r\n", 2),
        (b"a\r\nb\r\n\r\n", 3),
        (b"a\r\nb\r\n\r", 3),
        (b"\r\n", 1),
        (b"\n", 1),
    ],
)
def test_empty_line_names_its_number(tmp_path, data, line):
    path = text_file(tmp_path, data)
    msg = input_error(Source.parse(str(path)).count)
    assert f"line {line}:" in msg
    assert "empty line" in msg
    assert str(path) in msg


@pytest.mark.parametrize(
    "data, line",
    [
        (b"ok\n\xff\xfe\nok\n", 2),
        (b"\xc3\n", 1),
        (b"a\nb\nc\nd\xe2\x82", 4),  # truncated at the end, no final newline
        (b"a\r\nb\r\n\x80\r\n", 3),
    ],
)
def test_invalid_utf8_names_its_line(tmp_path, data, line):
    path = text_file(tmp_path, data)
    msg = input_error(Source.parse(str(path)).count)
    assert f"line {line}:" in msg
    assert "UTF-8" in msg


def test_error_line_numbers_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "BLOCK", 64)  # many blocks
    lines = [f"id-{i:05d}" for i in range(500)]
    lines[377] = ""
    path = text_file(tmp_path, ("\n".join(lines) + "\n").encode())
    assert "line 378:" in input_error(Source.parse(str(path)).count)
    lines[377] = "ok"
    lines[421] = "\udcff"  # written as a lone invalid byte below
    data = ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")
    path.write_bytes(data)
    assert "line 422:" in input_error(Source.parse(str(path)).count)


def test_empty_file(tmp_path):
    path = text_file(tmp_path, b"")
    msg = input_error(Source.parse(str(path)).count)
    assert "holds no IDs" in msg and str(path) in msg


def test_bom_only_file_is_empty(tmp_path):
    path = text_file(tmp_path, b"\xef\xbb\xbf")
    assert "holds no IDs" in input_error(Source.parse(str(path)).count)


def test_missing_file(tmp_path):
    msg = input_error(Source.parse, str(tmp_path / "nope.txt"))
    assert "does not exist" in msg and "nope.txt" in msg


def test_directory(tmp_path):
    msg = input_error(Source.parse, str(tmp_path))
    assert "is not a file" in msg


def test_file_removed_after_parse(tmp_path):
    path = text_file(tmp_path, b"a\n")
    src = Source.parse(str(path))
    path.unlink()
    msg = input_error(src.count)
    assert "cannot read" in msg and str(path) in msg


def test_parse_resolves_relative_paths(tmp_path, monkeypatch):
    text_file(tmp_path, b"x\n", "rel.txt")
    monkeypatch.chdir(tmp_path)
    src = Source.parse("rel.txt")
    assert Path(src.spec).is_absolute()
    monkeypatch.chdir("/")
    assert flat(read_all(src)) == ["x"]


def test_unknown_format(tmp_path):
    path = text_file(tmp_path, b"x\n")
    assert "unknown input format" in input_error(Source.parse, str(path), "xml")


def test_format_from_suffix(tmp_path):
    for name, fmt, kw in [
        ("a.csv", "csv", {"column": "id"}),
        ("a.jsonl", "jsonl", {"field": "id"}),
        ("a.NDJSON", "jsonl", {"field": "id"}),
        ("a.ids", "text", {}),
    ]:
        path = text_file(tmp_path, b"x\n", name)
        assert Source.parse(str(path), **kw).fmt == fmt


def test_meta_round_trip(tmp_path):
    path = text_file(tmp_path, b"id\n1\n", "x.csv")
    src = Source.parse(str(path), column="id")
    assert Source.from_meta(json.loads(json.dumps(src.as_meta()))) == src


def test_text_batches_travel_as_one_string_each(tmp_path):
    path = text_file(tmp_path, b"a\nb\r\nc\nd\n")
    assert payloads(Source.parse(str(path)), [1, 2, 5]) == [
        {"lines": "a"},
        {"lines": "b\nc"},
        {"lines": "d"},
    ]


def test_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"s1\r\ns2\ns3")))
    src = Source.parse("-")
    assert src.streamed and src.count() is None
    assert read_all(src, [2, 2]) == [["s1", "s2"], ["s3"]]


def test_stdin_jsonl(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"k": 5}\n{"k": "x"}\n')))
    assert flat(read_all(Source.parse("-", "jsonl", field="k"))) == [5, "x"]


# -- csv ----------------------------------------------------------------------


def write_csv(tmp_path: Path, rows: list[list[str]], name: str = "ids.csv", **kw) -> Path:
    path = tmp_path / name
    with open(path, "w", newline="", encoding=kw.pop("encoding", "utf-8")) as f:
        csv.writer(f, **kw).writerows(rows)
    return path


def test_csv_column(tmp_path):
    path = write_csv(tmp_path, [["name", "id"], ["x", "1"], ["y, quoted", "2"], ["z", "a b"]])
    src = Source.parse(str(path), column="id")
    assert flat(read_all(src)) == ["1", "2", "a b"]
    assert src.count() == 3


def test_csv_with_bom_and_crlf(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_bytes(b"\xef\xbb\xbfid,v\r\n1,a\r\n2,b\r\n")
    assert ids_of(path, column="id") == ["1", "2"]


def test_csv_needs_a_column(tmp_path):
    path = write_csv(tmp_path, [["id"], ["1"]])
    assert "--column" in input_error(Source.parse, str(path))


def test_csv_missing_column_lists_the_columns(tmp_path):
    path = write_csv(tmp_path, [["name", "user_id", "v"], ["x", "1", "2"]])
    msg = input_error(Source.parse(str(path), column="id").count)
    assert "no column 'id'" in msg
    assert "name, user_id, v" in msg


def test_csv_row_missing_the_value(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text("name,id\nx,1\ny,2\nz\nw,4\n")
    msg = input_error(Source.parse(str(path), column="id").count)
    assert "line 4:" in msg
    assert "'id'" in msg


def test_csv_empty_value(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text("id,name\n1,a\n,b\n")
    msg = input_error(Source.parse(str(path), column="id").count)
    assert "line 3:" in msg and "empty" in msg


def test_csv_line_numbers_count_multiline_fields(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text('id,note\n1,"two\nlines"\n,x\n')
    assert "line 4:" in input_error(Source.parse(str(path), column="id").count)


def test_csv_empty_file(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text("")
    msg = input_error(Source.parse(str(path), column="id").count)
    assert "empty" in msg and "'id'" in msg


def test_csv_header_only(tmp_path):
    path = write_csv(tmp_path, [["id"]])
    assert "holds no IDs" in input_error(Source.parse(str(path), column="id").count)


def test_csv_invalid_utf8(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_bytes(b"id\n1\n\xff\xfe\n")
    msg = input_error(Source.parse(str(path), column="id").count)
    assert "UTF-8" in msg


def test_csv_over_many_blocks(tmp_path):
    n = 25_003  # more than two of the reader's 10,000-row blocks
    path = write_csv(tmp_path, [["id"]] + [[str(i)] for i in range(n)])
    src = Source.parse(str(path), column="id")
    assert src.count() == n
    batches = read_all(src, itertools.chain([1, 1, 1], itertools.repeat(9_999)))
    assert [len(b) for b in batches] == [1, 1, 1, 9_999, 9_999, 5_002]
    assert flat(batches) == [str(i) for i in range(n)]


# -- jsonl --------------------------------------------------------------------


def test_jsonl_field(tmp_path):
    data = b'{"id": 1, "x": [1]}\n{"id": "a"}\r\n{"x": 0, "id": -5}'
    path = text_file(tmp_path, data, "ids.jsonl")
    src = Source.parse(str(path), field="id")
    assert flat(read_all(src)) == [1, "a", -5]
    assert src.count() == 3


def test_jsonl_needs_a_field(tmp_path):
    path = text_file(tmp_path, b'{"id": 1}\n', "ids.jsonl")
    assert "--field" in input_error(Source.parse, str(path))


def test_jsonl_malformed_line(tmp_path):
    path = text_file(tmp_path, b'{"id": 1}\n{"id": 2}\n{"id": 3\n{"id": 4}\n', "ids.jsonl")
    msg = input_error(Source.parse(str(path), field="id").count)
    assert "line 3:" in msg and "not JSON" in msg


@pytest.mark.parametrize(
    "line, words",
    [
        (b'{"id": [1, 2]}', ["must be a string or an integer", "list"]),
        (b'{"id": {"a": 1}}', ["dict"]),
        (b'{"id": 1.5}', ["float"]),
        (b'{"id": true}', ["bool"]),
        (b'{"id": null}', ["got nothing"]),
        (b'{"other": 1}', ["got nothing"]),
        (b'{"id": ""}', ["empty"]),
        (b"[1, 2]", ["expected an object"]),
        (b'"just a string"', ["expected an object"]),
    ],
)
def test_jsonl_bad_ids_name_the_line(tmp_path, line, words):
    path = text_file(tmp_path, b'{"id": 1}\n' + line + b'\n{"id": 3}\n', "ids.jsonl")
    msg = input_error(Source.parse(str(path), field="id").count)
    assert "line 2:" in msg and "'id'" in msg
    for word in words:
        assert word in msg


def test_jsonl_empty_line(tmp_path):
    path = text_file(tmp_path, b'{"id": 1}\n\n{"id": 3}\n', "ids.jsonl")
    assert "line 2:" in input_error(Source.parse(str(path), field="id").count)


# -- range --------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, bounds",
    [
        ("range:10", (0, 10)),
        ("range:5:8", (5, 8)),
        ("range:-3:2", (-3, 2)),
        ("range:0:1", (0, 1)),
        ("range: 2 : 4 ", (2, 4)),
    ],
)
def test_range(spec, bounds):
    src = Source.parse(spec)
    assert src.fmt == "range"
    assert src.count() == bounds[1] - bounds[0]
    batches = payloads(src, itertools.repeat(3))
    assert all(set(b) == {"range"} for b in batches)
    assert flat(range(*b["range"]) for b in batches) == list(range(*bounds))


def test_range_batches_follow_the_sizes():
    src = Source.parse("range:0:10")
    assert payloads(src, BatchPlan((1, 1, 1), 4).sizes()) == [
        {"range": [0, 1]},
        {"range": [1, 2]},
        {"range": [2, 3]},
        {"range": [3, 7]},
        {"range": [7, 10]},
    ]


@pytest.mark.parametrize(
    "spec, words",
    [
        ("range:", ["bad range"]),
        ("range:x", ["bad range", "range:START:STOP"]),
        ("range:1:2:3", ["bad range"]),
        ("range:1.5", ["bad range"]),
        ("range:a:9", ["bad range"]),
        ("range:0", ["is empty"]),
        ("range:5:5", ["is empty"]),
        ("range:9:3", ["is empty"]),
    ],
)
def test_range_errors(spec, words):
    msg = input_error(Source.parse, spec)
    for word in words:
        assert word in msg
    assert repr(spec) in msg


# -- batches across 1 MiB blocks -------------------------------------------------


@pytest.fixture(scope="module")
def big_text(tmp_path_factory) -> tuple[Path, list[str]]:
    # ~2.6 MiB: three 1 MiB blocks, with lines of varying length so block
    # boundaries fall mid-line.
    ids = [f"{i}-{'x' * (i % 17)}" for i in range(200_000)]
    path = tmp_path_factory.mktemp("big") / "ids.txt"
    path.write_bytes(("\n".join(ids) + "\n").encode())
    assert path.stat().st_size > 2 * sources.BLOCK
    return path, ids


@pytest.mark.parametrize(
    "layout",
    [
        BatchPlan((1, 1, 1), 1000),
        BatchPlan((1, 1), 65_536),
        BatchPlan((), 7),
        BatchPlan((1,), 199_999),
        BatchPlan((), 1_000_000),
        BatchPlan((3, 5), 100_003),
    ],
)
def test_batches_across_block_boundaries(big_text, layout):
    path, ids = big_text
    src = Source.parse(str(path))
    batches = list(src.batches(layout.sizes()))
    sizes = layout.sizes()
    expected = [
        min(next(sizes), len(ids) - k)
        for k in itertools.accumulate([0] + [len(list(expand(b))) for b in batches[:-1]])
    ]
    assert [len(list(expand(b))) for b in batches] == expected
    assert flat(batches) == ids


def test_big_file_with_crlf_across_blocks(tmp_path):
    ids = [f"k{i:07d}" for i in range(130_000)]  # 1.1 MiB with CRLF
    path = text_file(tmp_path, ("\r\n".join(ids) + "\r\n").encode())
    src = Source.parse(str(path))
    assert src.count() == len(ids)
    assert flat(src.batches(BatchPlan((1, 1, 1), 50_000).sizes())) == ids


def test_one_line_longer_than_a_block(tmp_path):
    ids = ["short", "L" * (sources.BLOCK + 10), "end"]
    path = text_file(tmp_path, "\n".join(ids).encode())
    assert flat(read_all(Source.parse(str(path)), itertools.repeat(2))) == ids


def test_jsonl_line_numbers_across_real_blocks(tmp_path):
    lines = [json.dumps({"id": i, "pad": "p" * 40}) for i in range(40_000)]  # ~2.2 MiB
    lines[31_337] = '{"id": 31337, "pad": '
    path = text_file(tmp_path, ("\n".join(lines) + "\n").encode(), "ids.jsonl")
    assert "line 31338:" in input_error(Source.parse(str(path), field="id").count)


# -- properties -----------------------------------------------------------------

_id_text = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\n\r"),
    min_size=1,
    max_size=12,
).filter(lambda s: not re.fullmatch(r"[ \t\f\v]*", s) and not s.startswith("\ufeff"))

_layouts = st.builds(
    BatchPlan, st.lists(st.integers(1, 4), max_size=4).map(tuple), st.integers(1, 40)
)

_fast = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _round_trip(path: Path, fmt_kw: dict, layout: BatchPlan, block: int) -> list:
    old = sources.BLOCK
    sources.BLOCK = block  # small blocks put boundaries everywhere
    try:
        src = Source.parse(str(path), **fmt_kw)
        n = src.count()
        batches = list(src.batches(layout.sizes()))
    finally:
        sources.BLOCK = old
    sizes = layout.sizes()
    for b in batches[:-1]:
        assert len(list(expand(b))) == next(sizes)
    assert batches and 0 < len(list(expand(batches[-1]))) <= next(sizes)
    out = flat(batches)
    assert n == len(out)
    return out


@_fast
@given(
    ids=st.lists(_id_text, min_size=1, max_size=80),
    layout=_layouts,
    crlf=st.booleans(),
    final_newline=st.booleans(),
    bom=st.booleans(),
    block=st.sampled_from([1, 2, 5, 64, 1 << 20]),
)
def test_text_round_trip(tmp_path, ids, layout, crlf, final_newline, bom, block):
    eol = "\r\n" if crlf else "\n"
    data = eol.join(ids) + (eol if final_newline else "")
    path = tmp_path / "prop.txt"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data.encode())
    assert _round_trip(path, {}, layout, block) == ids


@_fast
@given(
    ids=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=80),
    layout=_layouts,
    block=st.sampled_from([1, 3, 64, 1 << 20]),
)
def test_jsonl_round_trip(tmp_path, ids, layout, block):
    path = tmp_path / "prop.jsonl"
    path.write_text("".join(json.dumps({"n": i % 3, "id": i}) + "\n" for i in ids))
    assert _round_trip(path, {"field": "id"}, layout, block) == ids


@_fast
@given(ids=st.lists(st.integers(-(10**30), 10**30), min_size=1, max_size=80), layout=_layouts)
def test_csv_round_trip(tmp_path, ids, layout):
    path = write_csv(tmp_path, [["other", "id"]] + [["x,y", str(i)] for i in ids], "prop.csv")
    assert _round_trip(path, {"column": "id"}, layout, 1 << 20) == [str(i) for i in ids]


@_fast
@given(start=st.integers(-1000, 1000), n=st.integers(1, 500), layout=_layouts)
def test_range_round_trip(start, n, layout):
    src = Source.parse(f"range:{start}:{start + n}")
    assert src.count() == n
    batches = list(src.batches(layout.sizes()))
    assert flat(range(*b["range"]) for b in batches) == list(range(start, start + n))


@_fast
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=400), data=st.data())
def test_nth_newline_finds_the_kth_line_end(lengths, data):
    # Mixed short and long lines make the mean-length guess overshoot and undershoot.
    text = "\n".join("x" * n for n in lengths) + "\n"
    ends = [i for i, c in enumerate(text) if c == "\n"]
    first = data.draw(st.integers(0, len(ends) - 1))
    pos = ends[first - 1] + 1 if first else 0
    k = data.draw(st.integers(1, len(ends) - first))
    assert sources._nth_newline(text, pos, k) == ends[first + k - 1]


@_fast
@given(
    total=st.integers(1, 5000),
    probe=st.lists(st.integers(1, 3), max_size=4),
    size=st.integers(1, 700),
    tail=st.integers(0, 6),
)
def test_layout_counts_the_batches_it_cuts(total, probe, size, tail):
    layout = BatchPlan(tuple(probe), size, total, tail)
    sizes = layout.sizes()
    cut, left = [], total
    while left > 0:
        cut.append(min(next(sizes), left))
        left -= cut[-1]
    assert layout.count() == len(cut)
    body = cut[len(probe) :]
    # Never larger than the batch size, and only the last wave is cut finer.
    assert all(n <= size for n in body)
    fine = [n for n in body if n < size]
    if tail:
        assert sum(fine) <= (tail + 1) * size
        assert all(n >= layout._floor() for n in fine[:-1])  # the last may be a remainder
    else:
        assert len(fine) <= 1


def test_last_wave_is_cut_finer():
    # 2 slots, batches of 500: the last wave shrinks instead of ending on two full batches.
    layout = BatchPlan((1, 1), 500, 4000, 2)
    sizes = list(itertools.islice(layout.sizes(), layout.count()))
    assert sum(sizes) == 4000 and sizes[:7] == [1, 1, 500, 500, 500, 500, 500]
    wave = sizes[7:]
    assert wave == sorted(wave, reverse=True) and wave[-1] <= 500 // 8
    # The two slots' last batches together are far less than one full batch.
    assert sum(wave[-2:]) < 500 // 4


def test_layout_kept_with_a_job_cuts_the_same_way_on_resume():
    layout = BatchPlan((1, 1), 500, 4000, 2)
    again = BatchPlan.from_meta(layout.as_meta(), 4000)
    n = layout.count()
    assert list(itertools.islice(again.sizes(), n)) == list(itertools.islice(layout.sizes(), n))
    # A job stored before the layout kept its share and floor was cut with 1/(2 x tail)
    # shares of no less than size/8: resumed, it is cut that way still.
    legacy = BatchPlan.from_meta({"probe": [1, 1], "size": 500, "tail": 2}, 4000)
    cut = list(itertools.islice(legacy.sizes(), legacy.count()))
    assert cut[7:11] == [375, 281, 211, 158] and min(cut[7:-1]) == 500 // 8
