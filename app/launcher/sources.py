"""Where a job's IDs come from: a file, stdin, S3, or an integer range.

Readers stream: they hold one block of the input at a time, so the launcher's
memory does not grow with the number of IDs. Bad input stops with the source
and the line number, never with a half-sent job (files are checked in full
before the first batch is sent).
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import msgspec

from app.batch import UNENCODABLE, short_repr

FORMATS = ("text", "csv", "jsonl")
BLOCK = 1 << 20
_decode_json = msgspec.json.Decoder().decode
_encode_json = msgspec.json.Encoder().encode


class InputError(ValueError):
    """The IDs cannot be read; the message names the source and the line."""


@dataclass(frozen=True)
class Source:
    spec: str  # a path, "-" for stdin, s3://bucket/key, or range:START:STOP
    fmt: str  # "range" or one of FORMATS
    column: str | None = None
    field: str | None = None

    @classmethod
    def parse(
        cls, spec: str, fmt: str | None = None, column: str | None = None, field: str | None = None
    ) -> Source:
        if spec.startswith("range:"):
            _parse_range(spec)
            return cls(spec, "range")
        if fmt is None:
            suffix = Path(spec).suffix.lower()
            fmt = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(suffix, "text")
        if fmt not in FORMATS:
            raise InputError(f"unknown input format {fmt!r}; use one of {', '.join(FORMATS)}.")
        if fmt == "csv" and not column:
            raise InputError(f"{spec} is CSV: name the ID column with --column NAME.")
        if fmt == "jsonl" and not field:
            raise InputError(f"{spec} is JSON lines: name the ID field with --field NAME.")
        if spec not in ("-",) and not spec.startswith("s3://"):
            path = Path(spec)
            if not path.exists():
                raise InputError(f"ID file {spec} does not exist.")
            if not path.is_file():
                raise InputError(f"ID source {spec} is not a file.")
            spec = str(path.resolve())
        return cls(spec, fmt, column if fmt == "csv" else None, field if fmt == "jsonl" else None)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Source:
        return cls(**meta)

    def as_meta(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def streamed(self) -> bool:
        """True when the input can be read only once (stdin)."""
        return self.spec == "-"

    def count(self) -> int | None:
        """The number of IDs, checking every line; None for stdin, which is read once."""
        if self.fmt == "range":
            start, stop = _parse_range(self.spec)
            return stop - start
        if self.streamed:
            return None
        if self.fmt == "text":
            with self._open() as fobj:
                n = sum(lines for _, _, lines in _text_chunks(fobj, self.spec))
        else:
            n = sum(len(block) for block in self._blocks())
        if n == 0:
            raise InputError(f"{self.spec} holds no IDs.")
        return n

    def batches(self, sizes: Iterator[int]) -> Iterator[list[Any] | dict[str, Any]]:
        """Payloads of successive batches, the n-th of next(sizes) IDs (the last may be short).

        A payload is app.batch's wire form: {"range": [start, stop]} for a
        range, {"lines": "id\\nid..."} for a text file, else a list of IDs.
        """
        if self.fmt == "range":
            start, stop = _parse_range(self.spec)
            while start < stop:
                end = min(stop, start + next(sizes))
                yield {"range": [start, end]}
                start = end
            return
        if self.fmt == "text":
            # Lines travel as one string per batch (app.batch.pack's wire
            # form): cut it from the checked text, never split into IDs here.
            fobj = self._open()
            try:
                yield from _line_batches(_text_chunks(fobj, self._name), sizes)
            finally:
                if fobj is not sys.stdin.buffer:
                    fobj.close()
            return
        yield from _regroup(self._blocks(), sizes)

    @property
    def _name(self) -> str:
        return "stdin" if self.spec == "-" else self.spec

    # -- readers ----------------------------------------------------------

    def _open(self) -> IO[bytes]:
        if self.spec == "-":
            return sys.stdin.buffer
        if self.spec.startswith("s3://"):
            return _open_s3(self.spec)
        try:
            return open(self.spec, "rb")
        except OSError as exc:
            raise InputError(f"cannot read {self.spec}: {exc.strerror}.") from None

    def _blocks(self) -> Iterator[list[Any]]:
        """Lists of IDs, for the JSON lines and CSV formats."""
        name = self._name
        fobj = self._open()
        try:
            if self.fmt == "jsonl":
                yield from _jsonl_blocks(_text_blocks(fobj, name), name, self.field or "")
            else:
                yield from _csv_blocks(fobj, name, self.column or "")
        finally:
            if fobj is not sys.stdin.buffer:
                fobj.close()


JSON_HINT = (
    "items, arguments and results travel as JSON: str, int, float, bool, None, and lists "
    "and dicts of them (a tuple arrives as a list)"
)


def check_json(
    chunk: list[Any], first: int, error: type[Exception] = InputError, where: str = ""
) -> None:
    """`error` naming the first item of `chunk` (item number `first` on) not JSON."""
    try:
        _encode_json(chunk)
        return
    except UNENCODABLE:
        pass
    for n, item in enumerate(chunk, first):
        try:
            _encode_json(item)
        except UNENCODABLE as exc:
            raise error(
                f"item {n}{where} ({short_repr(item)}) cannot be sent to the fleet: {exc}; "
                f"{JSON_HINT}."
            ) from None


def _parse_range(spec: str) -> tuple[int, int]:
    parts = spec.split(":")[1:]
    try:
        if len(parts) == 1:
            start, stop = 0, int(parts[0])
        elif len(parts) == 2:
            start, stop = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise InputError(
            f"bad range {spec!r}: write range:STOP or range:START:STOP with whole numbers."
        ) from None
    if stop <= start:
        raise InputError(f"range {spec!r} is empty: STOP must be greater than START.")
    return start, stop


def _regroup(blocks: Iterable[list[Any]], sizes: Iterator[int]) -> Iterator[list[Any]]:
    batch: list[Any] = []
    need = next(sizes)
    for block in blocks:
        pos = 0
        while pos < len(block):
            take = block[pos : pos + need - len(batch)]
            batch.extend(take)
            pos += len(take)
            if len(batch) == need:
                yield batch
                batch = []
                need = next(sizes)
    if batch:
        yield batch


def _line_batches(
    chunks: Iterable[tuple[str, int, int]], sizes: Iterator[int]
) -> Iterator[dict[str, str]]:
    """{"lines": ...} payloads of next(sizes) lines each, cut from checked text chunks."""
    parts: list[str] = []
    have, need = 0, next(sizes)
    for text, _, n in chunks:
        pos, left = 0, n  # the unread part of text, and its number of lines
        while left:
            take = need - have
            if take >= left:
                parts.append(text[pos:] if pos else text)
                have, left = have + left, 0
            else:
                end = _nth_newline(text, pos, take)
                parts.append(text[pos:end])
                have, left, pos = need, left - take, end + 1
            if have == need:
                yield {"lines": "\n".join(parts)}
                parts, have, need = [], 0, next(sizes)
    if parts:
        yield {"lines": "\n".join(parts)}


def _nth_newline(text: str, pos: int, k: int) -> int:
    """The index of the k-th "\\n" at or after `pos` (there are at least k).

    Counting (C speed) over a stretch sized from the mean line length skips
    most of the way; find() walks the last few lines.
    """
    sampled = text.count("\n", pos, pos + 4096)
    mean = min(4096, len(text) - pos) / sampled if sampled else 4096.0
    while k > 16:
        probe = min(len(text), pos + max(1, int(k * mean * 0.9)))
        seen = text.count("\n", pos, probe)
        if seen >= k:  # the guess overshot: shorter lines here than sampled
            mean /= 2
            continue
        pos, k = probe, k - seen
    end = pos - 1
    for _ in range(k):
        end = text.index("\n", end + 1)
    return end


def _text_chunks(fobj: IO[bytes], name: str) -> Iterator[tuple[str, int, int]]:
    """Checked text of whole lines: (text without the last line end, first line number, lines)."""
    line_no = 1
    tail = b""
    first = True
    while True:
        chunk = fobj.read(BLOCK)
        if not chunk:
            break
        data = tail + chunk
        # A UTF-8 byte order mark; a short first read may hold only part of it.
        if first and (len(data) >= 3 or b"\n" in data):
            data = data.removeprefix(b"\xef\xbb\xbf")
            first = False
        cut = data.rfind(b"\n")
        if cut < 0:
            tail = data
            continue
        tail = data[cut + 1 :]
        text, n = _check(data[:cut], name, line_no)
        yield text, line_no, n
        line_no += n
    if tail:
        text, n = _check(tail, name, line_no)
        yield text, line_no, n


def _text_blocks(fobj: IO[bytes], name: str) -> Iterator[tuple[list[str], int]]:
    """Lists of lines (without line ends), each with the line number of its first line."""
    for text, line_no, _ in _text_chunks(fobj, name):
        yield text.split("\n"), line_no


def _check(data: bytes, name: str, line_no: int) -> tuple[str, int]:
    """The block decoded, with CRLF folded, and its number of lines; InputError if it is bad."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = line_no + data.count(b"\n", 0, exc.start)
        raise InputError(f"{name}, line {bad}: not valid UTF-8 text.") from None
    if "\r" in text:
        text = text.replace("\r\n", "\n")
        # The caller cut the block at its last "\n", so a CRLF there left a "\r".
        if text.endswith("\r"):
            text = text[:-1]
    # An empty line: found by substring search, the line number only when there is one.
    if not text or text[0] == "\n" or text[-1] == "\n" or "\n\n" in text:
        bad = line_no + text.split("\n").index("")
        raise InputError(f"{name}, line {bad}: empty line; every line must hold one ID.")
    return text, text.count("\n") + 1


def _jsonl_blocks(
    lines: Iterable[tuple[list[str], int]], name: str, field: str
) -> Iterator[list[Any]]:
    for block, line_no in lines:
        ids = []
        for offset, line in enumerate(block):
            try:
                record = _decode_json(line)
            except msgspec.DecodeError as exc:
                raise InputError(f"{name}, line {line_no + offset}: not JSON ({exc}).") from None
            ids.append(_id_from(record, field, f"{name}, line {line_no + offset}", "field"))
        yield ids


def _csv_blocks(fobj: IO[bytes], name: str, column: str) -> Iterator[list[Any]]:
    text = io.TextIOWrapper(fobj, encoding="utf-8-sig", newline="")
    reader = csv.DictReader(text)
    try:
        header = reader.fieldnames
    except UnicodeDecodeError:
        raise InputError(f"{name}, line 1: not valid UTF-8 text.") from None
    except csv.Error as exc:
        raise InputError(f"{name}, line 1: {exc}.") from None
    if not header:
        raise InputError(f"{name} is empty: expected a header line naming column {column!r}.")
    if column not in header:
        raise InputError(f"{name} has no column {column!r}; its columns are: {', '.join(header)}.")
    ids: list[Any] = []
    try:
        for row in reader:
            ids.append(_id_from(row, column, f"{name}, line {reader.line_num}", "column"))
            if len(ids) >= 10_000:
                yield ids
                ids = []
    except UnicodeDecodeError:
        raise InputError(
            f"{name}, near line {reader.line_num + 1}: not valid UTF-8 text."
        ) from None
    except csv.Error as exc:
        raise InputError(f"{name}, line {reader.line_num}: {exc}.") from None
    finally:
        text.detach()
    if ids:
        yield ids


def _id_from(record: Any, key: str, where: str, what: str) -> Any:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected an object with {what} {key!r}.")
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, str | int):
        got = "nothing" if value is None else type(value).__name__
        raise InputError(f"{where}: {what} {key!r} must be a string or an integer, got {got}.")
    if value == "":
        raise InputError(f"{where}: {what} {key!r} is empty.")
    return value


def _open_s3(url: str) -> IO[bytes]:
    import boto3  # only S3 sources need it

    bucket, _, key = url.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise InputError(f"bad S3 source {url!r}: write s3://BUCKET/KEY.")
    try:
        body: IO[bytes] = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"]
        return body
    except Exception as exc:
        raise InputError(f"cannot read {url}: {exc}") from None
