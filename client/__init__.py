"""Score articles against a running filterserve Triton server (bare install: no torch)."""

from filterserve.client.client import (
    ClientError,
    FilterClient,
    FilterResult,
    ScoreError,
    ServerUnavailable,
)

__all__ = ["ClientError", "FilterClient", "FilterResult", "ScoreError", "ServerUnavailable"]
