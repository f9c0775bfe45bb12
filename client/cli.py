"""``filterserve score``: JSONL articles in, the same objects plus one result object per filter out.

Every input line ends up, in input order, either in the output (scored by every filter) or in the
errors file (with its line number and the reason); blank lines are skipped. Both files are
flushed line by line, so a crash loses nothing already written, and ``--resume`` continues a
partial output where it stopped: it counts the complete lines of the output (a torn last line is
cut), skips as many input lines (and the failed ones the errors file lists before them), checks
that the last written line is the input line it should be, and scores the rest.

Exit codes: 0 every line scored; 1 some lines failed (listed in the errors file); 2 usage or
server error; 3 the output or errors file cannot be written (checked before scoring, and on
every write: a full disk stops the run); 130 interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, BinaryIO

from tqdm import tqdm

from filterserve.client.multi import MultiFilterClient
from filterserve.client.results import SCHEMAS, FilterResult, ScoreError
from filterserve.errors import FilterServeError

EXIT_OK, EXIT_FAILED_LINES, EXIT_USAGE, EXIT_IO, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = (
    "exit codes: 0 every line scored; 1 some lines failed (see the errors file); 2 usage or server error; "
    "3 the output or errors file cannot be written; 130 interrupted (the output holds every finished line)"
)


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXIT_CODES
    parser.add_argument("input", nargs="?", default="-", help="JSONL file with title and content per line; - for stdin")
    parser.add_argument("--url", required=True, help="server address HOST:PORT, or several comma-separated "
                        "(each article goes to the least busy one; a server that dies is failed over)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="default: grpc")
    parser.add_argument(
        "--filter", "--model", dest="filters",
        help="comma-separated filters to score with (default: every filter the server serves)",
    )
    parser.add_argument("--output", "-o", help="where scored lines go (default: stdout)")
    parser.add_argument(
        "--errors",
        help="where failed lines go (default: <OUTPUT>.errors.jsonl, else <INPUT>.errors.jsonl; "
        "reading stdin and writing stdout: stderr only)",
    )
    parser.add_argument("--resume", action="store_true", help="continue a partial --output (needs --output FILE)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at once, per filter (default: 16)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default: 30)")
    parser.add_argument("--retries", type=int, default=3, help="retries while the server is unreachable (default: 3)")
    parser.add_argument(
        "--schema", choices=SCHEMAS, default="filterserve",
        help="the object written under each filter's name: filterserve's (raw and final scores, tier, tokens; default), "
        "or production: exactly the production scorer's fields (scores calibrated and clamped, weighted_average, tier, "
        "tier_description, gatekeeper_applied, and raw_weighted_average where the filter normalizes)",
    )


class OutputError(FilterServeError):
    """The output or the errors file cannot be written."""


@dataclass(frozen=True)
class Line:
    """One non-blank input line: its record, or why it cannot be scored."""

    number: int
    raw: str
    record: dict[str, Any] | None
    error: str | None = None


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_line(number: int, raw_bytes: bytes) -> Line | None:
    """``None`` for a blank line; NaN and Infinity are refused here, so they never reach the output."""
    raw = raw_bytes.decode("utf-8", errors="replace").rstrip("\r\n")
    if not raw.strip():
        return None
    try:
        record = json.loads(raw_bytes, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        return Line(number, raw, None, f"bad JSON: {exc}")
    if not isinstance(record, dict):
        return Line(number, raw, None, f"bad input: expected a JSON object, got {type(record).__name__}")
    return Line(number, raw, record)


def line_failure(results: dict[str, FilterResult | ScoreError]) -> str | None:
    """Why a line cannot be written, or None; a reason every filter shares (a bad input) is said once."""
    reasons = {name: r.message for name, r in results.items() if isinstance(r, ScoreError)}
    if not reasons:
        return None
    if len(reasons) == len(results) and len(set(reasons.values())) == 1:
        return next(iter(reasons.values()))
    return "; ".join(f"{name}: {reason}" for name, reason in reasons.items())


def _open(path: Path, mode: str, what: str) -> IO[str]:
    try:
        return open(path, mode, encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write the {what} {path}: {exc.strerror or exc}") from None


class Sink:
    """The output and errors streams, written in input order, one flushed line at a time."""

    def __init__(self, out: IO[str], out_name: str, errors: IO[str] | None, errors_name: str | None) -> None:
        self.out, self.out_name, self.errors, self.errors_name = out, out_name, errors, errors_name
        self.scored = self.failed = 0
        self.last_line = 0  # the last input line written to either stream

    def _write(self, stream: IO[str], name: str, line: str) -> None:
        try:
            stream.write(line)
            stream.flush()
        except OSError as exc:
            raise OutputError(f"cannot write {name}: {exc.strerror or exc} (input lines 1–{self.last_line} are done)") from None

    def scored_line(self, number: int, record: dict[str, Any]) -> None:
        self._write(self.out, self.out_name, json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
        self.scored += 1
        self.last_line = number

    def failed_line(self, number: int, message: str, raw: str) -> None:
        tqdm.write(f"line {number}: {message}", file=sys.stderr)
        if self.errors is not None:
            entry = {"line": number, "error": message, "input": raw}
            self._write(self.errors, self.errors_name or "", json.dumps(entry, ensure_ascii=False) + "\n")
        self.failed += 1
        self.last_line = number

    def flush(self) -> None:
        for stream in (self.out, self.errors):
            if stream is not None:
                try:
                    stream.flush()
                except OSError:
                    pass


@dataclass(frozen=True)
class ResumePoint:
    """Where a partial run stopped: output and errors are cut back to what lines ``< start`` produced."""

    start: int  # the first input line to score
    output_bytes: int
    errors_bytes: int
    scored: int
    failed: int


def _complete_lines(path: Path) -> tuple[list[bytes], int]:
    """The lines that end in a newline, and their byte length: a line torn by a kill is not one."""
    if not path.is_file():
        return [], 0
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    return complete.splitlines(keepends=True), len(complete)


def find_resume_point(lines: Iterator[tuple[int, bytes]], output: Path, errors: Path | None, filters: set[str]) -> ResumePoint:
    """Reads ``lines`` up to the last line the output holds; refuses an output that is not this input's."""
    written, output_bytes = _complete_lines(output)
    entries, _ = _complete_lines(errors) if errors is not None else ([], 0)
    failed_lines = []
    for raw in entries:
        try:
            failed_lines.append(int(json.loads(raw)["line"]))
        except (ValueError, KeyError, TypeError):
            raise FilterServeError(f"cannot resume: {errors} holds a line that is not an error entry: {raw[:80]!r}") from None
    failed = set(failed_lines)
    last, count = 0, 0
    if written:
        for number, raw_bytes in lines:
            parsed = parse_line(number, raw_bytes)
            if parsed is None or number in failed:
                continue
            count += 1
            if count == len(written):
                last = number
                break
        if count < len(written):
            raise FilterServeError(
                f"cannot resume: {output} holds {len(written)} scored lines, more than the input can have produced"
            )
        try:
            tail = json.loads(written[-1])
        except ValueError:
            raise FilterServeError(f"cannot resume: the last complete line of {output} is not JSON") from None
        if parsed.record is None or {k: v for k, v in tail.items() if k not in filters} != parsed.record:
            raise FilterServeError(
                f"cannot resume: the last line of {output} is not input line {last} scored; "
                "is it this input's output, with its errors file?"
            )
    kept = [raw for raw, line in zip(entries, failed_lines) if line < last + 1]
    return ResumePoint(last + 1, output_bytes, sum(len(raw) for raw in kept), count, len(kept))


def _cut(path: Path, size: int) -> None:
    try:
        with open(path, "r+b") as handle:
            handle.truncate(size)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def _count_lines(path: Path) -> int:
    """A quick pass first, so the progress bar can say how much is left."""
    with open(path, "rb") as stream:
        return sum(1 for _ in stream)


class Interrupt:
    """First Ctrl-C (or SIGTERM): read no more input and let the lines in flight finish and be written.
    A second: flush what is written and leave at once."""

    def __init__(self, sink: Sink, resume_hint: str) -> None:
        self.sink, self.resume_hint = sink, resume_hint
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupt:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            self.sink.flush()
            print(f"\nstopped at once: input lines 1–{self.sink.last_line} are written; {self.resume_hint}", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        self.requested = True
        tqdm.write("stopping: finishing the requests in flight (press Ctrl-C again to stop at once)", file=sys.stderr)


def _paths(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """(output, errors); None is stdout, and for errors stderr only."""
    from_stdin = args.input == "-"
    output = Path(args.output) if args.output and args.output != "-" else None
    if args.resume and output is None:
        raise FilterServeError("--resume continues a partial output file: give it with --output FILE")
    if output is not None and not from_stdin and output.exists() and output.resolve() == Path(args.input).resolve():
        raise FilterServeError(f"--output {output} is the input file")
    if args.errors:
        return output, Path(args.errors)
    if output is not None:
        return output, Path(f"{output}.errors.jsonl")
    return None, None if from_stdin else Path(f"{args.input}.errors.jsonl")


def _resume_hint(args: argparse.Namespace, output: Path | None) -> str:
    if output is None:
        return "write to a file with --output to be able to --resume"
    source = "-" if args.input == "-" else args.input
    return f"continue with: filterserve score {source} --output {output} --resume ..."


def score_command(args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        raise FilterServeError(f"--concurrency must be at least 1, got {args.concurrency}")
    from_stdin = args.input == "-"
    if not from_stdin and not Path(args.input).is_file():
        raise FilterServeError(f"input file not found: {args.input}")
    output, errors_path = _paths(args)
    filters = [f.strip() for f in args.filters.split(",") if f.strip()] if args.filters else None
    try:
        return _score(args, from_stdin, output, errors_path, filters)
    except OutputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_IO


def _score(args: argparse.Namespace, from_stdin: bool, output: Path | None, errors_path: Path | None, filters: list[str] | None) -> int:
    # Both files are opened (so proven writable) before anything is sent; --resume appends.
    mode = "a" if args.resume else "w"
    out = _open(output, mode, "output") if output is not None else sys.stdout
    errors = _open(errors_path, mode, "errors file") if errors_path is not None else None
    stream: BinaryIO = sys.stdin.buffer if from_stdin else open(args.input, "rb")
    try:
        with MultiFilterClient(args.url, args.protocol, filters, timeout_s=args.timeout, retries=args.retries) as client:
            lines = enumerate(stream, start=1)
            start = 1
            if args.resume:
                point = find_resume_point(lines, output, errors_path, set(client.names))
                _cut(output, point.output_bytes)
                if errors_path is not None:
                    _cut(errors_path, point.errors_bytes)
                start = point.start
                print(f"resuming at input line {start}: {point.scored} scored and {point.failed} failed lines kept", file=sys.stderr)
            sink = Sink(out, str(output or "stdout"), errors, str(errors_path) if errors_path else None)
            sink.last_line = start - 1
            total = None if from_stdin else _count_lines(Path(args.input))
            with tqdm(total=total, initial=start - 1, disable=from_stdin, unit="line", file=sys.stderr) as bar, \
                    Interrupt(sink, _resume_hint(args, output)) as interrupt:
                _run(client, lines, sink, bar, interrupt, args.concurrency, args.schema)
    finally:
        for handle in (stream, out if output is not None else None, errors):
            if handle is not None and handle is not sys.stdin.buffer:
                try:
                    handle.close()
                except OSError:
                    pass
    where = f", listed in {errors_path}" if errors_path is not None else " (reported above)"
    summary = f"scored {sink.scored} lines; {sink.failed} failed{where if sink.failed else ''}"
    if interrupt.requested:
        print(f"interrupted: input lines 1–{sink.last_line} are written ({summary}); {_resume_hint(args, output)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if errors_path is not None and not sink.failed:
        summary += f" ({errors_path} is empty)"
    print(summary, file=sys.stderr)
    return EXIT_FAILED_LINES if sink.failed else EXIT_OK


def _run(
    client: MultiFilterClient, lines: Iterator[tuple[int, bytes]], sink: Sink, bar: tqdm, interrupt: Interrupt, concurrency: int,
    schema: str,
) -> None:
    """Scores the valid lines; writes every line, failed ones included, in input order."""
    queue: deque[Line] = deque()

    def records() -> Iterator[dict[str, Any]]:
        for number, raw_bytes in lines:
            if interrupt.requested:
                return
            line = parse_line(number, raw_bytes)
            if line is None:
                bar.update()
                continue
            queue.append(line)
            if line.record is not None:
                yield line.record

    def write_failed_before_next_record() -> None:
        while queue and queue[0].record is None:
            line = queue.popleft()
            sink.failed_line(line.number, line.error or "", line.raw)
            bar.update()

    for results in client.score_iter(records(), concurrency):
        write_failed_before_next_record()
        line = queue.popleft()
        bar.update()
        failure = line_failure(results)
        if failure:
            sink.failed_line(line.number, failure, line.raw)
            continue
        # Namespaced by filter: input fields (labels named like dimensions) stay as they were.
        sink.scored_line(line.number, {**(line.record or {}), **{name: r.as_dict(schema) for name, r in results.items()}})
    write_failed_before_next_record()
