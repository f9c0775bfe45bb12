"""Serving a filterserve model repository with the tritonserver binary from nvidia-pytriton."""

from filterserve.serve.server import TritonServer, prepare_backends, read_configs, server_env

__all__ = ["TritonServer", "prepare_backends", "read_configs", "server_env"]
