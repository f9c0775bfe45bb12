"""A filter folder's stage-1 settings read as production runs them, without running inference_hybrid.py
(issue 26, "The filter folder, read as it ships").

The files are written in the shapes production ships (veen-systems/llm-distillery):
``filters/human_thriving/v9/`` @cfce26c (the threshold and its probe pin read from config.yaml),
``filters/belonging/v3/`` @218fb79 and ``filters/nature_recovery/v4/`` (inference_hybrid.py @23743a3,
config.yaml @f910032: ``DEFAULT_THRESHOLD`` 0.75 runs while config.yaml says 3.225). Each
inference_hybrid.py begins by exiting and imports production's packages, which are not installed
here: reading it must never run it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from filterserve.errors import FilterServeError
from filterserve.hybrid_settings import read_hybrid_settings

PROBE = "probe/embedding_probe_e5small.pkl"
PROBE_BYTES = b"stand-in probe bytes: hybrid_settings hashes the file, it never unpickles it"
PROBE_SHA256 = hashlib.sha256(PROBE_BYTES).hexdigest()
OTHER_SHA256 = hashlib.sha256(b"another seed's probe").hexdigest()

NEVER_RUN = 'raise SystemExit("inference_hybrid.py was executed")\n'

# filters/human_thriving/v9/inference_hybrid.py @cfce26c, abridged to its structure.
CONFIG_THRESHOLD_HYBRID = '''"""
Human Thriving Filter v9 - Hybrid Inference Pipeline

THE STAGE-1 THRESHOLD IS READ FROM config.yaml, NOT HARDCODED HERE. Every other filter's
`inference_hybrid.py` carries a module-level `DEFAULT_THRESHOLD`, and nothing passes
`config.yaml`'s `hybrid_inference.stage1.threshold` into the constructor.
"""

import json
import logging
from pathlib import Path
from typing import Dict, Optional

import yaml

from filters.common.hybrid_scorer import HybridScorer
from filters.human_thriving.v9.inference import HumanThrivingScorer

''' + NEVER_RUN + '''
logger = logging.getLogger(__name__)

CONFIG_PATH = Path(__file__).parent / "config.yaml"


def load_stage1_config(config_path: Path = CONFIG_PATH) -> Dict:
    with open(config_path, "r", encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}

    stage1 = (config.get("hybrid_inference") or {}).get("stage1")
    if not stage1:
        raise KeyError(f"{config_path} has no `hybrid_inference.stage1` block.")
    threshold = stage1.get("threshold")
    if threshold is None:
        raise KeyError(f"{config_path} `hybrid_inference.stage1` has no `threshold`.")
    return {
        "threshold": float(threshold),
        "embedding_model": stage1.get("embedding_model",
                                      "intfloat/multilingual-e5-small"),
        "probe_path": stage1.get("probe_path", "probe/embedding_probe_e5small.pkl"),
        "probe_sha256": stage1.get("probe_sha256"),
    }


def verify_probe_matches_threshold(probe_path: Path, expected_sha256: str) -> None:
    import hashlib

    actual = hashlib.sha256(probe_path.read_bytes()).hexdigest()
    if actual != expected_sha256:
        raise ValueError("Stage-1 probe does not match the probe the configured threshold was derived against.")


class HumanThrivingHybridScorer(HybridScorer):
    def __init__(
        self,
        model_path: Optional[Path] = None,
        probe_path: Optional[Path] = None,
        threshold: Optional[float] = None,
        device: Optional[str] = None,
        use_prefilter: bool = False,
        config_path: Optional[Path] = None,
    ):
        resolved_config = config_path or CONFIG_PATH
        stage1 = load_stage1_config(resolved_config)
        self._model_path = model_path
        self._probe_path = probe_path or (resolved_config.parent / stage1["probe_path"])
        self._embedding_model = stage1["embedding_model"]
        if threshold is None:
            self._threshold = stage1["threshold"]
        else:
            self._threshold = float(threshold)
        if threshold is None and stage1["probe_sha256"]:
            verify_probe_matches_threshold(self._probe_path, stage1["probe_sha256"])
        super().__init__(device=device, use_prefilter=use_prefilter)

    def _create_stage2_scorer(self):
        return HumanThrivingScorer(model_path=self._model_path, device=self.device_str, use_prefilter=False)

    def _get_embedding_stage_config(self) -> Dict:
        return {
            "embedding_model_name": self._embedding_model,
            "probe_path": str(self._probe_path),
            "threshold": self._threshold,
        }


def main():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--threshold", type=float, default=None)


if __name__ == "__main__":
    main()
'''


def default_threshold_hybrid(value: str, embedder: str = "intfloat/multilingual-e5-small", classes: int = 1) -> str:
    """filters/belonging/v3 and nature_recovery/v4 inference_hybrid.py, abridged to their structure."""
    scorer = '''

class NatureRecoveryHybridScorer{n}(HybridScorer):
    """
    Two-stage hybrid scorer for nature recovery filter v1.
    """

    def __init__(
        self,
        model_path: Optional[Path] = None,
        probe_path: Optional[Path] = None,
        threshold: float = DEFAULT_THRESHOLD,
        device: Optional[str] = None,
        use_prefilter: bool = True,
    ):
        self._model_path = model_path
        self._probe_path = probe_path or (
            Path(__file__).parent / "probe" / "embedding_probe_e5small.pkl"
        )
        self._threshold = threshold

        super().__init__(device=device, use_prefilter=use_prefilter)

    def _create_stage2_scorer(self):
        return NatureRecoveryScorer(
            model_path=self._model_path,
            device=self.device_str,
            use_prefilter=False,
        )

    def _get_embedding_stage_config(self) -> Dict:
        """Return EmbeddingStage configuration for nature recovery v1."""
        return {{
            "embedding_model_name": "{embedder}",
            "probe_path": str(self._probe_path),
            "threshold": self._threshold,
        }}
'''
    return f'''"""
Nature Recovery Filter v4 - Hybrid Inference Pipeline
"""

import json
import logging
from pathlib import Path
from typing import Dict, Optional

from filters.common.hybrid_scorer import HybridScorer
from filters.nature_recovery.v4.inference import NatureRecoveryScorer

{NEVER_RUN}
logger = logging.getLogger(__name__)

# Default Stage 1 threshold: articles below this skip Stage 2
# Calibrated on v1 val data (328 articles):
#   Threshold 0.75 -> 0.0% FN rate on MEDIUM+, ~2x speedup
DEFAULT_THRESHOLD = {value}
''' + "".join(scorer.format(n=n or "", embedder=embedder) for n in range(classes)) + '''

def main():
    import argparse

    parser = argparse.ArgumentParser(description="Score articles with nature recovery hybrid scorer (two-stage pipeline)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help=f"Stage 1 threshold (default: {DEFAULT_THRESHOLD})")


if __name__ == "__main__":
    main()
'''


def config_yaml(stage1: str) -> str:
    return f'''filter:
  name: made_up
  version: "4.0"

preprocessing:
  head_tail:
    enabled: true
    head_tokens: 256
    tail_tokens: 256
    separator: " [...] "

hybrid_inference:
  stage1:
{stage1}
  stage2:
    model: "current"
'''


def folder(tmp_path: Path, hybrid: str | None, stage1: str | None, companion: str | None = None,
           probe: bytes | None = PROBE_BYTES) -> Path:
    path = tmp_path / "filters" / "made_up" / "v4"
    path.mkdir(parents=True)
    if hybrid is not None:
        (path / "inference_hybrid.py").write_text(hybrid, encoding="utf-8")
    if stage1 is not None:
        (path / "config.yaml").write_text(config_yaml(stage1), encoding="utf-8")
    if probe is not None:
        (path / PROBE).parent.mkdir()
        (path / PROBE).write_bytes(probe)
    if companion is not None:
        (path / f"{PROBE}.sha256").write_text(f"{companion}  embedding_probe_e5small.pkl\n", encoding="utf-8")
    return path


HUMAN_THRIVING_STAGE1 = f'''    embedding_model: "intfloat/multilingual-e5-small"
    probe_path: "probe/embedding_probe_e5small.pkl"
    # 1.75, chosen to HOLD NEAR PASS-THROUGH
    threshold: 1.75
    probe_sha256: "{PROBE_SHA256}"'''


def test_human_thriving_reads_threshold_and_pin_from_config(tmp_path: Path):
    path = folder(tmp_path, CONFIG_THRESHOLD_HYBRID, HUMAN_THRIVING_STAGE1, companion=PROBE_SHA256)
    settings = read_hybrid_settings(path)
    assert settings is not None
    assert settings.threshold == 1.75 and settings.threshold_from_config
    assert settings.threshold_source == f"{path / 'config.yaml'} hybrid_inference.stage1.threshold"
    assert settings.probe == path / PROBE and settings.probe_sha256 == PROBE_SHA256
    assert settings.embedder == "intfloat/multilingual-e5-small"
    assert settings.disagreements == () and settings.notes == ()


def test_config_defaults_as_load_stage1_config_has_them(tmp_path: Path):
    path = folder(tmp_path, CONFIG_THRESHOLD_HYBRID, "    threshold: 2.0")
    settings = read_hybrid_settings(path)
    assert settings is not None
    assert (settings.threshold, settings.probe, settings.embedder) == (2.0, path / PROBE, "intfloat/multilingual-e5-small")
    assert settings.notes == ("no embedding_probe_e5small.pkl.sha256: the probe's integrity is not checked against it "
                              "(production skips it too)",)


def test_pinned_probe_that_differs_is_refused_in_one_line(tmp_path: Path):
    stage1 = HUMAN_THRIVING_STAGE1.replace(PROBE_SHA256, OTHER_SHA256)
    path = folder(tmp_path, CONFIG_THRESHOLD_HYBRID, stage1, companion=PROBE_SHA256)
    with pytest.raises(FilterServeError) as refused:
        read_hybrid_settings(path)
    message = str(refused.value)
    assert "\n" not in message
    assert f"refused stage-1 probe {path / PROBE}" in message
    assert PROBE_SHA256 in message and OTHER_SHA256 in message and str(path / "config.yaml") in message


def test_companion_that_differs_is_refused_in_one_line(tmp_path: Path):
    path = folder(tmp_path, default_threshold_hybrid("1.00"), "    threshold: 1.00", companion=OTHER_SHA256)
    with pytest.raises(FilterServeError) as refused:
        read_hybrid_settings(path)
    message = str(refused.value)
    assert "\n" not in message and f"{path / PROBE}.sha256 says {OTHER_SHA256}" in message


def test_config_threshold_missing_is_refused_as_production_does(tmp_path: Path):
    path = folder(tmp_path, CONFIG_THRESHOLD_HYBRID, '    embedding_model: "intfloat/multilingual-e5-small"')
    with pytest.raises(FilterServeError, match=r"hybrid_inference\.stage1\.threshold is null"):
        read_hybrid_settings(path)


def test_belonging_default_threshold_agrees_with_config(tmp_path: Path):
    hybrid = default_threshold_hybrid("1.00")
    path = folder(tmp_path, hybrid, '''    embedding_model: "intfloat/multilingual-e5-small"
    probe_path: "probe/embedding_probe_e5small.pkl"
    threshold: 1.00  # Calibrated on v1 val (738 articles): 0.0% FN on MEDIUM+''', companion=PROBE_SHA256)
    line = hybrid.splitlines().index("DEFAULT_THRESHOLD = 1.00") + 1
    settings = read_hybrid_settings(path)
    assert settings is not None
    assert settings.threshold == 1.0 and not settings.threshold_from_config
    assert settings.threshold_source == f"{path / 'inference_hybrid.py'} DEFAULT_THRESHOLD (line {line})"
    assert settings.disagreements == () and settings.notes == ()


def test_nature_recovery_runtime_threshold_wins_and_the_disagreement_is_reported(tmp_path: Path):
    path = folder(tmp_path, default_threshold_hybrid("0.75"), '''    embedding_model: "intfloat/multilingual-e5-small"
    probe_path: "probe/embedding_probe_e5small.pkl"
    # Recall-first screen (train_probe.py --objective recall, 2026-07-09)
    threshold: 3.225''')
    settings = read_hybrid_settings(path)
    assert settings is not None
    assert settings.threshold == 0.75
    assert settings.disagreements == (
        f"DISAGREEMENT: stage-1 threshold: {path / 'inference_hybrid.py'} DEFAULT_THRESHOLD = 0.75 (what production runs) vs "
        f"{path / 'config.yaml'} hybrid_inference.stage1.threshold = 3.225; using 0.75",
    )
    assert settings.report()[0] == settings.disagreements[0]


def test_null_config_threshold_is_a_disagreement(tmp_path: Path):
    """thriving v1's shape: config.yaml ``threshold: null`` against a runtime 2.25."""
    path = folder(tmp_path, default_threshold_hybrid("2.25"), "    threshold: null")
    settings = read_hybrid_settings(path)
    assert settings is not None and settings.threshold == 2.25
    assert len(settings.disagreements) == 1 and "hybrid_inference.stage1.threshold = null; using 2.25" in settings.disagreements[0]


def test_embedder_and_probe_path_disagreements(tmp_path: Path):
    path = folder(tmp_path, default_threshold_hybrid("1.25"), '''    embedding_model: "intfloat/multilingual-e5-large"
    probe_path: "probe/embedding_probe.pkl"
    threshold: 1.25''')
    settings = read_hybrid_settings(path)
    assert settings is not None
    assert settings.embedder == "intfloat/multilingual-e5-small" and settings.probe == path / PROBE
    assert [d.split(":")[1].strip() for d in settings.disagreements] == ["stage-1 embedding model", "stage-1 probe"]
    assert "= 'intfloat/multilingual-e5-large'; using 'intfloat/multilingual-e5-small'" in settings.disagreements[0]


def test_a_pin_in_config_is_enforced_for_a_default_threshold_filter_too(tmp_path: Path):
    path = folder(tmp_path, default_threshold_hybrid("1.00"), f'    threshold: 1.00\n    probe_sha256: "{OTHER_SHA256}"')
    with pytest.raises(FilterServeError, match="refused stage-1 probe"):
        read_hybrid_settings(path)


def test_no_inference_hybrid_means_stage_two_alone(tmp_path: Path):
    assert read_hybrid_settings(folder(tmp_path, None, "    threshold: 1.0")) is None


@pytest.mark.parametrize(
    ("hybrid", "message"),
    [
        (default_threshold_hybrid("1.00", classes=2), "defines 2 HybridScorer subclasses"),
        (default_threshold_hybrid("float('nan')"), "DEFAULT_THRESHOLD is not a literal"),
        (default_threshold_hybrid('"one"'), "must be a finite number"),
        (default_threshold_hybrid("1.00").replace("threshold: float = DEFAULT_THRESHOLD", "threshold: float = THRESHOLD"),
         "defaults to THRESHOLD, which the file does not assign"),
        (default_threshold_hybrid("1.00").replace("DEFAULT_THRESHOLD = 1.00", "DEFAULT_THRESHOLD = 1.00\nDEFAULT_THRESHOLD = 2.0"),
         "assigns DEFAULT_THRESHOLD twice"),
        (CONFIG_THRESHOLD_HYBRID.replace('config.get("hybrid_inference")', "config.get(SECTION)"), "reads no hybrid_inference block"),
        ("def broken(:\n", "is not valid Python"),
    ],
)
def test_unreadable_settings_are_one_line(tmp_path: Path, hybrid: str, message: str):
    path = folder(tmp_path, hybrid, "    threshold: 1.0")
    with pytest.raises(FilterServeError, match=message) as refused:
        read_hybrid_settings(path)
    assert "\n" not in str(refused.value)


def test_missing_probe_is_one_line(tmp_path: Path):
    path = folder(tmp_path, default_threshold_hybrid("1.00"), "    threshold: 1.00", probe=None)
    with pytest.raises(FilterServeError, match=f"the stage-1 probe {path / PROBE} is missing"):
        read_hybrid_settings(path)
