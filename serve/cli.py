"""``filterserve serve``: the server in the foreground, supervised, until Ctrl-C or SIGTERM.

Exit codes: 0 after a stop by signal (requests in flight drained), 2 for a user error (bad
repository, port in use), 3 when tritonserver kept dying past the restart limit, 130 for Ctrl-C
during start-up.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from filterserve.serve.health import EXIT_GAVE_UP, ServerGaveUp
from filterserve.serve.server import TritonServer


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repository", required=True, type=Path, help="repository written by `filterserve export`")
    # Triton's own defaults, so existing clients and dashboards find it; 0 picks a free port.
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port (0: a free one)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (0: a free one)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (0: a free one)")
    parser.add_argument(
        "--supervisor-port", type=int, default=8003, help="supervisor's /ready and /metrics (recoveries) (0: a free one)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument(
        "--check-interval", type=float, default=10.0, help="seconds between test inferences per filter"
    )
    parser.add_argument(
        "--probe-timeout", type=float, default=5.0,
        help="seconds before a test inference counts as late (then the queue decides: busy or stalled)",
    )
    parser.add_argument(
        "--grace-period", type=float, default=30.0, help="seconds SIGTERM gives requests in flight to finish"
    )
    parser.add_argument(
        "--max-restarts", type=int, default=5, help="tritonserver restarts allowed within 10 minutes before giving up"
    )
    parser.add_argument("--log-file", type=Path, help="tritonserver's log (default: one per run under the temp folder)")


def serve_command(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C or SIGTERM; a FilterServeError (bad repository, port in use) propagates as exit code 2."""
    ports = [port or None for port in (args.http_port, args.grpc_port, args.metrics_port)]
    server = TritonServer(
        args.model_repository,
        *ports,
        host=args.host,
        grace_s=args.grace_period,
        probe_timeout_s=args.probe_timeout,
        probe_interval_s=args.check_interval,
        max_restarts=args.max_restarts,
        supervisor_port=args.supervisor_port,
        log_path=args.log_file,
    )
    supervising = False

    def on_signal(signum: int, frame: object) -> None:
        """Before supervision, abandon the start; after, drain (`docker stop`, systemd and kill as Ctrl-C)."""
        if not supervising:
            raise KeyboardInterrupt
        server.request_stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        with server:
            print(f"ready: {', '.join(server.ensembles) or 'no ensembles'} from {server.repo}", flush=True)
            print(f"  HTTP    {server.http_url}", flush=True)
            print(f"  gRPC    {server.grpc_url}", flush=True)
            print(f"  metrics http://{server.metrics_url}/metrics", flush=True)
            print(f"  health  http://{server.supervisor_url}/ready  http://{server.supervisor_url}/metrics", flush=True)
            print(f"  log     {server.log_path}  (Ctrl-C stops)", flush=True)
            supervising = True
            server.supervise()
            print(f"stopping: requests in flight have up to {args.grace_period:.0f} s to finish", flush=True)
    except ServerGaveUp as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_GAVE_UP
    finally:
        if server.process.launches:  # a start refused before the launch has no log to point at
            print(f"tritonserver stopped; its log stays at {server.log_path}", file=sys.stderr, flush=True)
    return 0
