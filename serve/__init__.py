"""Serving a filterserve model repository with the tritonserver binary from nvidia-pytriton.

Three parts: ``assembly`` (binary, environment, backend directory, the repository's configs),
``process`` (the process life: ports, admin key, start, restart, drain, clean-up) and ``health``
(supervision that tells busy from broken); ``server.TritonServer`` puts them together.
"""

from filterserve.serve.health import EXIT_GAVE_UP, ServerGaveUp
from filterserve.serve.server import TritonServer

__all__ = ["EXIT_GAVE_UP", "ServerGaveUp", "TritonServer"]
