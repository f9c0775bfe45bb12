"""Score articles against a running filterserve Triton server (bare install: no torch)."""

from filterserve.client.client import (
    ClientError,
    FilterClient,
    ScoreError,
    Scores,
    ServerUnavailable,
)

__all__ = ["ClientError", "FilterClient", "ScoreError", "Scores", "ServerUnavailable"]
