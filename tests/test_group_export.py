"""``filterserve export --share-base`` (issue 21): filters of one base in one group, beside merged filters."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import FIVE_DIMS, MIXED_ARTICLES, peft_scorer, tree_digest

from filterserve import contract
from filterserve.errors import FilterServeError, ParityError
from filterserve.export import openvino_engine as ove
from filterserve.export.pipeline import export_filter
from filterserve.export.standin import build_standin
from filterserve.filters import UPLIFTING_V4
from filterserve.manifest import read_filter_records, read_group_records, to_json
from filterserve.serve.assembly import read_model_config

pytestmark = pytest.mark.slow  # every test here exports a group (or more) of its own, through the CLI

GROUP = "shared_base"
MERGED = replace(UPLIFTING_V4, name="uplifting_merged")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "filterserve.cli", *args], capture_output=True, text=True, timeout=600)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def grouped(family, tmp_path_factory) -> Path:
    """The two filters exported with --share-base (through the CLI, as a user would), and the 8-dimension one merged beside them."""
    eight, five = family
    repo = tmp_path_factory.mktemp("grouped") / "repo"
    for standin, spec in ((eight, UPLIFTING_V4), (five, FIVE_DIMS)):
        description = repo.parent / f"{spec.name}.json"
        description.write_text(json.dumps(spec.to_dict()), encoding="utf-8")
        done = _cli("export", "--base", str(standin.base_dir), "--adapter", str(standin.adapter_dir), "--filter", str(description),
                    "--out", str(repo), "--share-base", "--max-batch-size", "16")
        assert done.returncode == 0, done.stderr
    export_filter(str(eight.base_dir), eight.adapter_dir, repo, MERGED, max_batch_size=16)
    return repo


@pytest.fixture(scope="module")
def references(family):
    eight, five = family
    return {UPLIFTING_V4.name: peft_scorer(eight, UPLIFTING_V4), FIVE_DIMS.name: peft_scorer(five, FIVE_DIMS)}


def _copy(repo: Path, tmp_path: Path) -> Path:
    shutil.copytree(repo, tmp_path / "repo")
    return tmp_path / "repo"


def test_two_filters_of_different_sizes_share_one_tensor_model_beside_a_merged_filter(grouped):
    records, groups = read_filter_records(grouped), read_group_records(grouped)
    assert set(records) == {"investment_risk_v2", "uplifting_v4", "uplifting_merged"}
    group = groups[GROUP]
    assert group.members == ["investment_risk_v2", "uplifting_v4"] and group.width == 8
    assert to_json(group.lora) == {"investment_risk_v2": {"rank": 8, "layers": 14, "dimensions": 5},
                                   "uplifting_v4": {"rank": 16, "layers": 14, "dimensions": 8}}
    for index, name in enumerate(group.members):
        assert records[name].group.filter_index == index and records[name].tensor_models == {}
        assert group.parity["fp32"][name].max_abs_diff <= 1e-4
        tokenizer = read_model_config(grouped / f"{name}_tokenizer" / "config.pbtxt")
        assert tokenizer.parameters["filter_index"].string_value == str(index)
        assert tokenizer.parameters["tensor_model"].string_value == f"{GROUP}_onnx"
        decision = read_model_config(grouped / f"{name}_decision" / "config.pbtxt")
        # The group's logits are as wide as its widest member; the decision step's other inputs are one per row.
        assert {t.name: list(t.dims) for t in decision.input} == {"logits": [8], "CONTENT_LENGTH": [1], "screened": [1]}
        ensemble = read_model_config(grouped / name / "config.pbtxt")
        assert ensemble.ensemble_scheduling.step[1].model_name == f"{GROUP}_onnx"
        assert "filter_index" in ensemble.ensemble_scheduling.step[1].input_map
        assert [list(t.dims) for t in ensemble.output if t.name == contract.SCORES] == [[len(records[name].filter["dimensions"])]]
    tensor = read_model_config(grouped / f"{GROUP}_onnx" / "config.pbtxt")
    assert [t.name for t in tensor.input] == ["input_ids", "attention_mask", "filter_index"]
    assert json.loads(tensor.parameters["filters"].string_value) == group.members
    assert tensor.parameters["max_length"].string_value == "512", "the longest member's (investment_risk_v2 reads 256)"
    folders = {p.name for p in grouped.iterdir() if p.is_dir()}
    assert "uplifting_v4_onnx" not in folders and "investment_risk_v2_onnx" not in folders
    assert json.loads((grouped / "filterserve.json").read_text())["groups"] == {GROUP: f"{GROUP}.group.json"}


def test_the_group_holds_about_one_base_plus_the_adapters(grouped, family):
    """Its weights: one base (the merged model's) plus the members' LoRA, ranks padded to the largest (at most 2× here:
    rank 8 stacked with 16); its graph a few more nodes per layer; beside it, the adapter copies it is rebuilt from."""
    data = lambda model: (grouped / model / "1" / "model.onnx.data").stat().st_size  # noqa: E731
    graph = lambda model: (grouped / model / "1" / "model.onnx").stat().st_size  # noqa: E731
    lora = sum((s.adapter_dir / "adapter_model.safetensors").stat().st_size for s in family)
    assert data("uplifting_merged_onnx") < data(f"{GROUP}_onnx") <= data("uplifting_merged_onnx") + 2 * lora
    assert graph(f"{GROUP}_onnx") < 2 * graph("uplifting_merged_onnx")
    copies = grouped / f"{GROUP}_onnx" / contract.GROUP_ADAPTERS
    assert _folder_bytes(copies) == sum(_folder_bytes(s.adapter_dir) for s in family)


def test_a_failed_add_leaves_the_repository_byte_identical(grouped, family, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    repo = _copy(grouped, tmp_path)
    before = tree_digest(repo)
    eight, _ = family
    third = build_standin(tmp_path / "third", replace(FIVE_DIMS, name="third_filter"), rank=4, on_base=eight, seed=3)
    tokenizer = AutoTokenizer.from_pretrained(str(third.adapter_dir))
    tokenizer.add_tokens(["<|not_in_the_base|>"])
    tokenizer.save_pretrained(third.adapter_dir)
    with pytest.raises(FilterServeError, match=r"has another vocabulary than group shared_base's"):
        export_filter(str(eight.base_dir), third.adapter_dir, repo, replace(FIVE_DIMS, name="third_filter"), share_base=True)
    assert tree_digest(repo) == before

    # Late: the rebuilt group's parity fails after the ONNX file was written in staging.
    monkeypatch.setitem(contract.PARITY_TOLERANCES, "fp32", 1e-12)
    with pytest.raises(ParityError, match=r"group shared_base fp32, member investment_risk_v2"):
        export_filter(str(eight.base_dir), eight.adapter_dir, repo, UPLIFTING_V4, share_base=True)
    assert tree_digest(repo) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo", "third"], "no staging folder left behind"


def test_a_member_is_exported_again_and_a_different_adapter_needs_force(grouped, family, tmp_path):
    repo = _copy(grouped, tmp_path)
    eight, five = family
    merged_before = {k: v for k, v in tree_digest(repo).items() if k.startswith("uplifting_merged")}
    record = export_filter(str(eight.base_dir), eight.adapter_dir, repo, UPLIFTING_V4, share_base=True)
    assert record["group"]["filter_index"] == 1
    assert {k: v for k, v in tree_digest(repo).items() if k.startswith("uplifting_merged")} == merged_before
    with pytest.raises(FilterServeError, match=r"already holds a different export of filter 'uplifting_v4'.*--force"):
        export_filter(str(eight.base_dir), five.adapter_dir, repo, replace(FIVE_DIMS, name="uplifting_v4"), share_base=True)


def test_a_member_cannot_be_exported_merged_while_in_its_group(grouped, family, tmp_path):
    repo = _copy(grouped, tmp_path)
    _, five = family
    before = tree_digest(repo)
    with pytest.raises(FilterServeError, match=r"investment_risk_v2 is a member of group shared_base.*--remove investment_risk_v2"):
        export_filter(str(five.base_dir), five.adapter_dir, repo, FIVE_DIMS, force=True)
    assert tree_digest(repo) == before


def test_removing_members_rebuilds_the_group_then_drops_it(grouped, family, tmp_path):
    repo = _copy(grouped, tmp_path)
    done = _cli("export", "--remove", "uplifting_v4", "--out", str(repo))
    assert done.returncode == 0, done.stderr
    group = read_group_records(repo)[GROUP]
    assert group.members == ["investment_risk_v2"] and group.width == 5
    assert not (repo / "uplifting_v4").exists() and not (repo / f"{GROUP}_onnx" / "adapters" / "uplifting_v4").exists()
    assert set(read_filter_records(repo)) == {"investment_risk_v2", "uplifting_merged"}
    decision = read_model_config(repo / "investment_risk_v2_decision" / "config.pbtxt")
    assert {t.name: list(t.dims) for t in decision.input} == {"logits": [5], "CONTENT_LENGTH": [1], "screened": [1]}

    done = _cli("export", "--remove", "investment_risk_v2", "--out", str(repo))
    assert done.returncode == 0, done.stderr
    assert read_group_records(repo) == {} and not (repo / f"{GROUP}_onnx").exists()
    done = _cli("export", "--remove", "uplifting_merged", "--out", str(repo))
    assert done.returncode == 0, done.stderr
    assert read_filter_records(repo) == {} and sorted(p.name for p in repo.iterdir()) == ["filterserve.json"]
    done = _cli("export", "--remove", "nope", "--out", str(repo))
    assert done.returncode == 2 and "holds no filter 'nope'" in done.stderr


def test_the_memory_estimate_counts_the_base_once(grouped):
    from filterserve.serve.memory import estimate

    found = estimate(grouped, available=1 << 40)
    group = found.models[f"{GROUP}_onnx"]
    merged = found.models["uplifting_merged_onnx"]
    assert merged <= group <= 1.2 * merged, "one tensor model for both members, about one merged filter's"
    assert {"uplifting_v4_onnx", "investment_risk_v2_onnx"}.isdisjoint(found.models)


@pytest.mark.timeout(300)
def test_served_scores_are_each_members_own_reference_over_grpc_and_http(grouped, references, tmp_path):
    """The issue's done-when: each filter of the group (and the merged one beside it) within contract's
    served tolerance of its PEFT reference."""
    from filterserve.serve import TritonServer

    source = tmp_path / "mixed.jsonl"
    source.write_text("".join(json.dumps({"title": t, "content": c}, ensure_ascii=False) + "\n" for t, c in MIXED_ARTICLES),
                      encoding="utf-8")
    specs = {UPLIFTING_V4.name: UPLIFTING_V4, FIVE_DIMS.name: FIVE_DIMS}
    expected = {name: references[name]([spec.input_text(t, c) for t, c in MIXED_ARTICLES]) for name, spec in specs.items()}
    with TritonServer(grouped) as server:
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            done = subprocess.run([sys.executable, "-m", "filterserve.cli", "score", str(source), "--url", url, "--protocol",
                                   protocol, "--concurrency", "4"], capture_output=True, text=True, timeout=240)
            assert done.returncode == 0, done.stderr
            lines = [json.loads(line) for line in done.stdout.splitlines()]
            assert len(lines) == len(MIXED_ARTICLES)
            for name, spec in specs.items():
                got = np.array([[line[name]["scores"][d] for d in spec.dimensions] for line in lines])
                assert np.abs(got - expected[name]).max() <= contract.SERVED_TOLERANCE, (protocol, name)
            merged = np.array([[line["uplifting_merged"]["scores"][d] for d in UPLIFTING_V4.dimensions] for line in lines])
            assert np.abs(merged - expected[UPLIFTING_V4.name]).max() <= contract.SERVED_TOLERANCE

        # A caller that tokenizes itself calls the group's tensor model with the member's index, then its decision step.
        from filterserve.client import FilterClient

        tokenizer = grouped / "investment_risk_v2_tokenizer" / "1" / "tokenizer" / "tokenizer.json"
        with FilterClient(server.grpc_url, "grpc", model="investment_risk_v2", tokenizer=str(tokenizer)) as client:
            got = np.array([[client.score(t, c).scores[d] for d in FIVE_DIMS.dimensions] for t, c in MIXED_ARTICLES])
        assert np.abs(got - expected[FIVE_DIMS.name]).max() <= contract.SERVED_TOLERANCE

        # A plain caller naming no filter of the group gets a clear refusal, not another filter's scores.
        import tritonclient.grpc as grpcclient

        ids = np.array([[5, 6, 7]], dtype=np.int64)
        inputs = []
        for name, data in (("input_ids", ids), ("attention_mask", np.ones_like(ids)), ("filter_index", np.array([[-1]]))):
            inputs.append(grpcclient.InferInput(name, list(data.shape), "INT64"))
            inputs[-1].set_data_from_numpy(data.astype(np.int64))
        with pytest.raises(Exception, match=r"filter_index -1 names no filter of this group \[0, 2\)"):
            grpcclient.InferenceServerClient(server.grpc_url).infer(f"{GROUP}_onnx", inputs)


def _labelled(path: Path, spec) -> Path:
    """Sample articles with made-up labels: the gate compares the group's MAE with the reference's on the same labels."""
    from filterserve.data import sample_articles

    rng = np.random.default_rng(0)
    rows = [{"title": a["title"], "content": a["content"], **{d: float(rng.uniform(0, 10)) for d in spec.dimensions}}
            for a in sample_articles()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_the_member_added_goes_through_the_accuracy_gate_on_its_own_rows(grouped, family, tmp_path):
    from filterserve.gate import AccuracyGateRefusal

    repo = _copy(grouped, tmp_path)
    _, five = family
    data = _labelled(tmp_path / "val.jsonl", FIVE_DIMS)
    record = export_filter(str(five.base_dir), five.adapter_dir, repo, FIVE_DIMS, share_base=True, validation=data)
    report = record["accuracy_gate"]["report"]
    assert report["n_articles"] == 8 and abs(report["variants"]["fp32"]["mae_delta"]) <= 1e-4
    before = tree_digest(repo)
    with pytest.raises(AccuracyGateRefusal, match=r"fp32: overall MAE .*> tolerance -1"):
        export_filter(str(five.base_dir), five.adapter_dir, repo, FIVE_DIMS, share_base=True, validation=data, gate_tolerance=-1.0)
    assert tree_digest(repo) == before
    refusal = r"--share-base builds one precision for the whole group, fp32 or bf16 \(asked: fp32, fp16\)"
    with pytest.raises(FilterServeError, match=refusal):
        export_filter(str(five.base_dir), five.adapter_dir, repo, FIVE_DIMS, share_base=True, precisions="fp32,fp16")


@pytest.mark.timeout(240)
def test_bench_memory_reads_the_group_model_once(grouped, tmp_path):
    from filterserve.cli import main

    assert main(["bench", "memory", "--model-repository", str(grouped), "--batch", "4", "--tokens", "64", "--out", str(tmp_path)]) == 0
    models = json.loads((tmp_path / "memory.json").read_text())["models"]
    group = models[f"{GROUP}_onnx"]
    assert group["kind"] == f"tensor fp32 (group {GROUP})" and group["filter"] == "investment_risk_v2, uplifting_v4"
    assert group["after_batch"]["rss_mb"] >= group["loaded"]["rss_mb"] - 1
    for name in ("uplifting_v4", "investment_risk_v2"):
        assert models[f"{name}_tokenizer"]["loaded"]["uss_mb"] > 0 and f"{name}_onnx" not in models


def test_a_change_planned_before_another_export_committed_is_refused(grouped, family, tmp_path):
    """Two exports into one group at once: the later commit would drop what the first added, so it writes nothing."""
    from filterserve.export.group import apply_change, plan_add
    from filterserve.export.options import ExportOptions
    from filterserve.model_repository.repository import RepositorySettings
    from filterserve.progress import Steps

    repo = _copy(grouped, tmp_path)
    eight, _ = family
    planned = plan_add(ExportOptions(str(eight.base_dir), eight.adapter_dir, repo, UPLIFTING_V4, share_base=True,
                                     repository=RepositorySettings(max_batch_size=16)))
    export_filter(str(eight.base_dir), eight.adapter_dir, repo, UPLIFTING_V4, share_base=True)  # the other export
    after = tree_digest(repo)
    changed = r"investment_risk_v2, uplifting_v4, group shared_base in .* changed while this was being built"
    with pytest.raises(FilterServeError, match=changed):
        apply_change(planned, Steps(total=0))
    assert tree_digest(repo) == after


@pytest.mark.timeout(600)
@pytest.mark.skipif(not ove.cpu_support().bf16, reason="this CPU has no bf16 arithmetic")
def test_a_bf16_group_runs_on_openvino_and_is_served_as_gated(family, references, tmp_path):
    """The CPU engine's bf16 for a whole group: one OpenVINO model (IR only, the backend's parameters
    only), each member held to its own reference at bf16's bound and gated; ``filterserve score``
    through the OpenVINO stand-in agrees with in-process OpenVINO on the server's own tokens (1e-5)
    and with PyTorch + PEFT within each member's recorded bound."""
    import tritonclient.grpc as grpcclient
    from helpers import text_inputs

    from filterserve.model_repository.runtime import openvino as backend
    from filterserve.serve import TritonServer

    eight, five = family
    repo = tmp_path / "repo"
    data = _labelled(tmp_path / "val.jsonl", FIVE_DIMS)
    export_filter(str(eight.base_dir), eight.adapter_dir, repo, UPLIFTING_V4, share_base=True, precisions="bf16", max_batch_size=16)
    export_filter(str(five.base_dir), five.adapter_dir, repo, FIVE_DIMS, share_base=True, precisions="bf16", max_batch_size=16,
                  validation=data)
    group = read_group_records(repo)[GROUP]
    assert group.precision == "bf16" and group.execution is not None and group.execution["precision"] == "bf16"
    assert set(group.parity) == {"fp32", "bf16"}  # the fp32 file the IR came from is checked first
    folder = repo / f"{GROUP}_onnx"
    assert sorted(p.name for p in (folder / "1").iterdir()) == ["model.bin", "model.xml"]
    config = read_model_config(folder / "config.pbtxt")
    assert config.backend == "openvino" and set(config.parameters) <= set(backend.BACKEND_PARAMETERS)
    assert backend.read_standin_file(folder)[contract.GROUP_MEMBERS_PARAMETER] == ["investment_risk_v2", "uplifting_v4"]
    records = read_filter_records(repo)
    assert records[FIVE_DIMS.name].accuracy_gate.report["variants"]["bf16"]["mae_delta"] <= contract.GATE_TOLERANCE
    assert records[UPLIFTING_V4.name].accuracy_gate is None  # exported without validation data: parity vouches, nothing else

    source = tmp_path / "mixed.jsonl"
    source.write_text("".join(json.dumps({"title": t, "content": c}, ensure_ascii=False) + "\n" for t, c in MIXED_ARTICLES),
                      encoding="utf-8")
    local = ove.served_model("bf16", folder / "1" / "model.xml")
    with TritonServer(repo) as server:
        done = subprocess.run([sys.executable, "-m", "filterserve.cli", "score", str(source), "--url", server.grpc_url],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        client = grpcclient.InferenceServerClient(server.grpc_url)
        for spec in (UPLIFTING_V4, FIVE_DIMS):
            texts = [spec.input_text(t, c) for t, c in MIXED_ARTICLES]
            got = np.array([[line[spec.name]["scores"][d] for d in spec.dimensions] for line in lines])
            for i, text in enumerate(texts):
                tokens = client.infer(contract.tokenizer_model(spec.name), text_inputs("grpc", [text]))
                expected, _ = local.scores(*(tokens.as_numpy(n) for n in (*contract.TOKEN_INPUTS, contract.FILTER_INDEX)))
                assert np.abs(got[i] - expected[0, : spec.num_labels]).max() <= 1e-5, (spec.name, i)
            bound = records[spec.name].parity["bf16"].limit
            assert np.abs(got - references[spec.name](texts)).max() <= bound, spec.name
        client.close()
