"""Triton model repository for a filter: tokenizer (Python) → tensor model (ONNX) as one ensemble.

This package writes a repository; what runs inside tritonserver (the tokenizer step, the
stand-in backends) lives apart in :mod:`filterserve.model_repository.runtime`, which never
imports the writers. Every config.pbtxt is generated from Triton's own ``ModelConfig`` protobuf
(shipped with tritonclient), so a typo in a field name fails here rather than when the server
loads it.
"""

from filterserve.model_repository.repository import (
    ensemble_config,
    tensor_model_config,
    tensor_model_name,
    tokenizer_config,
    write_repository,
)

__all__ = [
    "ensemble_config",
    "tensor_model_config",
    "tensor_model_name",
    "tokenizer_config",
    "write_repository",
]
