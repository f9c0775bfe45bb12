"""A shared-base tensor model (issue 21): one base, each member's LoRA and head chosen per row, in plain ONNX ops."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import FIVE_DIMS

from filterserve.errors import FilterServeError, ParityError
from filterserve.export.parity import ort_scores, ort_session
from filterserve.export.shared_base import (
    MemberReference,
    MemberSource,
    check_group_parity,
    check_trained_on,
    export_group,
    load_members,
    onnx_group_scorer,
)
from filterserve.export.standin import StandinShape, build_standin
from filterserve.filters import UPLIFTING_V4
from filterserve.progress import Steps


@pytest.fixture(scope="module")
def group(family, tmp_path_factory):
    eight, five = family
    members = [MemberSource(UPLIFTING_V4, eight.adapter_dir), MemberSource(FIVE_DIMS, five.adapter_dir)]
    loaded = load_members(str(eight.base_dir), members, "family", Steps(total=2))
    path = tmp_path_factory.mktemp("group") / "family_onnx" / "1" / "model.onnx"
    batch = export_group(str(eight.base_dir), loaded, path)
    return path, loaded, batch


def test_every_member_matches_its_own_peft_reference_on_rows_that_mix_filters(group):
    path, loaded, batch = group
    assert batch.filter_index[:4, 0].tolist() == [0, 1, 0, 1], "neighbouring rows belong to different filters"
    parity = check_group_parity(onnx_group_scorer(path), loaded.references, batch, "fp32", "shared fp32")
    assert set(parity) == {"uplifting_v4", "investment_risk_v2"}
    for record in parity.values():
        assert record.passed and record.max_abs_diff <= 1e-4 and record.n_texts == 7
    assert [w.rank for w in loaded.weights] == [16, 8]


def test_the_filter_is_chosen_per_row_not_per_batch(group):
    """The 5-dimension filter's texts scored as the 8-dimension filter's give other scores: the index is read per row."""
    path, loaded, batch = group
    session = ort_session(path)
    five = loaded.references[1]
    rows = batch.rows[1]
    ids, mask = batch.ids[rows], batch.mask[rows]
    own, _ = ort_scores(session, ids, mask, np.ones((len(rows), 1), dtype=np.int64))
    other, _ = ort_scores(session, ids, mask, np.zeros((len(rows), 1), dtype=np.int64))
    assert np.abs(own[:, :5] - five.scores).max() <= 1e-4
    assert np.abs(other[:, :5] - five.scores).max() > 0.05
    assert np.all(own[:, 5:] == 0), "columns past a member's dimensions are zero"


def test_one_row_alone_scores_as_in_the_mixed_batch(group):
    """Batch 1 at its own length: the batch and sequence axes are dynamic and padding does not move a score."""
    path, loaded, _ = group
    session = ort_session(path)
    for index, reference in enumerate(loaded.references):
        tokens = reference.rows[0]
        ids = np.array([tokens], dtype=np.int64)
        logits, weighted = ort_scores(session, ids, np.ones_like(ids), np.array([[index]], dtype=np.int64))
        n = reference.spec.num_labels
        assert np.abs(logits[0, :n] - reference.scores[0]).max() <= 1e-4
        assert abs(weighted[0, 0] - reference.weighted[0]) <= 1e-4


def test_the_graph_holds_the_base_once_and_uses_plain_onnx_ops(group):
    """Standard-domain ops only (Gather + MatMul for the selection), LoRA stacked [members, in, r_max]."""
    path, loaded, _ = group
    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(node.op_type for node in model.graph.node)
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    assert "Einsum" not in ops and ops["Gather"] >= 7 * 2 * 2, ops  # 7 projections × 2 layers × (A, B)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "filter_index"]
    shapes = {tuple(t.dims) for t in model.graph.initializer}
    assert (2, 64, 16) in shapes, "q_proj's A: 2 members, 64 wide, ranks padded to 16"
    assert (2, 64, 8) in shapes, "the head: 2 members, hidden 64, the widest member's 8 dimensions"
    embeddings = [t for t in model.graph.initializer if tuple(t.dims) == (2048, 64)]
    assert len(embeddings) == 1, "one embedding table, not one per member"


def test_a_member_off_its_reference_fails_naming_it(group):
    path, loaded, batch = group
    eight, five = loaded.references
    off = MemberReference(five.spec, five.texts, five.rows, five.scores + 2e-4)
    with pytest.raises(ParityError, match=r"member investment_risk_v2 .* max \|Δ\| = 0\.0002\d* > tolerance 0\.0001"):
        check_group_parity(onnx_group_scorer(path), [eight, off], batch, "fp32", "shared fp32")


def test_an_adapter_made_for_another_base_is_refused(family, tmp_path):
    eight, _ = family
    other = build_standin(tmp_path / "other", UPLIFTING_V4, seed=7)
    config = json.loads((other.adapter_dir / "adapter_config.json").read_text())
    with pytest.raises(FilterServeError, match=r"was made for .*other/base, whose weights differ from .*eight/base \(same architecture"):
        check_trained_on(other.adapter_dir, config, str(eight.base_dir), [])
    narrow = build_standin(tmp_path / "narrow", UPLIFTING_V4, shape=StandinShape(hidden_size=32, intermediate_size=64))
    config = json.loads((narrow.adapter_dir / "adapter_config.json").read_text())
    with pytest.raises(FilterServeError, match=r"whose architecture differs from .*: hidden_size 32 vs 64; intermediate_size 64 vs 128"):
        check_trained_on(narrow.adapter_dir, config, str(eight.base_dir), [])
    hub = {**config, "base_model_name_or_path": "Qwen/Qwen2.5-0.5B"}
    with pytest.raises(FilterServeError, match=r"was made for Qwen/Qwen2.5-0.5B, but the group's base is Qwen/Qwen2.5-1.5B"):
        check_trained_on(narrow.adapter_dir, hub, str(eight.base_dir), ["Qwen/Qwen2.5-1.5B"])
    check_trained_on(narrow.adapter_dir, {**hub, "base_model_name_or_path": "qwen2.5-1.5b"}, str(eight.base_dir), ["Qwen/Qwen2.5-1.5B"])


def test_a_member_with_another_vocabulary_is_refused_before_any_model_loads(family, tmp_path):
    from transformers import AutoTokenizer

    eight, five = family
    changed = tmp_path / "changed"
    shutil.copytree(five.adapter_dir, changed)
    tokenizer = AutoTokenizer.from_pretrained(str(changed))
    tokenizer.add_tokens(["<|filter_token|>"])
    tokenizer.save_pretrained(changed)
    members = [MemberSource(UPLIFTING_V4, eight.adapter_dir), MemberSource(FIVE_DIMS, changed)]
    steps = Steps(total=2)
    other_vocabulary = (r"tokenizer in .*changed has another vocabulary than group family's "
                        r"\(\d+ vs \d+ tokens; differing: '<\|filter_token\|>'")
    with pytest.raises(FilterServeError, match=other_vocabulary):
        load_members(str(eight.base_dir), members, "family", steps)
    assert steps.timings == {}, "refused before loading any model"


def test_an_adapter_that_trains_other_base_layers_is_refused(family, tmp_path):
    """modules_to_save besides the head would be a per-filter copy of a base layer: no longer one shared base."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForSequenceClassification

    eight, _ = family
    model = Qwen2ForSequenceClassification.from_pretrained(eight.base_dir, num_labels=5)
    lora = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj"], modules_to_save=["score", "norm"])
    adapter = tmp_path / "norm_adapter"
    get_peft_model(model, lora).save_pretrained(adapter)
    shutil.copy(eight.adapter_dir / "tokenizer.json", adapter)
    shutil.copy(eight.adapter_dir / "tokenizer_config.json", adapter)
    own_copy = r"saves its own trained copy of model\.layers\.0\.input_layernorm: members of a shared base may differ only"
    with pytest.raises(FilterServeError, match=own_copy):
        load_members(str(eight.base_dir), [MemberSource(FIVE_DIMS, adapter)], "family", Steps(total=1))


def test_a_gemma3_family_shares_its_base_too(tmp_path):
    """The production deployment's base: Gemma-3 (sliding and full attention layers, pad id 0, BOS added)."""
    shape = StandinShape.gemma3_tiny()
    eight = build_standin(tmp_path / "eight", UPLIFTING_V4, shape=shape)
    five = build_standin(tmp_path / "five", FIVE_DIMS, shape=shape, rank=8, on_base=eight, seed=1)
    members = [MemberSource(UPLIFTING_V4, eight.adapter_dir), MemberSource(FIVE_DIMS, five.adapter_dir)]
    loaded = load_members(str(eight.base_dir), members, "gemma", Steps(total=2))
    assert loaded.pad_token_id == 0 and [w.rank for w in loaded.weights] == [16, 8]
    path = tmp_path / "gemma_onnx" / "1" / "model.onnx"
    batch = export_group(str(eight.base_dir), loaded, path)
    parity = check_group_parity(onnx_group_scorer(path), loaded.references, batch, "fp32", "shared fp32")
    assert all(p.max_abs_diff <= 1e-4 for p in parity.values())
