"""Triton's OpenVINO backend: the parameters it accepts, what it compiles from them, and what it cannot do.

Read from the backend's source (triton-inference-server/openvino_backend, ``src/openvino.cc``,
2026-08 head), not run: NVIDIA's container is not available here. What it implies:

- It reads only the keys of :data:`BACKEND_PARAMETERS` (``ParseParameters``); values are
  lower-cased and checked (``ParseParameterHelper``), and one it cannot parse fails the load.
- The only precision it can ask for is ``HINT_BF16: YES``. It cannot pin f32: OpenVINO's CPU
  plugin runs bf16 by itself on a CPU with avx512_bf16 or AMX, so on such a CPU every model it
  serves runs bf16 (an int8 model too, outside its quantized layers). The export therefore
  gates, for each OpenVINO variant, the precision the backend will run on the export's CPU, and
  the filter's record names it with the CPU flags it depended on.
- With ``max_batch_size`` > 0 it fixes the model's batch at ``max_batch_size``
  (``ov::set_batch``) and refuses smaller batches unless ``ENABLE_BATCH_PADDING`` pads every
  run to ``max_batch_size`` rows. Real news arrives one article at a time, so that would compute
  up to 32 rows per article. The tensor models it serves here are declared ``max_batch_size: 0``
  with full shapes ``[-1, -1]``: every request runs at its own shape, nothing is padded, and
  Triton's dynamic batcher does not join requests (tritonserver 2.51 accepts such a step in a
  batching ensemble; tested).

The Python-backend stand-in (``backends/openvino/model.py``) reads the same parameters through
:func:`compile_properties`, which the export's parity check and accuracy gate use too, so what
was gated is what is served.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from filterserve import contract
from filterserve.errors import FilterServeError

BACKEND = "openvino"
MODEL_FILE = "model.xml"  # with model.bin beside it: the backend's default_model_filename
# Every key the backend reads (openvino.cc ParseParameters); it ignores any other, so a key outside
# this list would be a setting that silently does nothing in NVIDIA's container.
BACKEND_PARAMETERS = (
    "PERFORMANCE_HINT",
    "INFERENCE_NUM_THREADS",
    "COMPILATION_NUM_THREADS",
    "NUM_STREAMS",
    "HINT_BF16",
    "CPU_EXTENSION_PATH",
    "SKIP_OV_DYNAMIC_BATCHSIZE",
    "ENABLE_BATCH_PADDING",
    "RESHAPE_IO_LAYERS",
    "TARGET_DEVICE",
)
# Keys that reshape or pad batches; the tensor models here have full dynamic shapes and need none,
# and the stand-in does not emulate them.
BATCH_SHAPING_PARAMETERS = ("SKIP_OV_DYNAMIC_BATCHSIZE", "ENABLE_BATCH_PADDING", "RESHAPE_IO_LAYERS")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
# Beside config.pbtxt: what only filterserve's stand-in reads (the backend ignores other files).
# The input rules the ONNX Runtime stand-in takes from config parameters, which this backend's
# config may not hold, and the execution precision the export gated.
STANDIN_FILE = "filterserve_model.json"


def backend_parameters(bf16: bool) -> dict[str, str]:
    """The config parameters of an OpenVINO tensor model.

    LATENCY: one stream with every thread, for one request at a time (there is no batching, see
    the module notes). No thread count: the backend's default is the machine's cores, which the
    export cannot know. ``bf16`` adds HINT_BF16; without it the CPU's default precision runs.
    """
    return {"PERFORMANCE_HINT": "LATENCY", **({"HINT_BF16": "YES"} if bf16 else {})}


def _count(key: str, value: str) -> int:
    if not value.isdigit():
        raise FilterServeError(f"OpenVINO parameter {key} must be a non-negative number, got {value!r}")
    return int(value)


def compile_properties(parameters: Mapping[str, str]) -> dict[str, Any]:
    """The properties the backend gives ``compile_model`` for these parameters, refusing what it refuses.

    Keys it does not read are refused here too: one of them in a generated config would be a
    setting that does nothing in NVIDIA's container.
    """
    unknown = sorted(set(parameters) - set(BACKEND_PARAMETERS))
    if unknown:
        raise FilterServeError(
            f"Triton's OpenVINO backend does not read the parameter(s) {', '.join(unknown)}; it reads only "
            f"{', '.join(BACKEND_PARAMETERS)}"
        )
    properties: dict[str, Any] = {}
    for key in ("INFERENCE_NUM_THREADS", "COMPILATION_NUM_THREADS"):
        if key in parameters:
            properties[key] = _count(key, parameters[key].strip().lower())
    if "HINT_BF16" in parameters:
        if parameters["HINT_BF16"].strip().lower() != "yes":
            raise FilterServeError(f"OpenVINO parameter HINT_BF16 must be YES, got {parameters['HINT_BF16']!r}")
        properties["INFERENCE_PRECISION_HINT"] = "bf16"
    if "NUM_STREAMS" in parameters:
        value = parameters["NUM_STREAMS"].strip().lower()
        properties["NUM_STREAMS"] = value.upper() if value in ("auto", "numa") else _count("NUM_STREAMS", value)
    if "PERFORMANCE_HINT" in parameters:
        value = parameters["PERFORMANCE_HINT"].strip().upper()
        if value not in PERFORMANCE_HINTS:
            raise FilterServeError(f"OpenVINO parameter PERFORMANCE_HINT must be one of {', '.join(PERFORMANCE_HINTS)}, got {value!r}")
        properties["PERFORMANCE_HINT"] = value
    return properties


def target_device(parameters: Mapping[str, str]) -> str:
    return parameters.get("TARGET_DEVICE", "").strip().upper() or "CPU"


def write_standin_file(model_dir: Path, rules: Mapping[str, int], execution_precision: str | None,
                       members: list[str] | None = None) -> None:
    """The stand-in's input rules (vocab_size, pad_token_id, max_length, max_batch_tokens), the gated precision,
    and a shared-base group's members (the ONNX Runtime stand-in reads them from a config parameter,
    which this backend's config may not hold), so a row's ``filter_index`` is checked the same way."""
    body = {**rules, "execution_precision": execution_precision,
            **({contract.GROUP_MEMBERS_PARAMETER: members} if members is not None else {})}
    (model_dir / STANDIN_FILE).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")


def read_standin_file(model_dir: Path) -> dict[str, Any]:
    path = model_dir / STANDIN_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FilterServeError(f"cannot read {path}, which the OpenVINO stand-in needs: {exc}") from None
