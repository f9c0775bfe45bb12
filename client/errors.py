"""The client's two failures: every module of the client raises them, so they sit apart from all.

The split matters to callers: :class:`ServerUnavailable` means "try another server" (a pool fails
over, a batch stops sending), any other :class:`ClientError` means this request cannot succeed.
"""

from __future__ import annotations

from filterserve.errors import FilterServeError


class ClientError(FilterServeError):
    """A request the server refused or could not answer; the message says which and why."""


class ServerUnavailable(ClientError):
    """The server could not be reached, even after retries."""
