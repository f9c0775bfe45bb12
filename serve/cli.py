"""``filterserve serve``: the server in the foreground, supervised, until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from filterserve.serve.server import TritonServer


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repository", required=True, type=Path, help="repository written by `filterserve export`")
    # Triton's own defaults, so existing clients and dashboards find it; 0 picks a free port.
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port (0: a free one)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (0: a free one)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (0: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument(
        "--check-interval", type=float, default=30.0, help="seconds between test inferences that catch crashed stubs"
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve_command(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C or SIGTERM; a FilterServeError (bad repository, port in use, unrecoverable model) propagates."""
    ports = [port or None for port in (args.http_port, args.grpc_port, args.metrics_port)]
    server = TritonServer(args.model_repository, *ports, host=args.host)
    signal.signal(signal.SIGTERM, _interrupt)  # `docker stop`, systemd and kill stop as cleanly as Ctrl-C
    with server:
        print(f"ready: {', '.join(server.ensembles) or 'no ensembles'} from {server.repo}", flush=True)
        print(f"  HTTP    {server.http_url}", flush=True)
        print(f"  gRPC    {server.grpc_url}", flush=True)
        print(f"  metrics http://{server.metrics_url}/metrics", flush=True)
        print(f"  log     {server.log_path}  (Ctrl-C stops)", flush=True)
        try:
            server.supervise(args.check_interval)
        except KeyboardInterrupt:
            print("stopping tritonserver", flush=True)
    return 0
