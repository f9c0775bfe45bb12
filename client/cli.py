"""``filterserve score``: JSONL articles in, the same objects plus one result object per filter out.

Every input line ends up, in input order, either in the output (scored by every filter) or in the
errors file (with its line number and the reason); blank lines are skipped. Both files are
flushed line by line, so a crash loses nothing already written, and ``--resume`` continues a
partial output where it stopped: it counts the complete lines of the output (a torn last line is
cut), skips as many input lines (and the failed ones the errors file lists before them), checks
that the last written line is the input line it should be, and scores the rest; the earlier run's
failed lines are kept, and counted in the report and the exit code.

A file is written only when it says something: the output once the server has answered, the
errors file at the first failed line.

Exit codes: 0 every line scored; 1 some lines failed (listed in the errors file, by this run or the one resumed); 2 usage or
server error; 3 the output or errors file cannot be written (checked before scoring, and on
every write: a full disk stops the run); 130 interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, BinaryIO

from tqdm import tqdm  # type: ignore[import-untyped]

from filterserve import defaults
from filterserve.client.endpoint import PROTOCOLS, Protocol
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
    parser.add_argument("--url", required=True, help="server address HOST[:PORT], or several comma-separated (each article "
                        "goes to the least busy one; a server that dies is failed over); http:// or grpc:// picks the "
                        f"protocol; without a port, {defaults.PORTS['grpc']} for gRPC and {defaults.PORTS['http']} for HTTP")
    parser.add_argument("--protocol", choices=PROTOCOLS,
                        help=f"default: the URL's scheme, else {defaults.PROTOCOL}")
    parser.add_argument(
        "--filter", "--model", dest="filters",
        help="comma-separated filters to score with (default: every filter the server serves)",
    )
    parser.add_argument("--output", "-o", help="where scored lines go (default: stdout)")
    parser.add_argument(
        "--errors",
        help="where failed lines go, written only if a line fails (default: <OUTPUT>.errors.jsonl, else "
        "<INPUT>.errors.jsonl; reading stdin and writing stdout: stderr only)",
    )
    parser.add_argument("--resume", action="store_true", help="continue a partial --output (needs --output FILE)")
    parser.add_argument("--concurrency", type=int, default=defaults.CONCURRENCY, help="requests in flight at once, per filter")
    parser.add_argument("--timeout", type=float, default=defaults.TIMEOUT_S, help="seconds per request")
    parser.add_argument("--retries", type=int, default=defaults.RETRIES, help="retries while the server is unreachable")
    parser.add_argument(
        "--schema", choices=SCHEMAS, default=defaults.SCHEMA,
        help="the object written under each filter's name: filterserve's (raw and final scores, tier, tokens, the stamps), "
        "or production: exactly the production scorer's dict, in its order (passed_prefilter, prefilter_reason, scores "
        "calibrated and clamped, weighted_average, tier, tier_description, gatekeeper_applied, content_length, "
        "short_content_cap_applied, stage_used, stage1_estimate, raw_weighted_average, normalization_method, version)",
    )


@dataclass(frozen=True)
class ScoreOptions:
    """``filterserve score``'s options, checked once: what the code below the parser takes whole."""

    input: Path | None  # None: stdin
    url: str
    protocol: Protocol | None  # None: the URL's scheme says, else defaults.PROTOCOL
    filters: tuple[str, ...] | None  # None: every served filter
    output: Path | None  # None: stdout
    errors: Path | None  # None: stderr only
    resume: bool = False
    concurrency: int = defaults.CONCURRENCY
    timeout_s: float = defaults.TIMEOUT_S
    retries: int = defaults.RETRIES
    schema: str = defaults.SCHEMA

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ScoreOptions:
        if args.concurrency < 1:
            raise FilterServeError(f"--concurrency must be at least 1, got {args.concurrency}")
        source = None if args.input == "-" else Path(args.input)
        if source is not None and source.is_dir():
            raise FilterServeError(f"the input {source} is a folder: give a JSONL file (or - for stdin)")
        if source is not None and not source.is_file():
            raise FilterServeError(f"input file not found: {source}")
        output = Path(args.output) if args.output and args.output != "-" else None
        if args.resume and output is None:
            raise FilterServeError("--resume continues a partial output file: give it with --output FILE")
        if output is not None and source is not None and output.exists() and output.resolve() == source.resolve():
            raise FilterServeError(f"--output {output} is the input file")
        if args.errors:
            errors: Path | None = Path(args.errors)
        elif output is not None:
            errors = Path(f"{output}.errors.jsonl")
        else:
            errors = None if source is None else Path(f"{source}.errors.jsonl")
        filters = tuple(f.strip() for f in args.filters.split(",") if f.strip()) if args.filters else None
        return cls(source, args.url, args.protocol, filters or None, output, errors, args.resume, args.concurrency,
                   args.timeout, args.retries, args.schema)

    def resume_hint(self, filters: list[str]) -> str:
        """The command that continues this run, runnable as printed: every option that matters, quoted."""
        if self.output is None:
            return "write to a file with --output to be able to --resume"
        words = ["filterserve", "score", str(self.input or "-"), "--output", str(self.output), "--resume", "--url", self.url]
        if self.protocol is not None:
            words += ["--protocol", self.protocol]
        words += ["--filter", ",".join(filters)]  # the filters this output holds, even if the server's change
        if self.errors != Path(f"{self.output}.errors.jsonl"):
            words += ["--errors", str(self.errors)]
        for option, value, default in (("--concurrency", self.concurrency, defaults.CONCURRENCY),
                                       ("--timeout", self.timeout_s, defaults.TIMEOUT_S),
                                       ("--retries", self.retries, defaults.RETRIES), ("--schema", self.schema, defaults.SCHEMA)):
            if value != default:
                words += [option, f"{value:g}" if isinstance(value, float) else str(value)]
        if self.input is None:
            return f"continue, with the same input on stdin, with: {shlex.join(words)}"
        return f"continue with: {shlex.join(words)}"


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


def _check_writable(path: Path, what: str) -> None:
    """Refuses a file that cannot be written, before anything is sent, without creating it."""
    folder = path.parent
    if path.is_dir():
        reason = "Is a directory"
    elif not folder.is_dir():
        reason = "No such file or directory"
    elif not os.access(path if path.exists() else folder, os.W_OK):
        reason = "Permission denied"
    else:
        return
    raise OutputError(f"cannot write the {what} {path}: {reason}")


class Sink:
    """The output and errors streams, written in input order, one flushed line at a time.

    The errors file is opened on the first failed line: a run where nothing fails leaves none.
    ``kept_scored`` and ``kept_failed`` are the lines an earlier run wrote, which ``--resume`` keeps.
    """

    def __init__(self, out: IO[str], out_name: str, errors_path: Path | None, kept_scored: int = 0, kept_failed: int = 0) -> None:
        self.out, self.out_name, self.errors_path = out, out_name, errors_path
        self.errors: IO[str] | None = None
        self.scored = self.failed = 0
        self.kept_scored, self.kept_failed = kept_scored, kept_failed
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
        if self.errors_path is not None:
            if self.errors is None:
                self.errors = _open(self.errors_path, "a", "errors file")
            entry = {"line": number, "error": message, "input": raw}
            self._write(self.errors, str(self.errors_path), json.dumps(entry, ensure_ascii=False) + "\n")
        self.failed += 1
        self.last_line = number

    def flush(self) -> None:
        for stream in (self.out, self.errors):
            if stream is not None:
                try:
                    stream.flush()
                except OSError:
                    pass

    def close(self) -> None:
        for stream in (self.out, self.errors):
            if stream is not None and stream is not sys.stdout:
                try:
                    stream.close()
                except OSError:
                    pass

    def summary(self) -> str:
        """What the output and the errors file hold now, an earlier run's lines (``--resume``) included."""
        failed = self.failed + self.kept_failed
        text = f"scored {self.scored} lines"
        if self.kept_scored or self.kept_failed:
            text += f" ({self.scored + self.kept_scored} in {self.out_name} with the earlier run's)"
        text += f"; {failed} failed"
        if failed:
            text += f", listed in {self.errors_path}" if self.errors_path is not None else " (reported above)"
        if self.kept_failed:
            text += f" ({self.kept_failed} of them by the earlier run)"
        return text


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
        reached: Line | None = None
        for number, raw_bytes in lines:
            parsed = parse_line(number, raw_bytes)
            if parsed is None or number in failed:
                continue
            count += 1
            if count == len(written):
                last, reached = number, parsed
                break
        if reached is None:
            raise FilterServeError(
                f"cannot resume: {output} holds {len(written)} scored lines, more than the input can have produced"
            )
        try:
            tail = json.loads(written[-1])
        except ValueError:
            raise FilterServeError(f"cannot resume: the last complete line of {output} is not JSON") from None
        if reached is None or reached.record is None or {k: v for k, v in tail.items() if k not in filters} != reached.record:
            raise FilterServeError(
                f"cannot resume: the last line of {output} is not input line {last} scored; "
                "is it this input's output, with its errors file?"
            )
    kept = [raw for raw, line in zip(entries, failed_lines) if line < last + 1]
    return ResumePoint(last + 1, output_bytes, sum(len(raw) for raw in kept), count, len(kept))


def _cut(path: Path, size: int) -> None:
    """Cuts a file back to ``size`` bytes; a file cut to nothing is removed (an empty file says nothing).

    Only a plain file: a device or a link (``--errors /dev/stderr``) is left as it is.
    """
    if path.is_symlink() or not path.is_file():
        return
    try:
        if size == 0:
            path.unlink()
            return
        with open(path, "r+b") as handle:
            handle.truncate(size)
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


def score_command(args: argparse.Namespace) -> int:
    options = ScoreOptions.from_args(args)
    try:
        return score(options)
    except OutputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_IO


def score(options: ScoreOptions) -> int:
    """Scores ``options.input``; files are written only once the server answered (see the module's docstring)."""
    # Proven writable before anything is sent, but neither created nor truncated yet: a run that
    # cannot reach the server leaves no file, and --resume never loses its output to a failed start.
    if options.output is not None:
        _check_writable(options.output, "output")
    if options.errors is not None:
        _check_writable(options.errors, "errors file")
    stream: BinaryIO = sys.stdin.buffer if options.input is None else open(options.input, "rb")
    sink: Sink | None = None
    try:
        with MultiFilterClient(options.url, options.protocol, list(options.filters) if options.filters else None,
                               timeout_s=options.timeout_s, retries=options.retries) as client:
            lines = enumerate(stream, start=1)
            sink = _open_sink(options, lines, set(client.names))
            total = None if options.input is None else _count_lines(options.input)
            hint = options.resume_hint(client.names)
            with tqdm(total=total, initial=sink.last_line, disable=options.input is None, unit="line", file=sys.stderr) as bar, \
                    Interrupt(sink, hint) as interrupt:
                _run(client, lines, sink, bar, interrupt, options.concurrency, options.schema)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
        if sink is not None:
            sink.close()
    if interrupt.requested:
        print(f"interrupted: input lines 1–{sink.last_line} are written ({sink.summary()}); {hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(sink.summary(), file=sys.stderr)
    return EXIT_FAILED_LINES if sink.failed + sink.kept_failed else EXIT_OK


def _open_sink(options: ScoreOptions, lines: Iterator[tuple[int, bytes]], filters: set[str]) -> Sink:
    """The output and errors file for this run: a fresh run replaces both, ``--resume`` cuts them to
    where the earlier run's complete lines end (and reads ``lines`` up to there)."""
    if not options.resume:
        if options.errors is not None:
            _cut(options.errors, 0)  # an earlier run's errors are not this run's
        out = _open(options.output, "w", "output") if options.output is not None else sys.stdout
        return Sink(out, str(options.output or "stdout"), options.errors)
    assert options.output is not None  # ScoreOptions refuses --resume without --output
    point = find_resume_point(lines, options.output, options.errors, filters)
    _cut(options.output, point.output_bytes)
    if options.errors is not None:
        _cut(options.errors, point.errors_bytes)
    print(f"resuming at input line {point.start}: {point.scored} scored and {point.failed} failed lines kept", file=sys.stderr)
    sink = Sink(_open(options.output, "a", "output"), str(options.output), options.errors, point.scored, point.failed)
    sink.last_line = point.start - 1
    return sink


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
        scored = {name: r.as_dict(schema) for name, r in results.items() if isinstance(r, FilterResult)}
        sink.scored_line(line.number, {**(line.record or {}), **scored})
    write_failed_before_next_record()
