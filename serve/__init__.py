"""Serving a filterserve model repository with the tritonserver binary from nvidia-pytriton.

What runs where: ``options`` (what to serve and how, one value), ``ports`` and ``assembly`` (what
is checked and prepared before tritonserver starts), ``process`` (tritonserver's process life:
start, restart, drain, clean-up), ``supervisor`` and ``probes`` (in serve, telling busy from
broken and recovering), ``status_http`` (the supervisor's ``/ready`` and ``/metrics``) and
``memory`` (will the models fit); ``server.TritonServer`` puts them together.
"""

from filterserve.serve.options import ServeOptions
from filterserve.serve.server import TritonServer
from filterserve.serve.supervisor import EXIT_GAVE_UP, ServerGaveUp

__all__ = ["EXIT_GAVE_UP", "ServeOptions", "ServerGaveUp", "TritonServer"]
