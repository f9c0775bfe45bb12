"""The stage-1 embedder: a stand-in e5 in sentence-transformers' layout, loaded as production loads it
(``SentenceTransformer(path)``), exported to ONNX with the mean pooling and the normalization in the
graph, and held to ``SentenceTransformer.encode`` within 1e-4 on texts past 512 tokens too."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from filterserve import contract
from filterserve.errors import FilterServeError, ParityError
from filterserve.export.embedder import (
    check_parity,
    embed,
    embedder_text,
    export_embedder,
    load_embedder,
    parity_texts,
    read_layout,
)
from filterserve.export.parity import encode


@pytest.fixture(scope="module")
def e5(tmp_path_factory):
    from filterserve.export.standin import build_e5_standin

    return build_e5_standin(tmp_path_factory.mktemp("e5") / "multilingual-e5-small")


@pytest.fixture(scope="module")
def loaded(e5):
    return load_embedder(str(e5))


@pytest.fixture(scope="module")
def exported(loaded, tmp_path_factory):
    texts = parity_texts(loaded.tokenizer, loaded.max_length)
    return export_embedder(loaded, texts, tmp_path_factory.mktemp("onnx") / "model.onnx"), texts


def test_the_standin_has_multilingual_e5_smalls_layout(e5, loaded):
    modules = json.loads((e5 / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert json.loads((e5 / "sentence_bert_config.json").read_text())["max_seq_length"] == 512
    assert json.loads((e5 / "config.json").read_text())["architectures"] == ["BertModel"]
    assert json.loads((e5 / "tokenizer_config.json").read_text())["tokenizer_class"] == "XLMRobertaTokenizer"
    assert (loaded.max_length, loaded.pad_token_id, loaded.layout.normalize) == (512, 1, True)
    assert loaded.tokenizer("a")["input_ids"][0] == 0 and loaded.tokenizer("a")["input_ids"][-1] == 2  # <s> text </s>
    norms = np.linalg.norm(loaded.encode(["Neighbours rebuilt the library"]), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)


def test_production_joins_title_and_content_with_no_prefix():
    assert embedder_text("T", "C") == "T\n\nC"
    assert (embedder_text("T", ""), embedder_text("", "C")) == ("T", "C")


def test_the_onnx_embedder_matches_sentence_transformers_encode(loaded, exported):
    path, texts = exported
    lengths = [len(loaded.tokenizer(t)["input_ids"]) for t in texts]
    assert max(lengths) > 512  # truncated as the tokenizer does
    record = check_parity(loaded, path, texts)
    assert record.passed and record.max_abs_diff <= contract.EMBEDDING_TOLERANCE
    assert record.n_texts == len(texts) and record.against == "SentenceTransformer.encode"
    # Padding does not move an embedding: one text alone equals its row in a padded batch.
    ids, mask = encode(loaded.tokenizer, texts[:1], loaded.max_length)
    alone = embed(path, ids, mask)
    ids, mask = encode(loaded.tokenizer, texts, loaded.max_length)
    np.testing.assert_allclose(embed(path, ids, mask)[:1], alone, atol=1e-6)


def test_an_embedder_off_by_more_than_the_bound_fails_the_export(loaded, exported, tmp_path):
    """The graph without its Normalize step is not encode's: the export refuses it."""
    _, texts = exported
    unnormalized = replace(loaded, layout=replace(loaded.layout, normalize=False))
    path = export_embedder(unnormalized, texts, tmp_path / "model.onnx")
    with pytest.raises(ParityError, match="SentenceTransformer.encode"):
        check_parity(loaded, path, texts)


def _copy(e5: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "other"
    shutil.copytree(e5, folder)
    return folder


def test_a_pooling_other_than_the_mean_is_refused_in_one_line(e5, tmp_path):
    folder = _copy(e5, tmp_path)
    config = json.loads((folder / "1_Pooling" / "config.json").read_text())
    config.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FilterServeError, match=r"1_Pooling/config.json pools by cls_token: .*mean pooling only") as info:
        read_layout(folder)
    assert "\n" not in str(info.value)


def test_a_module_layout_other_than_e5s_is_refused_in_one_line(e5, tmp_path):
    folder = _copy(e5, tmp_path)
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    modules[-1]["idx"] = 3
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(FilterServeError, match="declares Transformer → Pooling → Dense → Normalize"):
        load_embedder(str(folder))


def test_a_missing_folder_or_an_unreachable_hub_id_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(FilterServeError, match=r"^stage-1 embedder not found: \./no-such-e5 \(no such folder"):
        load_embedder("./no-such-e5")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FilterServeError, match="'filterserve-no-such-org/no-e5' is not a folder, not in the local Hugging Face cache"):
        load_embedder("filterserve-no-such-org/no-e5")
