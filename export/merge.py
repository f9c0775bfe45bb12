"""Merge the LoRA into the base and prove that the merge kept what was trained."""

from __future__ import annotations

import numpy as np
import torch

from filterserve.contract import MERGE_TOLERANCE
from filterserve.errors import FilterServeError
from filterserve.export.load import Loaded
from filterserve.export.parity import ParityResult, compare, torch_scores


def merge(loaded: Loaded, ids: np.ndarray, mask: np.ndarray, reference: np.ndarray) -> tuple[torch.nn.Module, ParityResult]:
    """``merge_and_unload``, then check: no LoRA left, trained head kept, same scores as PEFT."""
    merged = loaded.model.merge_and_unload()
    merged.eval()
    leftovers = [n for n, _ in merged.named_parameters() if "lora_" in n or "modules_to_save" in n]
    if leftovers:
        raise FilterServeError(f"merge left adapter weights behind: {leftovers[:3]}")
    head = merged.score.weight.detach()
    if head.shape != loaded.adapter_score_weight.shape or not torch.equal(head, loaded.adapter_score_weight.to(head.dtype)):
        raise FilterServeError(
            "the merged model's score head is not the adapter's trained head "
            "(modules_to_save was lost in the merge)"
        )
    if merged.config.pad_token_id != loaded.pad_token_id:
        raise FilterServeError("the merged model lost pad_token_id; pooling would pick the wrong token")
    return merged, compare("merged PyTorch", torch_scores(merged, ids, mask), reference, MERGE_TOLERANCE)
