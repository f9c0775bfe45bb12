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

from filterserve import defaults
from filterserve.serve.options import PORT_FLAGS, ServeOptions
from filterserve.serve.server import TritonServer
from filterserve.serve.supervisor import EXIT_GAVE_UP, RESTART_WINDOW_S, ServerGaveUp

# Triton's own defaults, so existing clients and dashboards find it; 0 picks a free port.
PORTS = {
    "http": (defaults.SERVE_HTTP_PORT, "HTTP port (0: a free one)"),
    "grpc": (defaults.SERVE_GRPC_PORT, "gRPC port (0: a free one)"),
    "metrics": (defaults.SERVE_METRICS_PORT, "Prometheus metrics port (0: a free one)"),
    "supervisor": (defaults.SERVE_SUPERVISOR_PORT, "supervisor's /ready and /metrics (recoveries) (0: a free one)"),
}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repository", required=True, type=Path, help="repository written by `filterserve export`")
    for what, (port, help_text) in PORTS.items():
        parser.add_argument(PORT_FLAGS[what], type=int, default=port, help=help_text)
    parser.add_argument("--host", default=defaults.SERVE_HOST, help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--check-interval", type=float, default=defaults.SERVE_CHECK_INTERVAL_S,
                        help="seconds between test inferences per filter")
    parser.add_argument(
        "--probe-timeout", type=float, default=defaults.SERVE_PROBE_TIMEOUT_S,
        help="seconds before a test inference counts as late (then the queue decides: busy or stalled)",
    )
    parser.add_argument("--grace-period", type=float, default=defaults.SERVE_GRACE_PERIOD_S,
                        help="seconds SIGTERM gives requests in flight to finish")
    parser.add_argument("--max-restarts", type=int, default=defaults.SERVE_MAX_RESTARTS,
                        help=f"tritonserver restarts allowed within {RESTART_WINDOW_S / 60:.0f} minutes before giving up")
    parser.add_argument("--startup-timeout", type=float, default=defaults.SERVE_STARTUP_TIMEOUT_S,
                        help="seconds tritonserver may take to load the repository, and a reload one model")
    parser.add_argument("--log-file", type=Path, help="tritonserver's log (default: one per run under the temp folder)")


def serve_options(args: argparse.Namespace) -> ServeOptions:
    """The flags as one value, checked once (a port given twice, a negative deadline: one line)."""
    return ServeOptions(
        repo=args.model_repository,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        supervisor_port=args.supervisor_port,
        check_interval_s=args.check_interval,
        probe_timeout_s=args.probe_timeout,
        grace_period_s=args.grace_period,
        max_restarts=args.max_restarts,
        startup_timeout_s=args.startup_timeout,
        log_file=args.log_file,
    )


def serve_command(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C or SIGTERM; a FilterServeError (bad repository, port in use) propagates as exit code 2."""
    options = serve_options(args)
    server = TritonServer(options)
    supervising = False

    def on_signal(signum: int, frame: object) -> None:
        """Before the server is up, abandon the start; after, drain (`docker stop`, systemd and kill as Ctrl-C)."""
        if not supervising:
            raise KeyboardInterrupt
        server.request_stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        with server:
            supervising = True  # from here a signal drains, even one sent as soon as the lines below are read
            print(f"ready: {', '.join(server.ensembles) or 'no ensembles'} from {server.repo}", flush=True)
            print(f"  HTTP    {server.http_url}", flush=True)
            print(f"  gRPC    {server.grpc_url}", flush=True)
            print(f"  metrics http://{server.metrics_url}/metrics", flush=True)
            print(f"  health  http://{server.supervisor_url}/ready  http://{server.supervisor_url}/metrics", flush=True)
            print(f"  log     {server.log_path}  (Ctrl-C stops)", flush=True)
            server.supervise()
            print(f"stopping: requests in flight have up to {options.grace_period_s:.0f} s to finish", flush=True)
    except ServerGaveUp as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_GAVE_UP
    finally:
        if server.process.launches:  # a start refused before the launch has no log to point at
            print(f"tritonserver stopped; its log stays at {server.log_path}", file=sys.stderr, flush=True)
    return 0
