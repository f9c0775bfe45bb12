"""Shared fixtures: a tiny random Qwen2 + LoRA filter in the real on-disk layout, and its export.

Building and exporting take seconds; both are session-scoped so every test reuses them.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from filterserve.demo import INVESTMENT_RISK_V2
from filterserve.filters import UPLIFTING_V4, FilterSpec

FIVE_DIMS = replace(INVESTMENT_RISK_V2, max_length=256)  # a shorter max_length than uplifting's, on purpose


_LONG_BODY = " ".join(
    f"Paragraph {i}: the cooperative's members repaired {i * 3} homes, trained apprentices and shared tools."
    for i in range(200)
)
# Real news is short, uneven and multilingual: snippets, non-Latin scripts, emoji, a title holding
# template-like braces, and articles far past 512 tokens (truncated). (title, content) pairs.
MIXED_ARTICLES: list[tuple[str, str]] = [
    ("Volunteers rebuild flooded village library", "More than two hundred residents reshelved forty thousand books."),
    ("Short", "Yes."),
    ("河流清理行动", "数百名志愿者周末清理了河岸，收集了三吨垃圾。当地学校的学生也参加了。"),
    ("مدينة تفتتح حديقة عامة جديدة", "افتتحت البلدية حديقة تضم ملعباً للأطفال ومكتبة صغيرة في الهواء الطلق."),
    ("गाँव में सौर ऊर्जा", "ग्रामीणों ने मिलकर सौर पैनल लगाए और अब स्कूल में रात को भी बिजली रहती है।"),
    ("Волонтёры восстановили школу", "Занятия возобновятся в понедельник 🎉 после наводнения."),
    ("Ο καιρός {content} και οι αγορές", "Τα νοικοκυριά εξοικονόμησαν ενέργεια τον χειμώνα {title}."),
    ("Cooperative rebuilds homes after the storm", _LONG_BODY),
    ("长篇报道：社区互助", "邻居们互相帮助，修复了房屋。" * 150),
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run only where CUDA is. Slow tests always run unless deselected (``-m "not slow"``)."""
    has_gpu = shutil.which("nvidia-smi") is not None
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def standin(tmp_path_factory: pytest.TempPathFactory):
    from filterserve.export.standin import build_standin

    return build_standin(tmp_path_factory.mktemp("standin"), UPLIFTING_V4)


def export_into(repo: Path, made, spec: FilterSpec, **options) -> dict:
    """``export_filter`` of a stand-in or trained fixture (anything with ``base_dir`` and
    ``adapter_dir``) as the tests export it: at a max batch size of 16 unless told otherwise."""
    from filterserve.export.pipeline import export_filter

    return export_filter(str(made.base_dir), made.adapter_dir, repo, spec, **{"max_batch_size": 16, **options})


@pytest.fixture(scope="session")
def exported(standin, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The stand-in exported in fp32 (default, served) and fp16: ``(repository, manifest)``."""
    repo = tmp_path_factory.mktemp("export") / "repo"
    return repo, export_into(repo, standin, UPLIFTING_V4, precisions="fp32,fp16")


@pytest.fixture(scope="module")
def server(exported):
    """The real tritonserver serving ``exported``: one per test module that asks, stopped after it.

    A module that serves another export overrides ``exported`` (test_qwen_tokenizer); one that
    serves a changed copy or several filters defines its own ``server``."""
    from filterserve.serve import TritonServer

    with TritonServer(exported[0]) as running:
        yield running


def peft_scorer(standin, spec: FilterSpec):
    """The card's recipe (PyTorch + PEFT, unmerged) for one stand-in: ``score(texts) → [n, dims]``."""
    from filterserve.export.load import load_reference
    from filterserve.export.parity import reference_scores

    loaded = load_reference(str(standin.base_dir), standin.adapter_dir, spec)

    def score(texts: list[str]):
        return reference_scores(loaded.model, loaded.tokenizer, texts, spec.max_length)

    score.tokenizer = loaded.tokenizer  # type: ignore[attr-defined]
    return score


@pytest.fixture(scope="session")
def reference(standin):
    """The card's recipe for the uplifting stand-in, to score any text in tests."""
    return peft_scorer(standin, UPLIFTING_V4)


@pytest.fixture(scope="session")
def five_standin(tmp_path_factory: pytest.TempPathFactory):
    """A 5-dimension sibling filter (investment-risk v2's shape) on the same base."""
    from filterserve.export.standin import build_standin

    return build_standin(tmp_path_factory.mktemp("five_standin"), FIVE_DIMS, seed=1)


@pytest.fixture(scope="session")
def five_reference(five_standin):
    return peft_scorer(five_standin, FIVE_DIMS)


@pytest.fixture(scope="session")
def multi_exported(standin, five_standin, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One repository holding the 8-dimension and the 5-dimension filter, exported one after the other."""
    repo = tmp_path_factory.mktemp("multi") / "repo"
    export_into(repo, standin, UPLIFTING_V4)
    export_into(repo, five_standin, FIVE_DIMS)
    return repo


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under ``root`` (folders show as their files)."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A small filter trained on generated labelled articles: accuracy figures mean something."""
    from filterserve.benchmarks.trained_fixture import build_trained_fixture

    return build_trained_fixture(tmp_path_factory.mktemp("trained"), UPLIFTING_V4, steps=300)


def perturb_head(src: Path, dst: Path, column: int, factor: float) -> None:
    """A deliberately wrong variant: one dimension's column of the fp32 score head scaled.

    The head is the one initializer of shape [hidden, n_dims] (kept fp32 in INT8 models too).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    n_dims = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    head = next(i for i in model.graph.initializer if len(i.dims) == 2 and i.dims[1] == n_dims and i.dims[0] > 1)
    weights = numpy_helper.to_array(head).copy()
    weights[:, column] *= factor
    head.CopyFrom(numpy_helper.from_array(weights, head.name))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Two filters on one base (the shared-base tests): 8 dimensions at LoRA rank 16 (scaling 1), 5 at rank 8 (scaling 2)."""
    from filterserve.export.standin import build_standin

    root = tmp_path_factory.mktemp("family")
    eight = build_standin(root / "eight", UPLIFTING_V4, rank=16)
    five = build_standin(root / "five", FIVE_DIMS, rank=8, on_base=eight, seed=1)
    return eight, five
