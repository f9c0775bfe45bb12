"""The export's first hour (issue 25): what a new user typed, and the one line each mistake must get.

- a mistyped relative --base is a missing folder, not a hub id to retry for a minute (stumble 1);
  a hub id that is neither cached nor given by the hub is one line too, and one in the local
  Hugging Face cache loads without asking the hub;
- a truncated base weights file is one line naming it (stumble 2), as a truncated adapter is;
- the closing hint says to restart serve, which locks the load API (stumble 5);
- the step counter never passes its total (stumble 6);
- ``export --help`` shows the defaults (stumble 10);
- records in today's exact format read back (typed) and write back unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import labelled_samples

from filterserve.cli import build_parser, main
from filterserve.errors import FilterServeError
from filterserve.export import openvino_engine as ove
from filterserve.export.group import GroupChange, GroupPlan
from filterserve.export.load import load_base_model, locate_base
from filterserve.export.manifest import describe_source
from filterserve.export.pipeline import export_filter
from filterserve.export.shared_base import MemberSource
from filterserve.filters import UPLIFTING_V4
from filterserve.manifest import read_filter_records, read_group_records, to_json
from filterserve.model_repository.repository import RepositorySettings

RECORDS = Path(__file__).parent / "data" / "records_v1"
COUNTER = re.compile(r"^\[(\d+)/(\d+)\] ", re.MULTILINE)


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The error the command ended with: one line, after the progress lines (if any), no traceback."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1 and lines[-1] == errors[0] and not any("Traceback" in line for line in lines), lines
    return errors[0]


def test_a_mistyped_relative_base_is_a_missing_folder_not_a_hub_id(standin, tmp_path, monkeypatch, capsys):
    """``sa/nobase`` beside a folder ``sa`` was taken for a hub id and retried for 52 s."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sa").mkdir()
    argv = ["export", "--adapter", str(standin.adapter_dir), "--out", str(tmp_path / "out")]
    assert main([*argv, "--base", "sa/nobase"]) == 2
    assert "base model not found: sa/nobase" in _one_line_error(capsys)
    for typo in ("./sa/nobase", "sa/no/base", "~/no-such-base-folder"):
        assert main([*argv, "--base", typo]) == 2
        assert "base model not found" in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_a_hub_id_neither_cached_nor_given_by_the_hub_is_one_line(standin, tmp_path, monkeypatch, capsys):
    """Asked once (here the hub is unreachable, or says it has no such model): no retry loop."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--base", "filterserve-no-such-org/no-such-model", "--adapter", str(standin.adapter_dir),
                 "--out", str(tmp_path / "out")]) == 2
    err = _one_line_error(capsys)
    assert "'filterserve-no-such-org/no-such-model' is not a folder, not in the local Hugging Face cache" in err


def _cache_hub_id(base: Path, cache: Path, hub_id: str) -> Path:
    """``base`` laid out as huggingface_hub caches a downloaded model (what ``hf download`` leaves)."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{hub_id.replace('/', '--')}"
    shutil.copytree(base, folder / "snapshots" / revision)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    return folder / "snapshots" / revision


def test_a_hub_id_in_the_local_cache_loads_without_the_hub(standin, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = _cache_hub_id(standin.base_dir, tmp_path / "hub", "filterserve-test/tiny-base")
    assert Path(locate_base("filterserve-test/tiny-base")) == snapshot
    model = load_base_model("filterserve-test/tiny-base", UPLIFTING_V4.num_labels)
    assert model.config.num_labels == UPLIFTING_V4.num_labels
    assert describe_source("filterserve-test/tiny-base").hub_id == "filterserve-test/tiny-base"


def test_a_truncated_base_weights_file_is_one_line_naming_it(standin, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(standin.base_dir, base)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["export", "--base", str(base), "--adapter", str(standin.adapter_dir), "--out", str(tmp_path / "out")]) == 2
    err = _one_line_error(capsys)
    assert f"cannot read the base model's weights {weights} (truncated or corrupt?)" in err
    with pytest.raises(FilterServeError, match="model.safetensors"):
        load_base_model(str(base), 2)


def _counters(text: str) -> list[tuple[int, int]]:
    return [(int(i), int(n)) for i, n in COUNTER.findall(text)]


def _check_counted(text: str) -> None:
    """Every step is counted in the total the counter shows, and the last one reaches it."""
    counters = _counters(text)
    assert counters, text
    totals = {n for _, n in counters}
    assert len(totals) == 1, counters
    assert [i for i, _ in counters] == list(range(1, len(counters) + 1)) and counters[-1][0] == counters[-1][1], counters


@pytest.mark.slow  # a whole export of its own
def test_the_cli_export_counts_its_steps_and_closes_with_a_restart_hint(standin, tmp_path, capsys):
    """The closing hint named POST /v2/repository/models/NAME/load, which serve locks (403)."""
    assert main(["export", "--base", str(standin.base_dir), "--adapter", str(standin.adapter_dir), "--out", str(tmp_path / "out"),
                 "--precision", "fp32,fp16"]) == 0
    err = capsys.readouterr().err
    _check_counted(err)
    assert "/v2/repository" not in err and "restart filterserve serve" in err


def _precisions() -> list[str]:
    cpu = ove.cpu_support()
    return ["fp32,int8"] + (["bf16,ov_int8"] if cpu.bf16 else ["ov_fp32,ov_int8"])


@pytest.mark.slow  # whole exports of their own
@pytest.mark.parametrize("precisions", _precisions())
def test_a_validated_merged_export_counts_every_step(standin, tmp_path, precisions):
    """The gate, the validation data's reference and the variants made from fp32 are counted too."""
    stream = (tmp_path / "progress.txt").open("w", encoding="utf-8")
    export_filter(str(standin.base_dir), standin.adapter_dir, tmp_path / "out", precisions=precisions,
                  validation=labelled_samples(tmp_path / "val.jsonl", UPLIFTING_V4), gate_tolerance=10.0, stream=stream)
    stream.close()
    _check_counted((tmp_path / "progress.txt").read_text(encoding="utf-8"))


@pytest.mark.slow  # whole exports of their own
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_group_export_counts_every_step(standin, tmp_path, precision):
    """``--share-base --precision bf16`` printed [7/6]: OpenVINO's compile and its parity are two steps."""
    if precision == "bf16" and not ove.cpu_support().bf16:
        pytest.skip("this CPU has no bf16 arithmetic")
    stream = (tmp_path / "progress.txt").open("w", encoding="utf-8")
    export_filter(str(standin.base_dir), standin.adapter_dir, tmp_path / "out", share_base=True, precisions=precision,
                  validation=labelled_samples(tmp_path / "val.jsonl", UPLIFTING_V4), stream=stream)
    stream.close()
    _check_counted((tmp_path / "progress.txt").read_text(encoding="utf-8"))


def test_a_bf16_group_counts_openvino_compile_and_parity(standin, tmp_path):
    """What the bf16 run above checks, on any CPU: bf16 adds two steps to fp32's (the IR compiled, its parity)."""
    member = MemberSource(UPLIFTING_V4, standin.adapter_dir)

    def total(precision: str) -> int:
        change = GroupChange(tmp_path, "shared_base", str(standin.base_dir), describe_source(str(standin.base_dir)), [member],
                             {}, [], precision=precision)
        return GroupPlan(change, RepositorySettings()).total_steps()

    # One member, no validation: load, build, fp32 parity, [IR compile, bf16 parity], write.
    assert total("fp32") == 4 and total("bf16") == 6


def test_export_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--precision", "fp32"), ("--default", "auto"), ("--gate-tolerance", "0.01"), ("--max-batch-size", "32"),
                          ("--bucket", "16"), ("--max-text-bytes", "262144")]:
        assert re.search(re.escape(flag) + r" [A-Z_]+ .*?\(default: " + re.escape(default) + r"\)", text), (flag, default)


@pytest.mark.parametrize("command, flags", [
    ("standin", [("--shape", "tiny"), ("--seed", "0")]),
    ("build-engine", [("--gate-tolerance", "0.01"), ("--workspace-gb", "4"), ("--tolerance", "0.05")]),
])
def test_the_other_export_commands_show_their_defaults(capsys, command, flags):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in flags:
        assert re.search(re.escape(flag) + r" [A-Z_{},.0-9a-z-]+ .*?default: .*?" + re.escape(default), text), (flag, default)


@pytest.mark.parametrize("kind", ["merged", "group"])
def test_records_in_todays_format_read_typed_and_write_back_unchanged(kind):
    """Repositories written before the records were typed (tests/data/records_v1, written by that code) read as they are."""
    repo = RECORDS / kind
    records, groups = read_filter_records(repo), read_group_records(repo)
    assert list(records) == ["uplifting_v4"]
    record = records["uplifting_v4"]
    on_disk = json.loads((repo / "uplifting_v4.filter.json").read_text(encoding="utf-8"))
    # Only a variant that was not built is left out now, where it was written as null.
    assert to_json(record) == {k: v for k, v in on_disk.items() if not (k in ("int8", "ov_int8") and v is None)}
    assert record.parity["fp32"].passed and record.sources["base"].sha256 and record.max_length == UPLIFTING_V4.max_length
    if kind == "group":
        group = groups["shared_base"]
        assert to_json(group) == json.loads((repo / "shared_base.group.json").read_text(encoding="utf-8"))
        assert record.group is not None and record.group.tensor_model == group.tensor_model == "shared_base_onnx"
        assert group.parity["fp32"]["uplifting_v4"].max_abs_diff <= 1e-4 and record.tensor_models == {}
    else:
        assert groups == {} and record.tensor_models == {"fp32": "uplifting_v4_onnx", "fp16": "uplifting_v4_onnx_fp16"}


def test_a_record_with_a_field_of_the_wrong_type_is_one_line_naming_the_file(tmp_path):
    shutil.copytree(RECORDS / "merged", tmp_path / "repo")
    path = tmp_path / "repo" / "uplifting_v4.filter.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**record, "parity": {"fp32": {**record["parity"]["fp32"], "max_abs_diff": "small"}}}))
    malformed = r"filter record .*uplifting_v4.filter.json is malformed: parity.fp32.max_abs_diff must be float"
    with pytest.raises(FilterServeError, match=malformed):
        read_filter_records(tmp_path / "repo")
