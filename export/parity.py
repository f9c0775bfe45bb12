"""The parity check every exported variant ends in: its scores against the PyTorch + PEFT reference.

The reference is the card's recipe run one text at a time (no padding) on the filter's input
template; the variants run a right-padded batch of mixed lengths, so the check also proves that
padding does not move the scores (the pooling must find the last non-pad token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from filterserve.contract import TENSOR_OUTPUTS, TOKEN_INPUTS
from filterserve.errors import ParityError

from filterserve.filters import FilterSpec

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
    """The fixed articles plus one whose content runs past ``max_length`` tokens."""
    n_ids = len(tokenizer(_SENTENCE)["input_ids"])
    long_content = _SENTENCE * (spec.max_length // max(n_ids, 1) + 2)
    return [*PARITY_ARTICLES, ("Library reopens after the flood", long_content)]


def parity_texts(tokenizer, spec: FilterSpec) -> list[str]:
    """The parity articles as the model reads them: the filter's own template."""
    return [spec.input_text(title, content) for title, content in parity_articles(tokenizer, spec)]


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


def ort_scores(session, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``logits`` and ``weighted_score`` from an exported model."""
    logits, weighted = session.run(list(TENSOR_OUTPUTS), dict(zip(TOKEN_INPUTS, (ids, mask))))
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

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


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
