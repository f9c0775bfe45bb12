"""The ways one exported filter can be run, behind one call: ``run(items, batch size or concurrency) → scores``.

Benchmarks compare the card's recipe with every exported variant and the served model on the
same texts; giving them one interface keeps each comparison a loop rather than a special case.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from filterserve.benchmarks.options import RepositoryChoice
from filterserve.errors import FilterServeError
from filterserve.filters import FilterSpec
from filterserve.manifest import FilterRecord, read_filter_record

if TYPE_CHECKING:
    from filterserve.client.endpoint import Protocol as WireProtocol

# In-process engines score at most this many texts in one padded batch when not told otherwise.
ACCURACY_BATCH = 16
# The arithmetic each exported variant's matmuls run in on this CPU (benchmarks.peaks holds the
# peak of each): ONNX Runtime's CPU provider runs an fp16 graph's matmuls in fp32; an int8
# variant's quantized layers are what dominate its time.
PRECISION_ARITHMETIC = {"fp32": "fp32", "fp16": "fp32", "int8": "int8", "bf16": "bf16", "ov_fp32": "fp32", "ov_int8": "int8"}
# In-process OpenVINO rows, named by the arithmetic they run.
OPENVINO_ROW = {"bf16": "openvino_bf16", "ov_fp32": "openvino_f32", "ov_int8": "openvino_int8"}


@dataclass(frozen=True)
class Repository:
    """One filter of a model repository and the sources its export came from (or the ones the user named)."""

    path: Path
    manifest: FilterRecord
    spec: FilterSpec
    base: str
    adapter: Path

    @property
    def tensor_models(self) -> dict[str, Path]:
        """``{precision: model file}`` for every exported tensor variant (``model.onnx``, or OpenVINO's ``model.xml``)."""
        from filterserve.contract import OPENVINO_PRECISIONS
        from filterserve.model_repository.runtime.openvino import MODEL_FILE

        return {p: self.path / folder / "1" / (MODEL_FILE if p in OPENVINO_PRECISIONS else "model.onnx")
                for p, folder in self.manifest.tensor_models.items()}


def open_repository(
    path: str | Path, base: str | None = None, adapter: str | Path | None = None, filter_name: str | None = None
) -> Repository:
    """One filter of a repository (the only one, or ``filter_name``), with the base and adapter its
    record names unless given, so a plain repository path suffices."""
    repo = Path(path).expanduser()
    record = read_filter_record(repo, filter_name)
    name = record.name
    recorded_base, recorded_adapter = record.sources.get("base"), record.sources.get("adapter")
    base = base or (recorded_base.path or recorded_base.hub_id if recorded_base else None)
    adapter = adapter or (recorded_adapter.path if recorded_adapter else None)
    if not base or not adapter:
        raise FilterServeError(f"the record of filter {name!r} in {repo} names no base or adapter path; pass --base and --adapter")
    spec = FilterSpec.from_dict(record.filter, f"the record of filter {name!r} in {repo}")
    return Repository(repo, record, spec, str(base), Path(adapter))


def open_choice(choice: RepositoryChoice) -> Repository:
    """The filter and sources a benchmark's options name."""
    return open_repository(choice.path, choice.base, choice.adapter, choice.name)


@dataclass
class TokenCount:
    """Tokens of the articles (real) and tokens the engine computed (rows × padded length)."""

    real: int = 0
    computed: int = 0

    @property
    def ratio(self) -> float:
        return self.computed / self.real if self.real else float("nan")


class BatchEngine:
    """In process, on right-padded batches of ``batch_size`` texts.

    ``sort_by_length`` runs the texts shortest first (scores still come back in input order),
    as a bulk job that holds its whole corpus can; ``pad_to_max_length`` pads every batch to
    max_length, as the filter's production scorer did.
    """

    arithmetic = "fp32"  # what its matmuls run in: the peak its FLOP/s are held to

    def __init__(self, name: str, tokenizer: Any, max_length: int, *, sort_by_length: bool = False,
                 pad_to_max_length: bool = False) -> None:
        self.name, self.tokenizer, self.max_length = name, tokenizer, max_length
        self.sort_by_length, self.pad_to_max_length = sort_by_length, pad_to_max_length
        self.tokens = TokenCount()

    def _batch(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _counted(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.tokens.real += int(mask.sum())
        self.tokens.computed += int(ids.size)
        return self._batch(ids, mask)

    def one(self, text: str) -> np.ndarray:
        return self.run([text], 1)

    def run(self, texts: list[str], batch_size: int = ACCURACY_BATCH) -> np.ndarray:
        """Scores texts (already in the filter's template); ``self.tokens`` counts this run's tokens."""
        from filterserve.export.parity import score_in_batches

        order = list(range(len(texts)))
        if self.sort_by_length:
            order.sort(key=lambda i: len(self.tokenizer(texts[i])["input_ids"]))
        self.tokens = TokenCount()
        scores = score_in_batches(self._counted, self.tokenizer, [texts[i] for i in order], self.max_length, batch_size,
                                  self.pad_to_max_length)
        restored = np.empty_like(scores)
        restored[order] = scores
        return restored


class TorchEngine(BatchEngine):
    def __init__(self, name: str, model: Any, tokenizer: Any, max_length: int, **options: bool) -> None:
        super().__init__(name, tokenizer, max_length, **options)
        import torch

        self.model = model
        self.arithmetic = "bf16" if next(model.parameters()).dtype == torch.bfloat16 else "fp32"

    def _batch(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        from filterserve.export.parity import torch_scores

        return torch_scores(self.model, ids, mask)


class OrtEngine(BatchEngine):
    def __init__(self, name: str, onnx_path: Path, tokenizer: Any, max_length: int, arithmetic: str = "fp32",
                 **options: bool) -> None:
        from filterserve.export.parity import ort_session

        if not onnx_path.is_file():
            raise FilterServeError(f"{name}: exported model not found at {onnx_path}")
        super().__init__(name, tokenizer, max_length, **options)
        self.session = ort_session(onnx_path)
        self.arithmetic = arithmetic

    def _batch(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        from filterserve.export.parity import ort_scores

        return ort_scores(self.session, ids, mask)[0]


class OpenVinoEngine(BatchEngine):
    """OpenVINO in process, compiled with ``properties``; its row records what OpenVINO says it ran."""

    def __init__(self, name: str, model_path: Path, properties: dict[str, Any], tokenizer: Any, max_length: int,
                 arithmetic: str, **options: bool) -> None:
        from filterserve.export.openvino_engine import OpenVinoModel

        super().__init__(name, tokenizer, max_length, **options)
        self.model = OpenVinoModel(model_path, properties)
        self.arithmetic = arithmetic
        self.execution = self.model.execution.to_dict()

    def _batch(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.model.scores(ids, mask)[0]


# A benchmark measures how long requests take under load: at 1.5B on a CPU, 16 queued 256-token
# requests wait well past the client's 30 s default, and timing them out would measure nothing.
SERVED_TIMEOUT_S = 3600.0


def served_tokens(metrics_url: str | None, model: str) -> TokenCount | None:
    """The server's own count of real and computed tokens for ``model`` (None without a metrics URL)."""
    import re
    import urllib.request

    from filterserve.contract import COMPUTED_TOKENS_METRIC, REAL_TOKENS_METRIC

    if metrics_url is None:
        return None
    text = urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=30).read().decode()

    def value(metric: str) -> int:
        match = re.search(rf'^{metric}{{model="{model}"}} (\S+)$', text, re.MULTILINE)
        return int(float(match.group(1))) if match else 0

    return TokenCount(value(REAL_TOKENS_METRIC), value(COMPUTED_TOKENS_METRIC))


class ServedEngine:
    """The served ensemble through the project's client (what ``filterserve score`` runs), ``concurrency`` requests in flight."""

    def __init__(self, name: str, url: str, protocol: WireProtocol, spec: FilterSpec, metrics_url: str | None = None,
                 arithmetic: str = "fp32") -> None:
        from filterserve.client import FilterClient

        self.name, self.spec, self.metrics_url, self.arithmetic = name, spec, metrics_url, arithmetic
        self.client = FilterClient(url, protocol, model=spec.name, timeout_s=SERVED_TIMEOUT_S)
        self.tokens: TokenCount | None = None

    def one(self, text: str) -> np.ndarray:
        """A plain request: batch-1 latency must not include a thread pool's start-up."""
        return self._matrix([self.client.score_text(text)])

    def _matrix(self, results: list) -> np.ndarray:
        from filterserve.client import ScoreError

        failed = [r for r in results if isinstance(r, ScoreError)]
        if failed:
            raise FilterServeError(f"{self.name}: {len(failed)} of {len(results)} requests failed, first: {failed[0].message}")
        return np.array([[r.scores[d] for d in self.spec.dimensions] for r in results], dtype=np.float64)

    def _send(self, items: list, concurrency: int) -> list:
        return self.client.score_many(items, concurrency=concurrency)

    def run(self, items: list, concurrency: int = ACCURACY_BATCH) -> np.ndarray:
        """Texts or (title, content) articles; ``self.tokens`` is the server's count for this run."""
        from filterserve.contract import tensor_model

        before = served_tokens(self.metrics_url, tensor_model(self.spec.name))
        scores = self._matrix(self._send(items, concurrency))
        after = served_tokens(self.metrics_url, tensor_model(self.spec.name))
        self.tokens = after and before and TokenCount(after.real - before.real, after.computed - before.computed)
        return scores


class PlainTritonEngine(ServedEngine):
    """A caller that knows nothing of filterserve: tritonclient, TITLE + CONTENT, requests in random order."""

    def _send(self, items: list, concurrency: int) -> list:
        import random
        from concurrent.futures import ThreadPoolExecutor

        import tritonclient.grpc as grpcclient

        from filterserve.client import FilterResult
        from filterserve.contract import CONTENT, SCORES, TITLE

        client = grpcclient.InferenceServerClient(self.client.url)  # gRPC clients are thread-safe
        order = list(range(len(items)))
        random.Random(0).shuffle(order)

        def one(index: int) -> tuple[int, FilterResult]:
            title, content = items[index]
            tensors = []
            for name, value in ((TITLE, title), (CONTENT, content)):
                tensor = grpcclient.InferInput(name, [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[value.encode()]], dtype=object))
                tensors.append(tensor)
            raw = client.infer(self.spec.name, tensors, client_timeout=SERVED_TIMEOUT_S).as_numpy(SCORES)[0]
            scores = dict(zip(self.spec.dimensions, map(float, raw)))
            return index, FilterResult(scores, 0.0, scores, 0.0, False, 0, False, 0.0, "", "", False)  # only the scores are read

        with ThreadPoolExecutor(concurrency) as pool:
            done = dict(pool.map(one, order))
        client.close()
        return [done[i] for i in range(len(items))]


Engine = BatchEngine | ServedEngine


def served_engines(repo: Repository, url: str | None, protocol: WireProtocol, plain: bool = False) -> Iterator[ServedEngine]:
    """The given server, or one started here on the filter's default variant (both protocols) and stopped after.

    A server started here loads that variant alone (:func:`variant_repository`): at 1.5B every
    variant of a repository together does not fit in 24 GB. ``plain`` adds a bare tritonclient
    caller sending in random order (gRPC), to compare with the client.
    """
    default = repo.manifest.default_precision
    arithmetic = PRECISION_ARITHMETIC.get(default, "fp32")
    if url:
        yield ServedEngine(f"served_{protocol}", url, protocol, repo.spec, arithmetic=arithmetic)
        return
    import tempfile

    from filterserve.serve import TritonServer

    with tempfile.TemporaryDirectory(prefix=f"filterserve-{default}-") as tmp, \
            TritonServer(variant_repository(repo, default, Path(tmp) / "repo")) as server:
        yield ServedEngine("served_grpc", server.grpc_url, "grpc", repo.spec, server.metrics_url, arithmetic)
        yield ServedEngine("served_http", server.http_url, "http", repo.spec, server.metrics_url, arithmetic)
        if plain:
            yield PlainTritonEngine("tritonclient_random_grpc", server.grpc_url, "grpc", repo.spec, server.metrics_url,
                                    arithmetic)


def variant_repository(repo: Repository, precision: str, dest: Path) -> Path:
    """``dest`` serving one exported variant through the filter's ensemble: links to the tokenizer
    and decision steps and to the variant's folder, and an ensemble config that names the variant.

    Only the default has an ensemble of its own; this is how every variant is measured served,
    one server at a time (one 1.5B variant per server, not all of them).
    """
    from google.protobuf import text_format

    from filterserve.contract import decision_model, tokenizer_model
    from filterserve.serve.assembly import read_model_config

    name = repo.spec.name
    models = repo.manifest.tensor_models
    dest.mkdir(parents=True, exist_ok=True)
    for folder in (tokenizer_model(name), decision_model(name), models[precision]):
        (dest / folder).symlink_to((repo.path / folder).resolve(), target_is_directory=True)
    ensemble = read_model_config(repo.path / name / "config.pbtxt")
    for step in ensemble.ensemble_scheduling.step:
        if step.model_name == models[repo.manifest.default_precision]:
            step.model_name = models[precision]
    (dest / name / "1").mkdir(parents=True)
    (dest / name / "config.pbtxt").write_text(text_format.MessageToString(ensemble), encoding="utf-8")
    return dest


def served_variants(repo: Repository) -> Iterator[ServedEngine]:
    """Every exported variant but the default, served through the ensemble (gRPC), one server each."""
    import tempfile

    from filterserve.serve import TritonServer

    default = repo.manifest.default_precision
    for precision in (p for p in repo.manifest.tensor_models if p != default):
        with tempfile.TemporaryDirectory(prefix=f"filterserve-{precision}-") as tmp:
            with TritonServer(variant_repository(repo, precision, Path(tmp) / "repo")) as server:
                yield ServedEngine(f"served_{precision}", server.grpc_url, "grpc", repo.spec, server.metrics_url,
                                   PRECISION_ARITHMETIC[precision])


def ort_engines(repo: Repository, tokenizer: Any, **options: bool) -> Iterator[OrtEngine]:
    from filterserve.contract import OPENVINO_PRECISIONS

    for precision, path in repo.tensor_models.items():
        if precision not in OPENVINO_PRECISIONS:
            arithmetic = PRECISION_ARITHMETIC.get(precision, "fp32")  # a hand-made variant: an ONNX file in fp32
            yield OrtEngine(f"onnx_{precision}", path, tokenizer, repo.spec.max_length, arithmetic, **options)


def openvino_engines(repo: Repository, tokenizer: Any, in_process_f32: bool = False, **options: bool) -> Iterator[OpenVinoEngine]:
    """Every OpenVINO variant as its server compiles it (its config's parameters, through the
    backend's rules); with ``in_process_f32``, also OpenVINO f32 on the fp32 ONNX file where no
    ov_fp32 variant was exported (on a bf16 CPU none can be: Triton's backend cannot pin f32)."""
    from filterserve.model_repository.runtime.openvino import compile_properties
    from filterserve.serve.assembly import read_model_config

    models = repo.manifest.tensor_models
    for precision, path in repo.tensor_models.items():
        if precision in OPENVINO_ROW:
            config = read_model_config(repo.path / models[precision] / "config.pbtxt")
            properties = compile_properties({k: v.string_value for k, v in config.parameters.items()})
            yield OpenVinoEngine(OPENVINO_ROW[precision], path, properties, tokenizer, repo.spec.max_length,
                                 PRECISION_ARITHMETIC[precision], **options)
    if in_process_f32 and "fp32" in models and "ov_fp32" not in models:
        fp32 = repo.tensor_models["fp32"]
        yield OpenVinoEngine(OPENVINO_ROW["ov_fp32"], fp32, {"INFERENCE_PRECISION_HINT": "f32"}, tokenizer,
                             repo.spec.max_length, "fp32", **options)


def exported_engines(repo: Repository, tokenizer: Any, in_process_f32: bool = False, **options: bool) -> Iterator[BatchEngine]:
    """Every exported variant in process, ONNX Runtime's then OpenVINO's (see :func:`openvino_engines`)."""
    yield from ort_engines(repo, tokenizer, **options)
    yield from openvino_engines(repo, tokenizer, in_process_f32, **options)


def n_exported_engines(repo: Repository, in_process_f32: bool = False) -> int:
    """How many rows :func:`exported_engines` yields (for progress bars)."""
    models = repo.manifest.tensor_models
    return len(models) + (in_process_f32 and "fp32" in models and "ov_fp32" not in models)
