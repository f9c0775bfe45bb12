"""Stage 1 exported as a kind of plan: one embedder per repository, shared by every filter that names
it, and each filter's probe (read without running the pickle, converted with the scaler folded, its
pin enforced) as a model of its own, with its settings in the filter's record (issue 26)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from filterserve import contract
from filterserve.cli import main
from filterserve.errors import FilterServeError
from filterserve.filter_loader import load_filter
from filterserve.hybrid_settings import read_hybrid_settings
from filterserve.manifest import FilterRecord, read_embedder_records, read_filter_record, to_json
from filterserve.model_repository.repository import hybrid_models
from tests.probe_fixtures import production_probe, write_production_probe
from tests.test_filter_folder import write_folder
from tests.test_hybrid_settings import PROBE, default_threshold_hybrid

E5_WIDTH = 32  # the stand-in e5's (multilingual-e5-small's is 384)


def hybrid_folder(root: Path, threshold: str = "1.0", embedder: str = "intfloat/multilingual-e5-small", seed: int = 0):
    """A made-up production folder (3 dimensions) shipping inference_hybrid.py and a probe pickle as production writes it."""
    folder = write_folder(root)
    (folder / "inference_hybrid.py").write_text(default_threshold_hybrid(threshold, embedder), encoding="utf-8")
    scaler, mlp = production_probe(3, seed, input_dim=E5_WIDTH)
    write_production_probe(folder / PROBE, scaler, mlp)
    return folder, scaler, mlp


def stage1_estimates(e5: Path, scaler, mlp, articles: list[tuple[str, str]], weights) -> np.ndarray:
    """Production's stage 1 (EmbeddingStage.screen_batch): encode, scaler + MLP, clamp, Σ wᵢ·sᵢ."""
    from sentence_transformers import SentenceTransformer

    from filterserve.export.embedder import embedder_text
    from tests.probe_fixtures import reference_scores

    embedded = SentenceTransformer(str(e5), device="cpu").encode([embedder_text(t, c) for t, c in articles], batch_size=16)
    return np.clip(reference_scores(scaler, mlp, embedded), 0.0, 10.0) @ np.asarray(weights)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A stand-in e5, a hybrid folder whose threshold routes about half of MIXED_ARTICLES to stage 2,
    and the stage-2 stand-in for its filter."""
    from filterserve.export.standin import build_e5_standin, build_standin
    from tests.conftest import MIXED_ARTICLES

    root = tmp_path_factory.mktemp("stage1")
    e5 = build_e5_standin(root / "e5")
    folder, scaler, mlp = hybrid_folder(root / "filters" / "made_up" / "v7")
    spec = load_filter(folder)
    estimates = np.sort(stage1_estimates(e5, scaler, mlp, MIXED_ARTICLES, spec.weights))
    middle = len(estimates) // 2
    threshold = round(float(estimates[middle - 1] + estimates[middle]) / 2, 6)  # between two rows, far from both
    (folder / "inference_hybrid.py").write_text(default_threshold_hybrid(repr(threshold)), encoding="utf-8")
    return {"e5": e5, "folder": folder, "spec": spec, "scaler": scaler, "mlp": mlp, "threshold": threshold,
            "stage2": build_standin(root / "standin", spec)}


def export(repo: Path, stage1: dict, **options) -> dict:
    from filterserve.export.pipeline import export_filter

    made = stage1["stage2"]
    options = {"hybrid": read_hybrid_settings(stage1["folder"]), "stage1_model": str(stage1["e5"]), "max_batch_size": 8,
               **options}
    return export_filter(str(made.base_dir), made.adapter_dir, repo, options.pop("spec", stage1["spec"]), **options)


@pytest.fixture(scope="module")
def hybrid_repo(stage1, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("hybrid") / "repo"
    export(repo, stage1)
    return repo


def test_the_embedder_and_the_probe_are_models_of_the_repository(hybrid_repo, stage1):
    record = read_filter_record(hybrid_repo, "made_up_v7")
    assert set(hybrid_models("made_up_v7")) <= set(record.models)
    assert (hybrid_repo / contract.probe_model("made_up_v7") / "1" / "model.onnx").is_file()
    assert not list(hybrid_repo.rglob("*.pkl"))  # the repository holds ONNX, never the pickle
    hybrid = record.hybrid
    assert hybrid is not None
    assert (hybrid.threshold, hybrid.threshold_from_config, hybrid.embedder) == (stage1["threshold"], False, contract.EMBEDDER)
    assert hybrid.threshold_source.endswith("inference_hybrid.py DEFAULT_THRESHOLD (line 20)")
    assert hybrid.probe_sha256 == read_hybrid_settings(stage1["folder"]).probe_sha256
    assert hybrid.embedder_source == "intfloat/multilingual-e5-small" and hybrid.parity.passed
    embedders = read_embedder_records(hybrid_repo)
    assert list(embedders) == [contract.EMBEDDER]
    embedder = embedders[contract.EMBEDDER]
    assert embedder.model_id == "intfloat/multilingual-e5-small" and embedder.source.path == str(stage1["e5"].resolve())
    assert embedder.parity["fp32"].max_abs_diff <= contract.EMBEDDING_TOLERANCE and embedder.width == E5_WIDTH
    for model in embedder.models:
        assert (hybrid_repo / model / "config.pbtxt").is_file()


def test_a_second_filter_naming_the_same_embedder_reuses_it(hybrid_repo, stage1, tmp_path, capsys):
    repo = tmp_path / "repo"
    shutil.copytree(hybrid_repo, repo)
    before = (repo / "stage1_embedder.embedder.json").read_bytes()
    export(repo, stage1, spec=replace(stage1["spec"], name="made_up_twin"), stage1_model=None)
    assert (repo / "stage1_embedder.embedder.json").read_bytes() == before  # not rebuilt
    assert "already exported" in capsys.readouterr().err
    assert read_filter_record(repo, "made_up_twin").hybrid.embedder == contract.EMBEDDER


def test_another_embedder_in_the_same_repository_is_refused_in_one_line(hybrid_repo, stage1, tmp_path):
    folder, _, _ = hybrid_folder(tmp_path / "large" / "v7", embedder="intfloat/multilingual-e5-large")
    with pytest.raises(FilterServeError, match=r"serves the stage-1 embedder intfloat/multilingual-e5-small .* names "
                       r"intfloat/multilingual-e5-large: a repository holds one embedder") as info:
        export(hybrid_repo, stage1, hybrid=read_hybrid_settings(folder), spec=replace(stage1["spec"], name="large"))
    assert "\n" not in str(info.value)
    e5_copy = tmp_path / "other-e5"
    from filterserve.export.standin import build_e5_standin

    build_e5_standin(e5_copy, seed=1)
    with pytest.raises(FilterServeError, match="is another model: leave out --stage1-model to reuse it"):
        export(hybrid_repo, stage1, stage1_model=str(e5_copy), spec=replace(stage1["spec"], name="other"))


def test_no_hybrid_exports_stage_2_alone_and_says_results_differ(stage1, tmp_path, capsys):
    made = stage1["stage2"]
    argv = ["export", "--base", str(made.base_dir), "--adapter", str(made.adapter_dir), "--filter", str(stage1["folder"]),
            "--out", str(tmp_path / "repo")]
    assert main([*argv, "--no-hybrid", "--stage1-model", str(stage1["e5"])]) == 2
    assert "--stage1-model gives the stage-1 embedder, but this export has no stage 1" in capsys.readouterr().err
    assert main([*argv, "--no-hybrid"]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("--no-hybrid"))
    assert "stage 2 alone" in line and f"below {stage1['threshold']:g}" in line and "differ from production" in line
    record = read_filter_record(tmp_path / "repo", "made_up_v7")
    assert record.hybrid is None and contract.probe_model("made_up_v7") not in record.models
    assert read_embedder_records(tmp_path / "repo") == {}


def test_a_probe_that_does_not_fit_the_filter_is_refused_before_the_model_loads(stage1, tmp_path):
    folder = write_folder(tmp_path / "made_up" / "v7")
    (folder / "inference_hybrid.py").write_text(default_threshold_hybrid("1.0"), encoding="utf-8")
    scaler, mlp = production_probe(5, 0, input_dim=E5_WIDTH)
    write_production_probe(folder / PROBE, scaler, mlp)
    with pytest.raises(FilterServeError, match=r"embedding_probe_e5small.pkl scores 5 dimensions, filter 'made_up_v7' has 3"):
        export(tmp_path / "repo", stage1, hybrid=read_hybrid_settings(folder))


def test_a_record_written_before_stage_1_still_reads(hybrid_repo, tmp_path):
    data = to_json(read_filter_record(hybrid_repo, "made_up_v7"))
    del data["hybrid"]
    (tmp_path / "old.filter.json").write_text(json.dumps(data))
    assert FilterRecord.read(tmp_path / "old.filter.json").hybrid is None


@pytest.fixture(scope="module")
def server(hybrid_repo):
    from filterserve.serve import TritonServer

    with TritonServer(hybrid_repo) as running:
        yield running


@pytest.mark.timeout(300)
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_served_embedder_and_probe_equal_sentence_transformers_and_productions_probe(server, stage1, protocol):
    """A plain tritonclient gets encode's embedding for an article (title + content joined by the
    server, texts past 512 tokens truncated as the tokenizer does), and the probe's scores for it
    as production computes them: scaler.transform, then the MLP in eval mode."""
    from sentence_transformers import SentenceTransformer

    from filterserve.export.embedder import embedder_text
    from tests.conftest import MIXED_ARTICLES
    from tests.helpers import CLIENTS, bytes_input, triton_client
    from tests.probe_fixtures import reference_scores

    encoder = SentenceTransformer(str(stage1["e5"]), device="cpu")
    expected = encoder.encode([embedder_text(t, c) for t, c in MIXED_ARTICLES], batch_size=16)
    assert max(len(encoder.tokenizer(embedder_text(t, c))["input_ids"]) for t, c in MIXED_ARTICLES) > 512
    client = triton_client(server, protocol)
    got = np.concatenate([
        client.infer(contract.EMBEDDER, [bytes_input(protocol, contract.TITLE, [t]), bytes_input(protocol, contract.CONTENT, [c])])
        .as_numpy(contract.EMBEDDING) for t, c in MIXED_ARTICLES  # one request each, as services send them
    ])
    assert np.abs(got - expected).max() <= contract.EMBEDDING_TOLERANCE
    title_only = client.infer(contract.EMBEDDER, [bytes_input(protocol, contract.TEXT, [MIXED_ARTICLES[0][0]])])
    assert np.abs(title_only.as_numpy(contract.EMBEDDING)[0] - encoder.encode([MIXED_ARTICLES[0][0]])[0]).max() <= 1e-4

    def probe(rows: np.ndarray) -> np.ndarray:
        embedding = CLIENTS[protocol].InferInput(contract.EMBEDDING, list(rows.shape), "FP32")
        embedding.set_data_from_numpy(rows.astype(np.float32))
        return client.infer(contract.probe_model("made_up_v7"), [embedding]).as_numpy(contract.PROBE_SCORES)

    scores = np.concatenate([probe(got[:8]), probe(got[8:])])  # within the exported max batch size, 8
    production = reference_scores(stage1["scaler"], stage1["mlp"], expected)
    assert scores.shape == (len(MIXED_ARTICLES), 3)
    assert np.abs(scores - production).max() <= 1e-4


@pytest.mark.timeout(300)
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_one_call_to_the_filter_routes_only_rows_above_the_threshold_to_stage_2(server, stage1, protocol):
    """A plain tritonclient calling <name> gets production's hybrid: every row's stage-1 estimate,
    the probe's clamped scores for the rows below the threshold, stage 2's answer for the others,
    and stage 2 ran only those rows (its tensor model's row count rises by exactly their number)."""
    from tests.conftest import MIXED_ARTICLES
    from tests.helpers import bytes_input, triton_client

    spec = stage1["spec"]
    estimates = stage1_estimates(stage1["e5"], stage1["scaler"], stage1["mlp"], MIXED_ARTICLES, spec.weights)
    routed = estimates >= stage1["threshold"]
    assert 0 < routed.sum() < len(routed)
    client = triton_client(server, protocol)

    def rows_through_stage2() -> int:
        stats = client.get_inference_statistics(contract.tensor_model(spec.name), **({"as_json": True} if protocol == "grpc" else {}))
        return int(stats["model_stats"][0].get("inference_count", 0))

    def call(model: str, articles: list[tuple[str, str]]):
        return client.infer(model, [bytes_input(protocol, contract.TITLE, [t for t, _ in articles]),
                                    bytes_input(protocol, contract.CONTENT, [c for _, c in articles])])

    before = rows_through_stage2()
    result = call(spec.name, MIXED_ARTICLES[:8])  # within the exported max batch size
    assert rows_through_stage2() - before == int(routed[:8].sum())
    used = [v[0].decode() for v in result.as_numpy(contract.STAGE_USED)]
    assert used == [contract.STAGE2 if r else contract.STAGE1_LOW for r in routed[:8]]
    np.testing.assert_allclose(result.as_numpy(contract.STAGE1_ESTIMATE)[:, 0], estimates[:8], atol=1e-3)
    stage2 = call(contract.stage2_model(spec.name), MIXED_ARTICLES[:8])
    scores = result.as_numpy(contract.SCORES)
    for i in np.flatnonzero(routed[:8]):
        assert np.abs(scores[i] - stage2.as_numpy(contract.SCORES)[i]).max() <= contract.SERVED_TOLERANCE
        assert result.as_numpy(contract.TIER)[i, 0] == stage2.as_numpy(contract.TIER)[i, 0]
    for i in np.flatnonzero(~routed[:8]):
        assert (scores[i] >= 0).all() and (scores[i] <= 10).all()
        # The raw average is the stage-1 average (no cap fires here); weighted_average is its normalization.
        assert result.as_numpy(contract.RAW_WEIGHTED_AVERAGE)[i, 0] == pytest.approx(estimates[i], abs=1e-3)
        assert not result.as_numpy(contract.SHORT_CONTENT_CAP_APPLIED)[i, 0]
        assert not result.as_numpy(contract.GATEKEEPER_APPLIED)[i, 0]
        # The screened row's tier is the op-point on its stage-1 average, through the filter's own decision step.
        reached = [k for k, tier in enumerate(spec.tiers) if estimates[i] >= tier.threshold]
        assert result.as_numpy(contract.TIER)[i, 0] == (reached[0] if reached else contract.NO_TIER_INDEX)
    # Both stages stamp the length production measures (the content's code points), on every row.
    assert result.as_numpy(contract.CONTENT_LENGTH)[:, 0].tolist() == [len(c) for _, c in MIXED_ARTICLES[:8]]


@pytest.mark.timeout(300)
def test_the_client_finds_the_hybrid_filter_once_and_scores_through_it(server, stage1):
    """Discovery lists <name> alone (not the embedder, not the stage-2 ensemble), and FilterClient's
    scores are the one call's."""
    from filterserve.client.filter_client import FilterClient
    from tests.conftest import MIXED_ARTICLES
    from tests.helpers import bytes_input, triton_client

    title, content = MIXED_ARTICLES[0]
    with FilterClient(server.grpc_url, "grpc") as client:
        assert client.model == stage1["spec"].name
        result = client.score(title, content)
    direct = triton_client(server, "grpc").infer(
        stage1["spec"].name, [bytes_input("grpc", contract.TITLE, [title]), bytes_input("grpc", contract.CONTENT, [content])])
    np.testing.assert_allclose(list(result.scores.values()), direct.as_numpy(contract.SCORES)[0], atol=1e-6)
    # The hybrid's stamps reach the client's result (and so `score` and the drop-in's dicts).
    assert result.stage_used == direct.as_numpy(contract.STAGE_USED)[0, 0].decode() in (contract.STAGE1_LOW, contract.STAGE2)
    assert result.stage1_estimate == pytest.approx(float(direct.as_numpy(contract.STAGE1_ESTIMATE)[0, 0]), abs=1e-6)
