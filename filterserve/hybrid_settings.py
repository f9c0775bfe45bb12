"""A production filter folder's two-stage hybrid settings, read without running any of its code.

What production runs (veen-systems/llm-distillery; the consuming service's loader uses a folder's
``HybridScorer`` subclass whenever the folder ships ``inference_hybrid.py``):

- ``filters/common/hybrid_scorer.py`` @4d17e75: ``HybridScorer.__init__`` builds
  ``EmbeddingStage(**self._get_embedding_stage_config())``; that dict gives
  ``embedding_model_name``, ``probe_path`` and ``threshold``. Stage 2 runs for a row when
  ``EmbeddingStage.screen_batch`` (``filters/common/embedding_stage.py`` @3e1ccec) finds
  ``weighted_avg >= self.threshold``.
- ``embedding_stage.py`` @3e1ccec, ``_verify_pickle_integrity``: when ``<probe>.pkl.sha256`` exists,
  its first whitespace-separated token must equal the probe's sha256 (else ValueError); without
  it the check is skipped.
- ``filters/belonging/v3/inference_hybrid.py`` @218fb79 and ``filters/nature_recovery/v4/
  inference_hybrid.py`` @23743a3: a module constant ``DEFAULT_THRESHOLD`` (1.00 and 0.75), the
  default of the subclass's ``__init__(..., threshold: float = DEFAULT_THRESHOLD, ...)``; the probe
  is ``Path(__file__).parent / "probe" / "embedding_probe_e5small.pkl"`` and the embedder the literal
  ``"intfloat/multilingual-e5-small"`` in ``_get_embedding_stage_config``. Nothing reads config.yaml's
  ``hybrid_inference`` block there: nature_recovery v4's config.yaml @f910032 says
  ``threshold: 3.225`` while 0.75 runs.
- ``filters/human_thriving/v9/inference_hybrid.py`` @cfce26c: ``__init__(..., threshold:
  Optional[float] = None, ...)``; None (what the loader passes) reads ``hybrid_inference.stage1``
  from config.yaml (``load_stage1_config``: ``threshold`` required, ``embedding_model`` default
  ``"intfloat/multilingual-e5-small"``, ``probe_path`` default ``"probe/embedding_probe_e5small.pkl"``
  relative to config.yaml, ``probe_sha256`` optional) and, when ``probe_sha256`` is set, refuses to
  start unless the probe's sha256 equals it (``verify_probe_matches_threshold``). config.yaml @cfce26c:
  ``threshold: 1.75``, ``probe_sha256: "ccbebe9f..."``.

So the runtime threshold is read here as production's constructor resolves it: the scorer
class's ``threshold`` default, followed to ``DEFAULT_THRESHOLD`` or, for a None default in a file
that reads the ``hybrid_inference`` block, to config.yaml. Every place config.yaml says otherwise
is a ``DISAGREEMENT`` line; the runtime value wins. Both sha256 checks are enforced whenever
their pin exists (config.yaml's ``probe_sha256`` also where production's code would not read
it: a pin that no longer matches its probe means the threshold was derived for another one).
"""

from __future__ import annotations

import ast
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filterserve.errors import FilterServeError
from filterserve.filter_folder import CONFIG, read_config

HYBRID_SCORER = "inference_hybrid.py"
THRESHOLD_CONSTANT = "DEFAULT_THRESHOLD"
# The section of config.yaml that human_thriving v9's load_stage1_config reads.
HYBRID_SECTION, STAGE1_SECTION = "hybrid_inference", "stage1"
# load_stage1_config's defaults for what config.yaml's stage1 block leaves out.
DEFAULT_EMBEDDER = "intfloat/multilingual-e5-small"
DEFAULT_PROBE_PATH = "probe/embedding_probe_e5small.pkl"
# The probe's integrity companion: <probe>.sha256 (EmbeddingStage._verify_pickle_integrity).
COMPANION_SUFFIX = ".sha256"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HybridSettings:
    """Stage 1 as production runs it for one folder, and where config.yaml says otherwise."""

    folder: Path
    threshold: float
    # Where the threshold was read: the file, and the constant or key in it.
    threshold_source: str
    # True when config.yaml's hybrid_inference.stage1.threshold is the runtime one (human_thriving v9).
    threshold_from_config: bool
    probe: Path
    probe_sha256: str
    embedder: str
    disagreements: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def report(self) -> list[str]:
        """The DISAGREEMENT lines, then the notes, each naming the folder."""
        return [*self.disagreements, *(f"{self.folder}: {n}" for n in self.notes)]


def _is_path_of_file_parent(node: ast.expr) -> bool:
    """``Path(__file__).parent``."""
    return (isinstance(node, ast.Attribute) and node.attr == "parent" and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name) and node.value.func.id == "Path"
            and [type(a) for a in node.value.args] == [ast.Name] and getattr(node.value.args[0], "id", None) == "__file__")


def _path_parts(node: ast.expr) -> list[str] | None:
    """``Path(__file__).parent / "a" / "b"`` → ``["a", "b"]``; anything else → None."""
    parts: list[str] = []
    while isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        if not (isinstance(node.right, ast.Constant) and isinstance(node.right.value, str)):
            return None
        parts.insert(0, node.right.value)
        node = node.left
    return parts if parts and _is_path_of_file_parent(node) else None


class _Source:
    """What inference_hybrid.py says, read with :mod:`ast` (the file imports torch and production's packages)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError as exc:
            raise FilterServeError(f"{path} is not valid Python (line {exc.lineno}: {exc.msg})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise FilterServeError(f"cannot read {path}: {exc}") from None
        self.scorer = self._scorer_class()

    def _scorer_class(self) -> ast.ClassDef:
        found = [node for node in ast.walk(self.tree) if isinstance(node, ast.ClassDef) and any(
            (isinstance(b, ast.Name) and b.id == "HybridScorer") or (isinstance(b, ast.Attribute) and b.attr == "HybridScorer")
            for b in node.bases)]
        if len(found) != 1:
            raise FilterServeError(
                f"{self.path} defines {len(found)} HybridScorer subclasses: which one production loads cannot be told without running it"
                if found else f"{self.path} defines no HybridScorer subclass"
            )
        return found[0]

    def _method(self, name: str) -> ast.FunctionDef | None:
        return next((n for n in self.scorer.body if isinstance(n, ast.FunctionDef) and n.name == name), None)

    def module_constant(self, name: str) -> tuple[Any, int] | None:
        """A top-level ``NAME = literal``: its value and line; assigned twice is refused."""
        found: tuple[Any, int] | None = None
        for node in self.tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            if not any(isinstance(t, ast.Name) and t.id == name for t in targets):
                continue
            value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
            if found is not None:
                raise FilterServeError(f"{self.path} assigns {name} twice (lines {found[1]} and {node.lineno})")
            try:
                found = (ast.literal_eval(value) if value is not None else None, node.lineno)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                raise FilterServeError(f"{self.path} line {node.lineno}: {name} is not a literal (it is read, never run)") from None
        return found

    def threshold_default(self) -> ast.expr:
        """The default of the scorer's ``__init__(..., threshold=...)``."""
        init = self._method("__init__")
        if init is not None:
            args = init.args
            positional = args.posonlyargs + args.args
            defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
            for arg, default in [*zip(positional, defaults), *zip(args.kwonlyargs, args.kw_defaults)]:
                if arg.arg == "threshold" and default is not None:
                    return default
        raise FilterServeError(
            f"{self.path}: {self.scorer.name}.__init__ has no threshold parameter with a default, so the stage-1 threshold "
            "cannot be read without running the file"
        )

    def reads_hybrid_section(self) -> bool:
        """The code (not a docstring) looks up config.yaml's ``hybrid_inference`` key."""
        for node in ast.walk(self.tree):
            keys = node.args[:1] if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                else [node.slice] if isinstance(node, ast.Subscript) else []
            if any(isinstance(k, ast.Constant) and k.value == HYBRID_SECTION for k in keys):
                return True
        return False

    def get_default(self, key: str) -> str | None:
        """The string default of a ``.get("key", "default")`` call (load_stage1_config's defaults)."""
        for node in ast.walk(self.tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" and len(node.args) == 2
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value == key
                    and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
                return node.args[1].value
        return None

    def stage_config_literal(self, key: str) -> str | None:
        """A string literal that ``_get_embedding_stage_config`` returns under ``key``."""
        method = self._method("_get_embedding_stage_config")
        for node in ast.walk(method) if method is not None else ():
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Dict):
                for k, v in zip(node.value.keys, node.value.values):
                    if isinstance(k, ast.Constant) and k.value == key and isinstance(v, ast.Constant) and isinstance(v.value, str):
                        return v.value
        return None

    def probe_next_to_file(self) -> list[str] | None:
        """The probe's path as ``Path(__file__).parent / ...`` in the scorer class (the DEFAULT_THRESHOLD filters)."""
        for node in ast.walk(self.scorer):
            if isinstance(node, ast.BinOp) and (parts := _path_parts(node)) is not None:
                return parts
        return None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _show(value: object) -> str:
    return "null" if value is None else repr(value)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise FilterServeError(f"cannot read the stage-1 probe {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


class _Reader:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.source = _Source(folder / HYBRID_SCORER)
        self.config_path = folder / CONFIG
        config = read_config(self.config_path) if self.config_path.is_file() else {}
        hybrid = config.get(HYBRID_SECTION)
        stage1 = hybrid.get(STAGE1_SECTION) if isinstance(hybrid, dict) else None
        self.stage1: dict[str, Any] = stage1 if isinstance(stage1, dict) else {}
        self.key = f"{HYBRID_SECTION}.{STAGE1_SECTION}"
        self.disagreements: list[str] = []
        self.notes: list[str] = []

    def differ(self, what: str, runtime: str, runtime_value: object, key: str) -> None:
        self.disagreements.append(
            f"DISAGREEMENT: {what}: {runtime} = {_show(runtime_value)} (what production runs) vs "
            f"{self.config_path} {self.key}.{key} = {_show(self.stage1.get(key))}; using {_show(runtime_value)}"
        )

    def configured(self, key: str, default: str) -> str:
        """config.yaml's stage1 ``key``, else the file's ``.get(key, default)`` default, else load_stage1_config's."""
        value = self.stage1.get(key, self.source.get_default(key) or default)
        if not isinstance(value, str) or not value:
            raise FilterServeError(f"{self.config_path} {self.key}.{key} must be a non-empty string, got {_show(value)}")
        return value

    def threshold(self) -> tuple[float, str, bool]:
        default = self.source.threshold_default()
        file = self.source.path
        if isinstance(default, ast.Constant) and default.value is None:
            if not self.source.reads_hybrid_section():
                raise FilterServeError(f"{file}: the threshold defaults to None, but the file reads no {HYBRID_SECTION} block")
            value = self.stage1.get("threshold")
            configured = _number(value)
            if configured is None:
                raise FilterServeError(
                    f"{self.config_path} {self.key}.threshold is {_show(value)}: {file} reads the stage-1 threshold from there "
                    "and refuses to start without it"
                )
            return configured, f"{self.config_path} {self.key}.threshold", True
        if isinstance(default, ast.Name):
            found = self.source.module_constant(default.id)
            if found is None:
                raise FilterServeError(f"{file}: the threshold defaults to {default.id}, which the file does not assign")
            value, line = found
            runtime = f"{file} {default.id}"
            where = f"{runtime} (line {line})"
        elif isinstance(default, ast.Constant):
            value, runtime = default.value, f"{file} {self.source.scorer.name}.__init__ threshold default"
            where = f"{runtime} (line {default.lineno})"
        else:
            raise FilterServeError(f"{file} line {default.lineno}: the threshold default is not a literal (it is read, never run)")
        threshold = _number(value)
        if threshold is None:
            raise FilterServeError(f"{where}: the stage-1 threshold must be a finite number, got {_show(value)}")
        if "threshold" in self.stage1 and _number(self.stage1["threshold"]) != threshold:
            self.differ("stage-1 threshold", runtime, threshold, "threshold")
        return threshold, where, False

    def embedder(self) -> str:
        literal = self.source.stage_config_literal("embedding_model_name")
        if literal is not None:
            if "embedding_model" in self.stage1 and self.stage1["embedding_model"] != literal:
                self.differ("stage-1 embedding model", f"{self.source.path} _get_embedding_stage_config", literal, "embedding_model")
            return literal
        if self.source.reads_hybrid_section():
            return self.configured("embedding_model", DEFAULT_EMBEDDER)
        raise FilterServeError(f"{self.source.path}: no embedding model name can be read from _get_embedding_stage_config")

    def probe(self) -> Path:
        parts = self.source.probe_next_to_file()
        if parts is not None:
            probe = self.folder.joinpath(*parts)
            configured = self.stage1.get("probe_path")
            if configured is not None and (not isinstance(configured, str) or (self.folder / configured) != probe):
                self.differ("stage-1 probe", f"{self.source.path} Path(__file__).parent", "/".join(parts), "probe_path")
            return probe
        if self.source.reads_hybrid_section():
            return self.folder / self.configured("probe_path", DEFAULT_PROBE_PATH)
        raise FilterServeError(f"{self.source.path}: the stage-1 probe's path cannot be read without running the file")

    def checked_sha256(self, probe: Path, threshold: float) -> str:
        if not probe.is_file():
            raise FilterServeError(f"the stage-1 probe {probe} is missing (production refuses to start without it)")
        actual = _sha256(probe)
        pin = self.stage1.get("probe_sha256")
        if pin is not None:
            if not isinstance(pin, str) or not _SHA256.match(pin.strip().lower()):
                raise FilterServeError(f"{self.config_path} {self.key}.probe_sha256 is not a sha256: {_show(pin)}")
            if pin.strip().lower() != actual:
                raise FilterServeError(
                    f"refused stage-1 probe {probe}: its sha256 is {actual}, but {self.config_path} {self.key}.probe_sha256 pins "
                    f"{pin.strip()} to the threshold {threshold:g} (another probe needs a re-derived threshold)"
                )
        companion = probe.with_name(probe.name + COMPANION_SUFFIX)
        if companion.is_file():
            try:
                tokens = companion.read_text(encoding="utf-8").split()
            except (OSError, UnicodeDecodeError) as exc:
                raise FilterServeError(f"cannot read {companion}: {exc}") from None
            if not tokens or not _SHA256.match(tokens[0].lower()):
                raise FilterServeError(f"{companion} holds no sha256")
            if tokens[0].lower() != actual:
                raise FilterServeError(f"refused stage-1 probe {probe}: its sha256 is {actual}, {companion} says {tokens[0]}")
        else:
            self.notes.append(f"no {companion.name}: the probe's integrity is not checked against it (production skips it too)")
        return actual


def read_hybrid_settings(folder: str | Path) -> HybridSettings | None:
    """The folder's stage 1 as production runs it; None without inference_hybrid.py (production scores stage 2 alone)."""
    folder = Path(folder)
    if not (folder / HYBRID_SCORER).is_file():
        return None
    reader = _Reader(folder)
    threshold, source, from_config = reader.threshold()
    embedder = reader.embedder()
    probe = reader.probe()
    sha256 = reader.checked_sha256(probe, threshold)
    return HybridSettings(
        folder=folder,
        threshold=threshold,
        threshold_source=source,
        threshold_from_config=from_config,
        probe=probe,
        probe_sha256=sha256,
        embedder=embedder,
        disagreements=tuple(reader.disagreements),
        notes=tuple(reader.notes),
    )
