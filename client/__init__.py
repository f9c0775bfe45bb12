"""Score articles against a running filterserve Triton server.

This is the bare install: its modules import only tritonclient, numpy, tokenizers, tqdm and
filterserve's core, so scoring never needs torch. The modules, by job:

- ``results``: the result schema (``FilterResult``, ``ScoreError``), read from the served outputs;
- ``items``: the article forms a caller hands in, and what each sends;
- ``errors``: ``ClientError`` and ``ServerUnavailable`` (try another server);
- ``endpoint``: one server's address (as people write it), transport, TLS, timeouts, retries, what each
  failure means, and what it serves (read once, shared by the clients on that connection);
- ``concurrency``: many articles in flight, longest first, results in input order;
- ``filter_client``: one filter; ``multi``: several filters; ``servers``: several servers;
- ``production``: a drop-in for the filters' production scorer (its result dicts, its calls);
- ``ray_data``: Ray Data batch scoring; ``cli``: ``filterserve score``.
"""

from filterserve.client.endpoint import TritonEndpoint
from filterserve.client.errors import ClientError, ServerUnavailable
from filterserve.client.filter_client import FilterClient
from filterserve.client.multi import MultiFilterClient
from filterserve.client.results import FilterResult, ScoreError

__all__ = ["ClientError", "FilterClient", "FilterResult", "MultiFilterClient", "ScoreError", "ServerUnavailable", "TritonEndpoint"]
