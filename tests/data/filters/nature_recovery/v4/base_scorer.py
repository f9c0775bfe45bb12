"""
Nature Recovery Filter v4 - Base Scorer Class

Inherits all shared logic from FilterBaseScorer.
Defines filter-specific constants and prefilter loading.

v4 note (#70 / C1): the recovery_evidence gatekeeper below is UNCHANGED from
v2. The #70 delivered-protection goal is met not by exempting content from the
gatekeeper (content_type never reaches inference) but by REDEFINING
recovery_evidence in the oracle prompt so documented pressure-removal / enacted
enforcement scores >= 3 — so protection clears the gatekeeper via labels, not
via runtime code. See docs/nature_recovery_v4_plan.md §0 C1.
"""

from filters.common.filter_base_scorer import FilterBaseScorer


class BaseNatureRecoveryScorer(FilterBaseScorer):
    """
    Abstract base class for nature recovery scoring.

    Subclasses must implement:
        - _load_model(): Load model from local files or Hub
    """

    FILTER_NAME = "nature_recovery"
    FILTER_VERSION = "4.0"

    DIMENSION_NAMES = [
        "recovery_evidence",
        "measurable_outcomes",
        "ecological_significance",
        "restoration_scale",
        "human_agency",
        "protection_durability",
    ]

    DIMENSION_WEIGHTS = {
        "recovery_evidence": 0.25,
        "measurable_outcomes": 0.20,
        "ecological_significance": 0.20,
        "restoration_scale": 0.15,
        "human_agency": 0.10,
        "protection_durability": 0.10,
    }

    # medium=3.75 is the tuned operating point. Reproduced on the held-out test set
    # (n=391, 2026-07-10): 3.75 beats 4.0 for v4 on BOTH recall (0.638->0.650) and
    # precision (0.841->0.848); v4 dominates v2 at 3.75 on every metric.
    # MUST match config.yaml scoring.tiers.medium.threshold. This is the SOLE runtime source
    # for tier assignment (no scoring code reads config's tiers section); a mismatch
    # silently reverts the recall gain and ovr.news hides the [3.75,4.0) band as 'low'
    # (found 2026-07-10: shipped at inert 4.0 for the whole v4 deploy). Stays above the
    # 3.5 gatekeeper cap so capped articles cannot reach medium.
    TIER_THRESHOLDS = [
        ("high", 7.0, "Strong documented ecosystem recovery with measurable outcomes"),
        ("medium", 3.75, "Some recovery evidence, partial data or limited scope"),
        ("low", 0.0, "No recovery evidence, doom/decline only, or non-ecological content"),
    ]

    GATEKEEPER_DIMENSION = "recovery_evidence"
    GATEKEEPER_MIN = 3.0
    GATEKEEPER_CAP = 3.5

    def _load_prefilter(self):
        import importlib.util
        prefilter_path = self._get_filter_dir() / "prefilter.py"
        spec = importlib.util.spec_from_file_location("prefilter", prefilter_path)
        prefilter_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(prefilter_module)
        self.prefilter = prefilter_module.NatureRecoveryPreFilterV4()
