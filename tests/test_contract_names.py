"""Every Triton model and tensor name that model_repository/ writes or reads comes from contract.py.

A name typed twice drifts: renaming ``n_tokens`` in the contract would leave a step that still
answers the old name, and only a served request would tell. So the code that writes a repository
and the code that runs inside Triton (the tokenizer step, which runs without this package, loads
the copy of contract.py the writer puts beside it) name them through the contract, and this test
reads the source (``ast``) for any of the contract's values written as a literal.
"""

from __future__ import annotations

import ast
from pathlib import Path

from filterserve import contract

ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = ROOT / "model_repository"


def _contract_names() -> set[str]:
    """The contract's string constants and the members of its name tuples. Precision lists
    (OPENVINO_PRECISIONS, GROUP_PRECISIONS) name variants, not models or tensors."""
    names = set()
    for attribute, value in vars(contract).items():
        if not attribute.isupper() or "PRECISION" in attribute:
            continue
        if isinstance(value, str):
            names.add(value)
        elif isinstance(value, tuple) and all(isinstance(v, str) for v in value):
            names.update(value)
    return names


def _model_suffixes() -> set[str]:
    """What the contract's model-name functions append to a filter's name (``_tokenizer``, ...)."""
    return {contract.tokenizer_model(""), contract.decision_model(""), contract.tensor_model("")}


def _literals(path: Path) -> list[tuple[int, str]]:
    """Every string literal of a file (docstrings and the text parts of f-strings included), with its line."""
    return [(node.lineno, node.value) for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_the_contract_names_what_the_scan_looks_for():
    names = _contract_names()
    assert {contract.TEXT, *contract.TOKEN_INPUTS, contract.N_TOKENS, contract.FILTER_INDEX, contract.LOGITS,
            contract.SCORES, contract.TIER, contract.FILTER_PARAMETER, contract.REAL_TOKENS_METRIC} <= names
    assert "fp32" not in names
    assert _model_suffixes() == {"_tokenizer", "_decision", "_onnx"}


def test_no_model_or_tensor_name_is_typed_outside_the_contract():
    names, suffixes = _contract_names(), _model_suffixes()
    files = sorted(MODEL_REPOSITORY.rglob("*.py"))
    assert any(p.name == "tokenizer_model.py" for p in files) and any(p.name == "model.py" for p in files)
    found = []
    for path in files:
        for line, text in _literals(path):
            if text in names:
                found.append(f"{path.relative_to(ROOT)}:{line}: {text!r} is a contract name")
            elif any(text.endswith(suffix) for suffix in suffixes):
                found.append(f"{path.relative_to(ROOT)}:{line}: {text!r} builds a model name (use contract's functions)")
    assert not found, "\n".join(found)


def test_the_tokenizer_step_carries_the_contract_it_reads(tmp_path: Path):
    """The step runs without filterserve installed (NVIDIA's container): its names come from the
    copy of contract.py beside its model.py, the same file byte for byte."""
    from toy_onnx import TOY_SPEC, build_toy_export

    toy = build_toy_export(tmp_path)
    version = toy.repo / contract.tokenizer_model(TOY_SPEC.name) / "1"
    assert (version / "contract.py").read_bytes() == Path(contract.__file__).read_bytes()
