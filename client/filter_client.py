"""One filter served by Triton: read its description from the server, score articles or tokens with it.

It reads the filter (dimension names, weights, template, rules) from the served ensemble's config,
so the same client scores any filter the export wrote, with no local copy to drift from the server.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from filterserve.client.concurrency import Scorer
from filterserve.client.endpoint import Protocol, Served, TritonEndpoint
from filterserve.client.errors import ClientError, ServerUnavailable
from filterserve.client.items import Item, article_inputs, content_length
from filterserve.client.results import FilterResult
from filterserve.contract import (
    CONTENT,
    CONTENT_LENGTH,
    CONTENT_LENGTH_INPUT,
    DECISION_OUTPUTS,
    ENSEMBLE_OUTPUTS,
    FILTER_INDEX,
    FILTER_PARAMETER,
    HYBRID_OUTPUTS,
    LOGITS,
    N_TOKENS,
    SCORES,
    SCREENED,
    TENSOR_OUTPUTS,
    TEXT,
    TITLE,
    TOKEN_INPUTS,
    TRUNCATED,
    UNKNOWN_CONTENT_LENGTH,
    WEIGHTED_SCORE,
)
from filterserve.filters import FilterSpec


class FilterClient(Scorer):
    """Scores articles with one filter served by Triton.

    ``model`` names the filter's ensemble; left out, the server must serve exactly one filter.
    ``tokenizer`` (a ``tokenizer.json``) tokenizes here with the filter's template and head+tail cut
    and calls the ensemble's tensor model and decision step directly, for callers who skip the
    tokenizer step.
    ``connection`` takes :class:`TritonEndpoint`'s options (timeout_s, retries, TLS).
    """

    def __init__(
        self, url: str, protocol: Protocol | None = None, model: str | None = None, *, tokenizer: str | None = None,
        **connection: Any,
    ) -> None:
        endpoint = TritonEndpoint(url, protocol, **connection)
        try:
            self._bind(endpoint, True, model, None, tokenizer)
        except BaseException:
            endpoint.close()
            raise

    @classmethod
    def on(cls, endpoint: TritonEndpoint, model: str, served: Served | None = None) -> FilterClient:
        """A client on a connection the caller owns (and closes), with what the caller already read
        from the server: several filters then share one connection and one discovery."""
        client = cls.__new__(cls)
        client._bind(endpoint, False, model, served, None)
        return client

    def _bind(self, endpoint: TritonEndpoint, owned: bool, model: str | None, served: Served | None, tokenizer: str | None) -> None:
        """Reads the filter from the server, so a misconfigured one fails here, not mid-batch."""
        self.endpoint, self._owns_endpoint = endpoint, owned
        if model is None:
            served = served or endpoint.discover()
            model = self._only_filter(served)
        self.model = model
        if served is None or model not in served.configs:
            self._require_ready(model)
        config = self._config(model, served)
        described = config.get("parameters", {}).get(FILTER_PARAMETER, {}).get("string_value")
        if not described:
            raise ClientError(f"model {self.model} has no '{FILTER_PARAMETER}' parameter: it is not a filterserve ensemble")
        try:
            self.spec = FilterSpec.from_dict(json.loads(described), source=f"the '{FILTER_PARAMETER}' parameter of {self.model}")
        except json.JSONDecodeError as exc:
            raise ClientError(f"model {self.model}: its '{FILTER_PARAMETER}' parameter is not JSON ({exc})") from None
        # The composing models, as the ensemble names them: the step fed by token ids, the one fed by logits.
        steps = config.get("ensemble_scheduling", {}).get("step", [])
        by_input = {key: step["model_name"] for step in steps for key in step.get("input_map", {})}
        self.tensor_model, self.decision_model = by_input.get(TOKEN_INPUTS[0]), by_input.get(LOGITS)
        # What this ensemble answers: one exported before tiers and normalization has fewer outputs.
        declared = {output.get("name") for output in config.get("output", [])}
        self._outputs = [name for name in HYBRID_OUTPUTS if name in declared] or list(ENSEMBLE_OUTPUTS)
        self._decision_outputs = [name for name in DECISION_OUTPUTS if name in self._outputs]
        # A repository exported before the current rules (issue 26) takes no content length.
        self._measures = CONTENT_LENGTH in self._outputs

        # A shared-base group's member: its tokenizer step tells the group's tensor model which filter a row is.
        indexing = next((step["model_name"] for step in steps if FILTER_INDEX in step.get("output_map", {})), None)
        self._filter_index = None if indexing is None else int(self._config(indexing, served)["parameters"][FILTER_INDEX]["string_value"])
        self._tokenizer: Tokenizer | None = None
        if tokenizer is not None:
            if not self.tensor_model or not self.decision_model:
                raise ClientError(f"model {self.model} names no tensor model or decision step to call with tokens")
            try:
                self._tokenizer = Tokenizer.from_file(str(tokenizer))
            except Exception as exc:  # tokenizers raises plain Exception for missing or broken files
                raise ClientError(f"cannot load tokenizer {tokenizer}: {exc}") from None
            # As the server's tokenizer step (and transformers): the library truncates, no padding;
            # the head+tail cut counts every token, with a copy that does neither.
            self._counting = Tokenizer.from_str(self._tokenizer.to_str())
            self._counting.no_truncation()
            self._counting.no_padding()
            self._tokenizer.enable_truncation(self.spec.max_length)
            self._tokenizer.no_padding()
            self._require_ready(self.tensor_model)
            self._require_ready(self.decision_model)

    def _config(self, model: str, served: Served | None) -> dict[str, Any]:
        """As discovery read it, if it did; else asked of the server."""
        return served.configs[model] if served is not None and model in served.configs else self.endpoint.config(model)

    def _require_ready(self, model: str) -> None:
        if not self.endpoint.is_ready(model):
            # Not ready here (loading, stopping, or never served): a pool tries another server.
            raise ServerUnavailable(
                f"model {model} is not ready on the server at {self.url} ({self.protocol}); "
                f"{self.endpoint.discover().not_served(model, self.url)}"
            )

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def protocol(self) -> Protocol:
        return self.endpoint.protocol

    def close(self) -> None:
        if self._owns_endpoint:
            self.endpoint.close()

    def __enter__(self) -> FilterClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def dimensions(self) -> tuple[str, ...]:
        return self.spec.dimensions

    @property
    def weights(self) -> tuple[float, ...]:
        return self.spec.weights

    def _only_filter(self, served: Served) -> str:
        candidates = served.filters
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise ServerUnavailable(f"server at {self.url} serves no ready filter ensemble")
        raise ClientError(f"server at {self.url} serves several filters, pick one with model=: {', '.join(candidates)}")

    # --- scoring -----------------------------------------------------------------------------
    def score(self, title: str, content: str) -> FilterResult:
        """One article; the server joins title and content with the filter's template."""
        return self.score_item((title, content))

    def score_text(self, text: str) -> FilterResult:
        """Text already joined as the filter expects (see ``spec.text_template``)."""
        if not isinstance(text, str):
            raise ClientError(f"bad input: text must be a string, got {type(text).__name__}")
        return self.score_item(text)

    def score_item(self, item: Item) -> FilterResult:
        inputs = article_inputs(item)
        length = content_length(item)
        if self._tokenizer is not None:
            text = inputs[TEXT] if TEXT in inputs else self.spec.input_text(inputs[TITLE], inputs[CONTENT])
            cut = False
            if self.spec.head_tail is not None:
                text, cut = self.spec.head_tail.apply(text, self._counting)
            encoding = self._tokenizer.encode(text)
            return self.score_tokens(encoding.ids, truncated=cut or bool(encoding.overflowing), content_length=length)
        data = {name: np.array([[value.encode("utf-8")]], dtype=object) for name, value in inputs.items()}
        if self._measures and length != len(inputs.get(CONTENT, inputs.get(TEXT, ""))):  # a record's text: production measures it
            data[CONTENT_LENGTH_INPUT] = np.array([[length]], dtype=np.int32)
        return FilterResult.from_outputs(self.endpoint.infer(self.model, data, self._outputs), self.spec, self.model)

    def score_batch(self, items: Sequence[Item]) -> list[FilterResult]:
        """Several articles in one request, as a caller that batches its own rows sends them (at most
        the ensemble's max_batch_size): the server pads them together to the longest one's length and
        runs them as one batch. Always through the ensemble's tokenizer step. Results in input order.
        """
        inputs = [article_inputs(item) for item in items]
        if not inputs:
            return []
        if any(set(row) != set(inputs[0]) for row in inputs):
            raise ClientError("bad input: a batch must be all texts or all (title, content) articles")
        data = {name: np.array([[row[name].encode("utf-8")] for row in inputs], dtype=object) for name in inputs[0]}
        outputs = self.endpoint.infer(self.model, data, self._outputs)
        return [FilterResult.from_outputs({name: value[row] for name, value in outputs.items()}, self.spec, self.model)
                for row in range(len(inputs))]

    def score_tokens(self, input_ids: Sequence[int], truncated: bool = False,
                     content_length: int = UNKNOWN_CONTENT_LENGTH) -> FilterResult:
        """Scores token ids on the tensor model, then the decision step; ids must come from the filter's tokenizer.

        Ids past max_length are cut here (and the result says ``truncated``). ``content_length``:
        the article's, for the short-content cap; without it none applies, as production applies
        none to a row it never measured.
        """
        if not input_ids or not self.tensor_model or not self.decision_model:
            raise ClientError("bad input: no tokens" if not input_ids else f"model {self.model} has no tensor model step")
        truncated = truncated or len(input_ids) > self.spec.max_length
        ids = np.asarray(input_ids, dtype=np.int64)[: self.spec.max_length].reshape(1, -1)
        feeds = dict(zip(TOKEN_INPUTS, (ids, np.ones_like(ids))))
        if self._filter_index is not None:
            feeds[FILTER_INDEX] = np.array([[self._filter_index]], dtype=np.int64)
        tensor = self.endpoint.infer(self.tensor_model, feeds, TENSOR_OUTPUTS)
        rows = {LOGITS: tensor[LOGITS].astype(np.float32)}
        if self._measures:
            rows.update({CONTENT_LENGTH_INPUT: np.array([[content_length]], dtype=np.int32), SCREENED: np.array([[False]])})
        decided = self.endpoint.infer(self.decision_model, rows, self._decision_outputs)
        # The outputs as the ensemble would name them: its SCORES are the tensor model's logits (a group's
        # are as wide as its widest member: this filter's are the first columns).
        outputs = {SCORES: tensor[LOGITS][..., : self.spec.num_labels], WEIGHTED_SCORE: tensor[WEIGHTED_SCORE], **decided,
                   N_TOKENS: np.array(ids.shape[1]), TRUNCATED: np.array(truncated)}
        return FilterResult.from_outputs(outputs, self.spec, self.tensor_model)
