"""``filterserve score``: JSONL articles in, the same objects plus one result object per filter out.

Every input line ends up either on stdout (scored) or in the error file (with its line number
and the reason), so a long run can be resumed from the error file alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from tqdm import tqdm

from filterserve.client.client import ScoreError
from filterserve.client.servers import connect
from filterserve.errors import FilterServeError

STDIN_ERRORS = "score-errors.jsonl"


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="?", default="-", help="JSONL file with title and content per line; - for stdin")
    parser.add_argument("--url", required=True, help="server address HOST:PORT, or several comma-separated "
                        "(each article goes to the least busy one; a server that dies is failed over)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="default: grpc")
    parser.add_argument("--model", help="ensemble to use; default: the only filter the server has")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at once (default: 16)")
    parser.add_argument(
        "--errors", help=f"where failed lines go (default: <FILE>.errors.jsonl, or {STDIN_ERRORS} for stdin)"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default: 30)")
    parser.add_argument("--retries", type=int, default=3, help="retries while the server is unreachable (default: 3)")


class _Run:
    """Writes results and failures as they come, so a crash loses nothing already scored."""

    def __init__(self, out: TextIO, errors: TextIO, bar: tqdm) -> None:
        self.out, self.errors, self.bar = out, errors, bar
        self.scored = 0
        self.failed = 0

    def fail(self, line: int, message: str, raw: str) -> None:
        self.failed += 1
        tqdm.write(f"line {line}: {message}", file=sys.stderr)
        self.errors.write(json.dumps({"line": line, "error": message, "input": raw}, ensure_ascii=False) + "\n")
        self.errors.flush()
        self.bar.update()

    def write(self, record: dict[str, Any]) -> None:
        self.scored += 1
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()
        self.bar.update()


def _articles(stream: BinaryIO, run: _Run, queued: deque[tuple[int, str, dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """Parses lines lazily; malformed ones are reported here, the rest are queued for scoring."""
    for number, raw_bytes in enumerate(stream, start=1):
        raw = raw_bytes.decode("utf-8", errors="replace").rstrip("\r\n")
        if not raw.strip():
            run.bar.update()  # blank lines hold no record
            continue
        try:
            record = json.loads(raw_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            run.fail(number, f"bad JSON: {exc}", raw)
            continue
        if not isinstance(record, dict):
            run.fail(number, f"bad input: expected a JSON object, got {type(record).__name__}", raw)
            continue
        queued.append((number, raw, record))
        yield record


def _count_lines(path: Path) -> int:
    """A quick pass first, so the progress bar can say how much is left."""
    with open(path, "rb") as stream:
        return sum(1 for _ in stream)


def score_command(args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        raise FilterServeError(f"--concurrency must be at least 1, got {args.concurrency}")
    from_stdin = args.input == "-"
    if not from_stdin and not Path(args.input).is_file():
        raise FilterServeError(f"input file not found: {args.input}")
    errors_path = Path(args.errors or (STDIN_ERRORS if from_stdin else f"{args.input}.errors.jsonl"))

    with connect(args.url, args.protocol, args.model, timeout_s=args.timeout, retries=args.retries) as client:
        with (
            (sys.stdin.buffer if from_stdin else open(args.input, "rb")) as stream,
            open(errors_path, "w", encoding="utf-8") as errors,
        ):
            total = None if from_stdin else _count_lines(Path(args.input))
            with tqdm(total=total, disable=from_stdin, unit="line", file=sys.stderr) as bar:
                run = _Run(sys.stdout, errors, bar)
                queued: deque[tuple[int, str, dict[str, Any]]] = deque()
                for result in client.score_iter(_articles(stream, run, queued), args.concurrency):
                    number, raw, record = queued.popleft()
                    if isinstance(result, ScoreError):
                        run.fail(number, result.message, raw)
                    else:
                        # Namespaced by filter: input fields (labels named like dimensions) stay as they were.
                        run.write({**record, client.spec.name: result.as_dict()})

    if not run.failed:
        errors_path.unlink()  # an empty error file would only suggest that something failed
        print(f"scored {run.scored} lines", file=sys.stderr)
        return 0
    print(f"scored {run.scored} lines; {run.failed} failed, listed in {errors_path}", file=sys.stderr)
    return 1
