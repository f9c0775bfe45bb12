"""The parity check every exported variant ends in: its scores against the PyTorch + PEFT reference.

The reference is the card's recipe run one text at a time (no padding) on the filter's input
template; the variants run a right-padded batch of mixed lengths, so the check also proves that
padding does not move the scores (the pooling must find the last non-pad token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from filterserve.contract import FILTER_INDEX, PARITY_TOLERANCES, RELATIVE_PARITY, TENSOR_OUTPUTS, TOKEN_INPUTS
from filterserve.errors import ParityError
from filterserve.filters import FilterSpec
from filterserve.gate import GATE_BATCH, LabelledSet
from filterserve.manifest import ParityRecord

_SENTENCE = (
    "Neighbours in the valley rebuilt the flooded library together, and the children's corner "
    "reopened with books donated from three towns. "
)
# (title, content): a typical article, the shortest possible one, non-Latin scripts (real news is
# multilingual), and (added in parity_articles) one far past max_length that must be truncated.
PARITY_ARTICLES: tuple[tuple[str, str], ...] = (
    ("Volunteers rebuild flooded village library",
     "More than two hundred residents dried, sorted and reshelved forty thousand books in six weeks."),
    ("A", "B"),
    ("Markets slide as investors weigh the rate outlook", "Shares fell for a third day."),
    ("太阳能膜降低了净水成本", "实地试验为四千人提供了饮用水。研究人员说，这种材料可以在当地制造。"),
    ("Волонтёры восстановили школу", "Занятия возобновятся в понедельник после наводнения."),
    ("متطوعون يعيدون بناء المكتبة", "أعاد أكثر من مئتي ساكن ترتيب أربعين ألف كتاب في ستة أسابيع."),
)


def parity_articles(tokenizer, spec: FilterSpec) -> list[tuple[str, str]]:
    """The fixed articles plus one whose content runs past ``max_length`` tokens, and, for a
    head+tail filter, the articles on which its cut can go wrong (:func:`head_tail_articles`)."""
    n_ids = len(tokenizer(_SENTENCE)["input_ids"])
    long_content = _SENTENCE * (spec.max_length // max(n_ids, 1) + 2)
    articles = [*PARITY_ARTICLES, ("Library reopens after the flood", long_content)]
    if spec.head_tail is not None:
        articles += head_tail_articles(tokenizer, spec)
    return articles


def parity_texts(tokenizer, spec: FilterSpec) -> list[str]:
    """The parity articles as the model reads them: the filter's own template and head+tail cut."""
    return spec.model_texts([spec.input_text(title, content) for title, content in parity_articles(tokenizer, spec)], tokenizer)


# Non-Latin news far past head + tail tokens, and characters that tokenizers split into several
# tokens (byte fallback, byte-level BPE): a head or tail cut can fall inside one of them.
_LONG_CHINESE = ("长篇报道：社区互助", "邻居们互相帮助，修复了被洪水冲毁的房屋和学校。")
_LONG_ARABIC = ("تقرير مطول عن التضامن", "ساعد الجيران بعضهم بعضاً في إصلاح البيوت والمدارس بعد الفيضان. ")
_SPLIT_CHARACTERS = "𓀀𝔘🦜䨻龘ꙮ"
_FILLER = "word "


def _offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    """Character span of every token of ``text`` encoded without special tokens (as the cut counts)."""
    return [tuple(o) for o in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]


def _exactly(tokenizer, spec: FilterSpec, title: str, filler: str, n_tokens: int) -> tuple[str, str] | None:
    """An article whose joined text is exactly ``n_tokens`` tokens long (without special tokens), if one is found."""
    def count(length: int) -> int:
        return len(_offsets(tokenizer, spec.input_text(title, filler[:length])))

    low, high = 1, len(filler)
    while low < high:  # the shortest prefix reaching n_tokens (the count grows with the prefix)
        middle = (low + high) // 2
        if count(middle) < n_tokens:
            low = middle + 1
        else:
            high = middle
    for length in range(max(1, low - 8), min(len(filler), low + 8) + 1):
        if count(length) == n_tokens and filler[:length].strip():
            return title, filler[:length]
    return None


def _cut_inside(tokenizer, spec: FilterSpec, at_head: bool) -> tuple[str, str] | None:
    """An article whose head (or tail) cut splits one character that spans several tokens."""
    rule = spec.head_tail
    assert rule is not None
    title = "Rare script in the archive"
    words_per_token = max(1, len(_offsets(tokenizer, _FILLER * 50)) // 50)
    long_filler = _FILLER * ((rule.head_tokens + rule.tail_tokens) // words_per_token + 8)
    for char in _SPLIT_CHARACTERS:
        for words in range(0, max(rule.head_tokens, rule.tail_tokens) + 8):
            if at_head:
                content = _FILLER * words + char + " " + long_filler
            else:
                content = long_filler + char + " " + _FILLER * words
            text = spec.input_text(title, content)
            spans = _offsets(tokenizer, text)
            cut = rule.head_tokens if at_head else len(spans) - rule.tail_tokens
            position = text.index(char, len(title) + 2 + (0 if at_head else len(long_filler)))
            inside = [i for i, (start, end) in enumerate(spans) if start <= position < end]
            if len(inside) < 2:
                break  # this character is one token here: try the next
            if inside[0] < cut <= inside[-1]:
                return title, content
            if (inside[0] >= cut) if at_head else (inside[-1] < cut):
                break  # past the cut: it cannot be reached with more words
    return None


def head_tail_articles(tokenizer, spec: FilterSpec) -> list[tuple[str, str]]:
    """Where a head+tail cut can go wrong, built for this tokenizer.

    Non-Latin articles far past head + tail tokens; an article exactly at head + tail tokens (not
    cut) and one a token longer (cut); articles whose head cut and whose tail cut fall inside a
    character that spans several tokens (decoded as U+FFFD on both sides, as in production).
    """
    rule = spec.head_tail
    assert rule is not None
    span = rule.head_tokens + rule.tail_tokens
    per_sentence = max(1, len(_offsets(tokenizer, _LONG_CHINESE[1])))
    articles = [
        (_LONG_CHINESE[0], _LONG_CHINESE[1] * (3 * span // per_sentence + 2)),
        (_LONG_ARABIC[0], _LONG_ARABIC[1] * (3 * span // max(1, len(_offsets(tokenizer, _LONG_ARABIC[1]))) + 2)),
    ]
    filler = _SENTENCE * (2 * span // max(1, len(_offsets(tokenizer, _SENTENCE))) + 2)
    for n_tokens in (span, span + 1):
        exact = _exactly(tokenizer, spec, "At the boundary", filler, n_tokens)
        if exact is not None:
            articles.append(exact)
    for at_head in (True, False):
        split = _cut_inside(tokenizer, spec, at_head)
        if split is not None:
            articles.append(split)
    return articles


def encode(tokenizer, texts: list[str], max_length: int, pad_to_max_length: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A right-padded INT64 batch: to its longest text, or (as the production scorer did) to max_length."""
    batch = tokenizer(
        texts, max_length=max_length, truncation=True, padding="max_length" if pad_to_max_length else True, return_tensors="np"
    )
    return batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)


def score_in_batches(
    score_batch: Callable[[np.ndarray, np.ndarray], np.ndarray],
    tokenizer,
    texts: list[str],
    max_length: int,
    batch_size: int,
    pad_to_max_length: bool = False,
) -> np.ndarray:
    """Scores ``texts`` in right-padded batches of ``batch_size``, in the order given."""
    return np.concatenate([
        score_batch(*encode(tokenizer, texts[i : i + batch_size], max_length, pad_to_max_length))
        for i in range(0, len(texts), batch_size)
    ])


def gate_scores(score_batch: Callable[[np.ndarray, np.ndarray], np.ndarray], tokenizer, labelled: LabelledSet, max_length: int,
                batch_size: int = GATE_BATCH) -> np.ndarray:
    """A variant's scores on the accuracy gate's articles, in right-padded batches as a server runs them."""
    return score_in_batches(score_batch, tokenizer, labelled.texts, max_length, batch_size)


@torch.inference_mode()
def reference_scores(model, tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    """The card's recipe, one unpadded text at a time."""
    rows = []
    for text in texts:
        inputs = tokenizer(text, max_length=max_length, truncation=True, return_tensors="pt")
        rows.append(model(**inputs).logits[0].float().numpy())
    return np.stack(rows)


@torch.inference_mode()
def torch_scores(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return out.logits.float().numpy()


def ort_session(onnx_path: Path, providers: list[str] | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        str(onnx_path), options, providers=providers or ["CPUExecutionProvider"]
    )


def ort_scores(
    session, ids: np.ndarray, mask: np.ndarray, filter_index: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``logits`` and ``weighted_score`` from an exported model; a group's needs each row's ``filter_index`` [batch, 1]."""
    feeds = dict(zip(TOKEN_INPUTS, (ids, mask)))
    if filter_index is not None:
        feeds[FILTER_INDEX] = filter_index
    logits, weighted = session.run(list(TENSOR_OUTPUTS), feeds)
    return logits, weighted


@dataclass(frozen=True)
class ParityResult:
    variant: str
    max_abs_diff: float
    mean_abs_diff: float
    tolerance: float
    finite: bool
    n_texts: int

    @property
    def passed(self) -> bool:
        return self.finite and self.max_abs_diff <= self.tolerance

    def to_record(self, **given: Any) -> ParityRecord:
        """What a record keeps of this check; ``given`` overrides or adds fields (the precision's tolerance, ``against``)."""
        return ParityRecord(**{**asdict(self), "passed": self.passed, **given})


def parity_record(result: ParityResult, precision: str, limit: float) -> ParityRecord:
    """What a variant's record keeps of its parity check (a merged filter's or a group member's):
    the result, the precision's tolerance, and for a relative bound (bf16) the absolute limit it came to."""
    relative = {"relative": True, "limit": limit} if precision in RELATIVE_PARITY else {}
    return result.to_record(tolerance=PARITY_TOLERANCES[precision], **relative)


def compare(
    variant: str, got: np.ndarray, reference: np.ndarray, tolerance: float, against: str = "the PyTorch + PEFT reference"
) -> ParityResult:
    """Raise :class:`ParityError` naming the variant, the figures and the worst text when off."""
    finite = bool(np.isfinite(got).all())
    diff = np.abs(got.astype(np.float64) - reference.astype(np.float64))
    diff = np.where(np.isfinite(diff), diff, np.inf)
    result = ParityResult(
        variant=variant,
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        tolerance=tolerance,
        finite=finite,
        n_texts=int(got.shape[0]),
    )
    if not result.passed:
        row, col = np.unravel_index(int(np.argmax(diff)), diff.shape)
        what = "produces NaN/Inf" if not finite else f"differs from {against}"
        raise ParityError(
            f"{variant} {what}: max |Δ| = {result.max_abs_diff:.3g} > tolerance {tolerance:g} "
            f"(worst: text {row}, output {col}; mean |Δ| = {result.mean_abs_diff:.3g})"
        )
    return result


def compare_outputs(
    variant: str, logits: np.ndarray, weighted: np.ndarray, scores: np.ndarray, weighted_reference: np.ndarray, tolerance: float,
    against: str = "the PyTorch + PEFT reference",
) -> ParityResult:
    """Both outputs of a tensor model against the reference's: ``logits`` (the result returned) and
    ``weighted_score`` [rows, 1]; raises :class:`ParityError` naming the one that is off."""
    result = compare(variant, logits, scores, tolerance, against)
    compare(f"{variant} weighted_score", weighted.reshape(-1, 1), weighted_reference.reshape(-1, 1), tolerance, against)
    return result
