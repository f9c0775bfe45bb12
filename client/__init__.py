"""Score articles against a running filterserve Triton server (bare install: no torch)."""

from filterserve.client.client import (
    ClientError,
    FilterClient,
    FilterResult,
    MultiFilterClient,
    ScoreError,
    ServerUnavailable,
    TritonEndpoint,
)

__all__ = ["ClientError", "FilterClient", "FilterResult", "MultiFilterClient", "ScoreError", "ServerUnavailable", "TritonEndpoint"]
