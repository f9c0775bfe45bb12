"""Triton Python model: an article (TEXT, or TITLE + CONTENT) → input_ids, attention_mask, n_tokens,
truncated, and for the decision step content_length and screened.

It runs inside NVIDIA's container as well as beside the pytriton wheel, so it imports only
``tokenizers``, numpy and the copies of filterserve's ``contract.py`` (the tensor names) and
``head_tail.py`` that the export puts beside it, and reads everything else it needs (template,
head+tail cut, max_length, pad id, bucket, size cap) from its model config. The server owns the
filter's input template and head+tail cut, so a plain Triton caller that sends TITLE and CONTENT
(or the joined TEXT) gets exactly the input the filter was trained on.
Special tokens (Gemma's BOS) come from the tokenizer file's post-processor, as transformers adds
them; padding uses the filter's pad id (Gemma's is 0), which the tensor model's pooling reads.

The content's length is measured here, from the same text the production scorer measures
(``BasePreFilter.content_length``: Python's ``len`` of the content, in code points; the joined TEXT
when that is all that was sent), because only this step sees the text; a caller whose record
carries a ``text`` field, which production measures instead, sends CONTENT_LENGTH. Every row
tokenized here is a model row, never a stage-1 probe row: ``screened`` is false.

Each request is padded to its own length, rounded up to a bucket: real news is short and uneven,
and padding one request to another's length computes tokens nobody needs. The tensor model's
dynamic batcher joins only requests of identical shape, so requests of one bucket still batch.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

# A prefix this many characters per kept token is tried first when cutting an over-long text.
CUT_CHARS_PER_TOKEN = 8


def _sibling(name: str) -> ModuleType:
    """A module shipped beside this file (Triton loads model.py by path, not as a package)."""
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"filterserve_step_{name}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


contract = _sibling("contract")
head_tail = _sibling("head_tail").head_tail


def _param(config: dict, key: str) -> str:
    return config["parameters"][key]["string_value"]


def _invalid(message: str) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))


def _decode(raw: object, name: str, row: int, max_bytes: int) -> str:
    """Turns one BYTES element into a non-empty string; ValueError names the input, row and rule."""
    if isinstance(raw, bytes):
        if len(raw) > max_bytes:
            raise ValueError(f"{name} row {row} has {len(raw)} bytes; the limit is {max_bytes} (max_text_bytes)")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{name} row {row} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    else:
        text = str(raw)
    if not text.strip():
        raise ValueError(f"{name} row {row} is empty")
    return text


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.max_length = int(_param(config, "max_length"))
        self.pad_token_id = int(_param(config, "pad_token_id"))
        self.bucket = int(_param(config, "bucket"))
        self.max_text_bytes = int(_param(config, "max_text_bytes"))
        self.template = _param(config, "text_template")
        # A member of a shared-base group tells the group's tensor model, per row, which filter it is.
        index = config["parameters"].get(contract.FILTER_INDEX, {}).get("string_value", "")
        self.filter_index = int(index) if index else None
        cut = config["parameters"].get("head_tail", {}).get("string_value", "")
        self.head_tail = json.loads(cut) if cut else None
        tokenizer_file = Path(args["model_repository"]) / args["model_version"] / "tokenizer" / "tokenizer.json"
        # As transformers' ``tokenizer(text, max_length=L, truncation=True)``: the library truncates
        # (keeping any special tokens the post-processor adds); padding is done here, per request.
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.no_padding()
        self.untruncated = Tokenizer.from_file(str(tokenizer_file))
        self.untruncated.no_truncation()
        self.untruncated.no_padding()
        # What the padding costs, per tensor model: real tokens (mask ones) and computed ones (rows × padded length).
        labels = {"model": _param(config, "tensor_model")}
        self.metric_families = [
            pb_utils.MetricFamily(name, description, pb_utils.MetricFamily.COUNTER)
            for name, description in (
                (_param(config, "real_tokens_metric"), "Article tokens sent to the tensor model (attention-mask ones)"),
                (_param(config, "computed_tokens_metric"), "Tokens the tensor model computes: rows times padded length"),
            )
        ]
        self.real_tokens, self.computed_tokens = (family.Metric(labels=labels) for family in self.metric_families)

    def _lengths(self, request: object, measured: list[int]) -> np.ndarray:
        """content_length per row: CONTENT_LENGTH as sent, else the content measured."""
        tensor = pb_utils.get_input_tensor_by_name(request, contract.CONTENT_LENGTH_INPUT)
        if tensor is None:
            return np.array(measured, dtype=np.int32).reshape(-1, 1)
        sent = tensor.as_numpy().reshape(-1)
        if len(sent) != len(measured):
            raise ValueError(f"{contract.CONTENT_LENGTH_INPUT} has {len(sent)} rows but the article input has {len(measured)}")
        if (sent < 0).any():
            raise ValueError(f"{contract.CONTENT_LENGTH_INPUT} must not be negative")
        return sent.astype(np.int32).reshape(-1, 1)

    def _texts(self, request: object) -> tuple[list[str], list[int]]:
        """The model input of every row (TEXT as sent, or TITLE and CONTENT through the template),
        and the length of what production measures as its content (CONTENT, else TEXT)."""
        columns = {}
        text, title, content = contract.TEXT, contract.TITLE, contract.CONTENT
        for name in contract.TEXT_INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                columns[name] = [_decode(v, name, row, self.max_text_bytes) for row, v in enumerate(tensor.as_numpy().reshape(-1))]
        if text in columns:
            if len(columns) > 1:
                raise ValueError(f"send either {text} or {title} + {content}, not both")
            return columns[text], [len(t) for t in columns[text]]
        if len(columns) < 2:
            raise ValueError(f"missing {title if title not in columns else content}: send {text}, or {title} and {content}")
        titles, contents = columns[title], columns[content]
        if len(titles) != len(contents):
            raise ValueError(f"{title} has {len(titles)} rows but {content} has {len(contents)}")
        return [self.template.format(title=t, content=c) for t, c in zip(titles, contents)], [len(c) for c in contents]

    def _cut(self, text: str) -> tuple[str, bool]:
        """A prefix of ``text`` whose first max_length tokens are provably those of the whole text.

        Tokenizing costs time in proportion to the text, so a 64 MB article would stall every
        request behind it. Pre-tokenization splits the text into pieces (words, runs of
        punctuation or space) by rules that look at most one character past a piece, and BPE
        runs inside each piece; so every piece that ends two or more characters before the cut
        is the same piece, with the same tokens, as in the whole text. The prefix is accepted
        once the piece holding the last kept token ends that early; else it is doubled.
        Returns the prefix and whether it was cut.
        """
        cut = CUT_CHARS_PER_TOKEN * self.max_length
        while cut < len(text):
            encoding = self.untruncated.encode(text[:cut])
            words = encoding.word_ids
            last_piece = words[self.max_length - 1] if len(words) > self.max_length else None
            if last_piece is not None:
                piece_end = max(end for (_, end), w in zip(encoding.offsets, words) if w == last_piece)
                if piece_end <= cut - 2 and any(w is not None and w > last_piece for w in words):
                    return text[:cut], True
            cut *= 2
        return text, False

    def _model_text(self, text: str) -> tuple[str, bool]:
        """The text as the model reads it, and whether it was cut.

        With head+tail, the whole text is counted (its last tokens are read), so the prefix cut
        does not apply: max_text_bytes bounds that work.
        """
        if self.head_tail is None:
            return self._cut(text)
        rule = self.head_tail
        return head_tail(text, self.untruncated, rule["head_tokens"], rule["tail_tokens"], rule["separator"])

    def _encode(self, texts: list[str]) -> list[tuple[list[int], bool]]:
        """Token ids the model reads, and whether the model reads less than the whole text."""
        cuts = [self._model_text(text) for text in texts]
        encodings = self.tokenizer.encode_batch([text for text, _ in cuts])
        return [(enc.ids, was_cut or bool(enc.overflowing)) for enc, (_, was_cut) in zip(encodings, cuts)]

    def _padded_length(self, longest: int) -> int:
        rounded = -(-max(longest, 1) // self.bucket) * self.bucket
        return min(rounded, self.max_length)

    def _response(self, rows: list[tuple[list[int], bool]], lengths: np.ndarray) -> pb_utils.InferenceResponse:
        length = self._padded_length(max(len(ids) for ids, _ in rows))
        input_ids = np.full((len(rows), length), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), length), dtype=np.int64)
        for i, (ids, _) in enumerate(rows):
            input_ids[i, : len(ids)] = ids
            attention_mask[i, : len(ids)] = 1
        n_tokens = attention_mask.sum(axis=1, dtype=np.int32).reshape(-1, 1)
        self.real_tokens.increment(int(n_tokens.sum()))
        self.computed_tokens.increment(int(input_ids.size))
        ids_name, mask_name = contract.TOKEN_INPUTS
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(ids_name, input_ids),
                pb_utils.Tensor(mask_name, attention_mask),
                pb_utils.Tensor(contract.N_TOKENS, n_tokens),
                pb_utils.Tensor(contract.TRUNCATED, np.array([[t] for _, t in rows], dtype=bool)),
                pb_utils.Tensor(contract.CONTENT_LENGTH, lengths),
                pb_utils.Tensor(contract.SCREENED, np.zeros((len(rows), 1), dtype=bool)),
            ]
            + ([pb_utils.Tensor(contract.FILTER_INDEX, np.full((len(rows), 1), self.filter_index, dtype=np.int64))]
               if self.filter_index is not None else [])
        )

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                texts, measured = self._texts(request)
                lengths = self._lengths(request, measured)
            except ValueError as exc:
                responses.append(_invalid(str(exc)))
                continue
            responses.append(self._response(self._encode(texts), lengths))
        return responses

    def finalize(self) -> None:
        # Metrics must go before their families (the stub refuses the other order).
        del self.real_tokens, self.computed_tokens
        del self.metric_families
