"""Stage-1 probe pickles made as production makes them, for the probe reader and converter tests.

``MLPProbe`` is production's class as ``filters/common/embedding_stage.py`` (veen-systems/llm-distillery
@3e1ccec) and ``scripts/train_probe.py`` (@046fa0d) define it; ``write_production_probe`` writes the
file as train_probe.py does: ``pickle.dump`` of a dict holding a fitted sklearn StandardScaler and
the MLP's ``state_dict()``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from sklearn.preprocessing import StandardScaler
from torch import nn

E5_SMALL_DIM = 384


class MLPProbe(nn.Module):
    """Production's probe: Linear-ReLU-Dropout per hidden size, then a Linear to the dimensions."""

    def __init__(self, input_dim: int, output_dim: int, hidden_sizes: tuple[int, ...] = (256, 128), dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = []
        prev_dim = input_dim
        for hidden_size in hidden_sizes:
            layers.extend([nn.Linear(prev_dim, hidden_size), nn.ReLU(), nn.Dropout(dropout)])
            prev_dim = hidden_size
        layers.append(nn.Linear(prev_dim, output_dim))
        self.network = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


def embeddings(n: int, seed: int, dim: int = E5_SMALL_DIM, spread: float = 0.5) -> np.ndarray:
    """Unit-length FP32 vectors, as e5's normalize step gives, around one common direction.

    e5's embeddings of unrelated texts have cosine similarities around 0.8: ``spread`` 0.5 gives
    that; a large spread gives directions uniform on the sphere.
    """
    common = np.random.default_rng(0).normal(size=dim)
    x = np.random.default_rng(seed).normal(size=(n, dim)) * spread + common
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def production_probe(output_dim: int, seed: int, hidden_sizes: tuple[int, ...] = (256, 128),
                     with_mean: bool = True, with_std: bool = True, input_dim: int = E5_SMALL_DIM) -> tuple[StandardScaler, MLPProbe]:
    """A fitted scaler and an MLP whose outputs land in the 0-10 score range on e5-like inputs
    (``input_dim``: the embedder's width; a stand-in e5's is smaller)."""
    torch.manual_seed(seed)
    scaler = StandardScaler(with_mean=with_mean, with_std=with_std).fit(embeddings(200, seed, input_dim))
    model = MLPProbe(input_dim, output_dim, hidden_sizes)
    with torch.no_grad():
        model.network[-1].bias.add_(3.0)
    return scaler, model.eval()


def write_production_probe(path: Path, scaler: StandardScaler, model: MLPProbe, protocol: int = pickle.DEFAULT_PROTOCOL) -> Path:
    """The file train_probe.py writes (its ``probe_data``, ``pickle.dump``)."""
    probe_data = {
        "probe_type": "mlp",
        "scaler": scaler,
        "state_dict": model.state_dict(),
        "model_config": {"input_dim": model.network[0].in_features, "output_dim": model.network[-1].out_features},
        "metrics": {"val_mae": 0.8125},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(probe_data, f, protocol=protocol)
    return path


def reference_scores(scaler: StandardScaler, model: MLPProbe, x: np.ndarray) -> np.ndarray:
    """EmbeddingStage.screen_batch before the clamp: scaler.transform, then the MLP in eval mode."""
    with torch.no_grad():
        return model(torch.FloatTensor(scaler.transform(x))).numpy()
