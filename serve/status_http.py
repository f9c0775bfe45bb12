"""The supervisor's HTTP endpoint: ``GET /ready`` (200, or 503 with why) and ``GET /metrics``
(Prometheus text) on a port of serve's own (``--supervisor-port``).

Triton's own ``/v2/health/ready`` stays 200 while a crashed stub fails every request; this
readiness does not, so load balancers and Kubernetes probes ask here.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from filterserve.serve.ports import address, address_family, cannot_listen
from filterserve.serve.supervisor import Supervisor


class SupervisorEndpoint:
    """Serves one :class:`Supervisor`'s readiness and counters from a thread until :meth:`close`."""

    def __init__(self, supervisor: Supervisor, host: str, port: int) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path == "/metrics":
                    status, body, kind = 200, supervisor.metrics_text(), "text/plain; version=0.0.4"
                elif self.path == "/ready":
                    state = supervisor.status()
                    status, body, kind = (200 if state.ready else 503), json.dumps(asdict(state)), "application/json"
                else:
                    status, body, kind = 404, "not found: GET /metrics or /ready\n", "text/plain"
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - scrapes are not news
                pass

        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": address_family(host), "daemon_threads": True})
        try:
            self._server = server_class((host, port), Handler)
        except OSError as exc:  # taken since serve checked it, before tritonserver started
            raise cannot_listen(host, port, "supervisor", exc) from None
        self.host, self.port = host, self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="supervisor-endpoint", daemon=True).start()

    @property
    def url(self) -> str:
        return address(self.host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
