"""A repository whose one Python model sleeps on purpose, to build queues in tests.

The ensemble ``slow_v1`` takes ``TEXT`` like a filter ensemble (so the supervisor probes it) and
runs one step, ``slow_v1_sleep``, which holds every execution for ``delay_s`` and answers the
text's length in bytes. No dynamic batching and one instance: N requests take N × delay_s, so a
queue far deeper than the supervisor's probe deadline takes a few lines to build.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

ENSEMBLE = "slow_v1"
SLEEP_MODEL = f"{ENSEMBLE}_sleep"

MODEL_PY = '''
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.delay_s = float(json.loads(args["model_config"])["parameters"]["delay_s"]["string_value"])

    def execute(self, requests):
        responses = []
        for request in requests:
            time.sleep(self.delay_s)
            texts = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
            lengths = np.array([[len(t[0])] for t in texts], dtype=np.int32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("LENGTH", lengths)]))
        return responses
'''


def _text_input(config: mc.ModelConfig) -> None:
    config.input.add(name="TEXT", data_type=mc.TYPE_STRING, dims=[1], optional=True)


def _write(model_dir: Path, config: mc.ModelConfig) -> None:
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config), encoding="utf-8")


def build_slow_repository(repo: Path, delay_s: float) -> Path:
    """``repo`` holding the sleeping model and its ensemble; returns ``repo``."""
    sleep = mc.ModelConfig(name=SLEEP_MODEL, backend="python", max_batch_size=1)
    _text_input(sleep)
    sleep.output.add(name="LENGTH", data_type=mc.TYPE_INT32, dims=[1])
    sleep.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    sleep.parameters["delay_s"].string_value = str(delay_s)
    _write(repo / SLEEP_MODEL, sleep)
    (repo / SLEEP_MODEL / "1" / "model.py").write_text(MODEL_PY, encoding="utf-8")

    ensemble = mc.ModelConfig(name=ENSEMBLE, platform="ensemble", max_batch_size=1)
    _text_input(ensemble)
    ensemble.output.add(name="LENGTH", data_type=mc.TYPE_INT32, dims=[1])
    ensemble.ensemble_scheduling.step.add(
        model_name=SLEEP_MODEL, model_version=-1, input_map={"TEXT": "TEXT"}, output_map={"LENGTH": "LENGTH"}
    )
    _write(repo / ENSEMBLE, ensemble)
    return repo
