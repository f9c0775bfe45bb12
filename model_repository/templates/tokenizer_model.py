"""Triton Python model: an article (TEXT, or TITLE + CONTENT) → input_ids, attention_mask.

It runs inside NVIDIA's container as well as beside the pytriton wheel, so it imports only
``tokenizers`` and numpy, and reads everything it needs (template, max_length, pad id, bucket)
from its model config. The server owns the filter's input template, so a plain Triton caller
that sends TITLE and CONTENT gets exactly the input the filter was trained on.

All requests of one ``execute`` call are padded to one common length (rounded up to a bucket)
because the tensor model's dynamic batcher only joins requests of identical shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer


def _param(config: dict, key: str) -> str:
    return config["parameters"][key]["string_value"]


def _invalid(message: str) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))


def _decode(raw: object, name: str, row: int) -> str:
    """Turns one BYTES element into a non-empty string; ValueError names the input and row."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{name} row {row} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    else:
        text = str(raw)
    if not text.strip():
        raise ValueError(f"{name} row {row} is empty")
    return text


def _column(request: object, name: str) -> list[str] | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    return [_decode(item, name, row) for row, item in enumerate(tensor.as_numpy().reshape(-1))]


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.max_length = int(_param(config, "max_length"))
        self.pad_token_id = int(_param(config, "pad_token_id"))
        self.bucket = int(_param(config, "bucket"))
        self.template = _param(config, "text_template")
        tokenizer_file = Path(args["model_repository"]) / args["model_version"] / "tokenizer" / "tokenizer.json"
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        # As transformers' ``tokenizer(text, max_length=L, truncation=True)``: the library truncates
        # (keeping any special tokens the post-processor adds); padding is done here, per batch.
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.no_padding()

    def _texts(self, request: object) -> list[str]:
        """The model input of every row: TEXT as sent, or TITLE and CONTENT through the template."""
        text, title, content = (_column(request, name) for name in ("TEXT", "TITLE", "CONTENT"))
        if text is not None:
            if title is not None or content is not None:
                raise ValueError("send either TEXT or TITLE + CONTENT, not both")
            return text
        if title is None or content is None:
            raise ValueError(f"missing {'TITLE' if title is None else 'CONTENT'}: send TEXT, or TITLE and CONTENT")
        if len(title) != len(content):
            raise ValueError(f"TITLE has {len(title)} rows but CONTENT has {len(content)}")
        return [self.template.format(title=t, content=c) for t, c in zip(title, content)]

    def _padded_length(self, longest: int) -> int:
        rounded = -(-max(longest, 1) // self.bucket) * self.bucket
        return min(rounded, self.max_length)

    def execute(self, requests: list) -> list:
        texts: list[str] = []
        spans: list[tuple[int, int] | str] = []  # per request: its rows in ``texts``, or an error
        for request in requests:
            try:
                rows = self._texts(request)
            except ValueError as exc:
                spans.append(str(exc))
                continue
            spans.append((len(texts), len(texts) + len(rows)))
            texts.extend(rows)

        ids = [enc.ids for enc in self.tokenizer.encode_batch(texts)]
        length = self._padded_length(max((len(row) for row in ids), default=1))
        input_ids = np.full((len(ids), length), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(ids), length), dtype=np.int64)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = row
            attention_mask[i, : len(row)] = 1

        responses = []
        for span in spans:
            if isinstance(span, str):
                responses.append(_invalid(span))
                continue
            start, end = span
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("input_ids", input_ids[start:end]),
                        pb_utils.Tensor("attention_mask", attention_mask[start:end]),
                    ]
                )
            )
        return responses
