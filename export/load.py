"""Load base + adapter exactly as the model card does, and refuse mismatches before PEFT does.

PEFT's own errors for a wrong adapter are a ``size mismatch`` deep inside ``load_state_dict``
(or, worse, nothing at all when only the head differs); the checks here name the problem.

The architecture is the base's: its config's ``model_type`` picks the sequence classifier through
transformers' auto mapping (``qwen2`` → Qwen2ForSequenceClassification, ``gemma3_text`` →
Gemma3TextForSequenceClassification). Both pool at the last token whose id is not
``config.pad_token_id``, reading ``input_ids`` and ignoring the mask; Qwen2.5's config has no pad id
(set from the tokenizer, ``<|endoftext|>``), Gemma-3's has 0 (``<pad>``), which must be the
tokenizer's too.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from filterserve import defaults
from filterserve.errors import FilterServeError
from filterserve.filters import FilterSpec
from filterserve.manifest import read_json_object

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class Loaded:
    """The card's reference model (PEFT, unmerged) and its tokenizer."""

    model: Any  # peft.PeftModel
    tokenizer: Any
    pad_token_id: int
    vocab_size: int
    adapter_score_weight: torch.Tensor
    architecture: str  # the base config's model_type: qwen2, gemma3_text


def quiet_libraries() -> None:
    """Our progress lines replace transformers' load reports and the exporters' chatter."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("peft", "torch.onnx", "torch._dynamo", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(peft|torch\.onnx)")


def adapter_weights_path(adapter_dir: Path) -> Path:
    if not adapter_dir.is_dir():
        raise FilterServeError(f"adapter folder not found: {adapter_dir}")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FilterServeError(
            f"{adapter_dir} is not a PEFT adapter folder: adapter_config.json is missing"
        )
    for name in ADAPTER_WEIGHTS:
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise FilterServeError(f"{adapter_dir} holds no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")


def read_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = adapter_weights_path(adapter_dir)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch raise their own types for a truncated or corrupt file
        raise FilterServeError(f"cannot read the adapter weights {path} (truncated or corrupt?): {exc}") from None


def check_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    config = read_json_object(adapter_dir / "adapter_config.json", "adapter config")
    if config.get("peft_type") != "LORA":
        raise FilterServeError(f"adapter in {adapter_dir} is {config.get('peft_type')!r}, not a LoRA adapter")
    if config.get("task_type") != "SEQ_CLS":
        raise FilterServeError(
            f"adapter in {adapter_dir} has task_type {config.get('task_type')!r}; a scoring filter "
            "is a SEQ_CLS adapter whose trained score head is saved with it"
        )
    return config


def score_head(tensors: dict[str, torch.Tensor], adapter_dir: Path) -> torch.Tensor:
    heads = [k for k in tensors if k.endswith("score.weight") and "lora_" not in k]
    if len(heads) != 1:
        raise FilterServeError(
            f"adapter in {adapter_dir} carries no trained score head (expected one 'score.weight' "
            f"saved through modules_to_save, found {heads or 'none'})"
        )
    return tensors[heads[0]]


def check_shapes(model: Any, tensors: dict[str, torch.Tensor], adapter_dir: Path) -> None:
    """Every LoRA pair must fit the base module it targets, and the head must fit the hidden size."""
    problems: list[str] = []
    for key, tensor in tensors.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        module_path = key.split(".lora_")[0].removeprefix("base_model.model.")
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            problems.append(f"{module_path} (targeted by the adapter) does not exist in the base")
            continue
        if ".lora_A." in key and tensor.shape[1] != module.in_features:
            problems.append(f"{module_path}: LoRA A takes {tensor.shape[1]} inputs, base layer {module.in_features}")
        if ".lora_B." in key and tensor.shape[0] != module.out_features:
            problems.append(f"{module_path}: LoRA B gives {tensor.shape[0]} outputs, base layer {module.out_features}")
        if len(problems) >= 3:
            break
    head = score_head(tensors, adapter_dir)
    if head.shape[1] != model.config.hidden_size:
        problems.append(f"score head expects hidden size {head.shape[1]}, base has {model.config.hidden_size}")
    if problems:
        raise FilterServeError(
            f"adapter {adapter_dir} does not match the base model: " + "; ".join(problems)
        )


def load_tokenizer(adapter_dir: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    except (OSError, ValueError) as exc:
        raise FilterServeError(f"cannot load the tokenizer from {adapter_dir}: {exc}") from None
    if tokenizer.pad_token_id is None:
        raise FilterServeError(
            f"the tokenizer in {adapter_dir} has no pad token; Qwen's is '<|endoftext|>', Gemma's '<pad>', and the "
            "pooling finds the last non-pad token through it (set pad_token in tokenizer_config.json)"
        )
    tokenizer.padding_side = "right"
    return tokenizer


def check_head_tail_tokenizer(tokenizer: Any, spec: FilterSpec, adapter_dir: Path) -> None:
    """The head+tail cut decodes with the tokenizer's backend everywhere (the server has nothing else);
    transformers' decode differs from it only by a space clean-up, which it skips for BPE models."""
    if spec.head_tail is None or not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return
    if type(tokenizer.backend_tokenizer.model).__name__ != "BPE":
        raise FilterServeError(
            f"the tokenizer in {adapter_dir} cleans up tokenization spaces when decoding, which the server's "
            "tokenizer step cannot repeat: head+tail needs a BPE tokenizer or clean_up_tokenization_spaces false"
        )


def path_like(base: str) -> str | None:
    """Why a --base that is not a folder is meant as one, not as a hub id ``org/name`` (None: it may be a hub id)."""
    if base.startswith((".", "/", "~")):
        return "it starts like a path"
    if base.count("/") != 1:
        return "a hub id is org/name"
    first = base.split("/")[0]
    return f"{first}/ is a folder here" if Path(first).is_dir() else None


def locate_base(base: str) -> str:
    """Where the base model loads from (:func:`locate_model`)."""
    return locate_model(base, "base model")


def locate_model(where: str, what: str) -> str:
    """Where a model (``what``: "base model", "stage-1 embedder") loads from: its folder, or a hub id's
    snapshot in the local Hugging Face cache.

    Refused in one line, within seconds: a folder that does not exist, and a hub id that is neither
    cached nor known to the hub, asked once (no retry loop, :data:`defaults.HUB_TIMEOUT_S`). A hub id
    the hub knows is returned as it is, for the loader to download.
    """
    if Path(where).expanduser().is_dir():
        return str(Path(where).expanduser())
    why = path_like(where)
    if why is not None:
        raise FilterServeError(f"{what} not found: {where} (no such folder, and not a hub id: {why})")
    import httpx2
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    cached = try_to_load_from_cache(where, "config.json")
    if isinstance(cached, str):
        return str(Path(cached).parent)  # the snapshot folder: loads without asking the hub
    try:
        HfApi().model_info(where, timeout=defaults.HUB_TIMEOUT_S)
    except (HfHubHTTPError, OfflineModeIsEnabled, httpx2.HTTPError) as exc:
        raise FilterServeError(
            f"{what} {where!r} is not a folder, not in the local Hugging Face cache, and the hub did not give it "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no answer'}): pass the model's folder, "
            f"or download it first (hf download {where})"
        ) from None
    return where


def load_base_model(base: str, num_labels: int) -> Any:
    """The base for sequence classification in fp32; a folder or cached hub id that cannot be read is one line naming the file."""
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification

    where = locate_base(base)
    try:
        return AutoModelForSequenceClassification.from_pretrained(where, num_labels=num_labels, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise FilterServeError(f"cannot load the base model {base!r}: {exc}") from None
    except SafetensorError as exc:  # a truncated or corrupt weights file
        raise FilterServeError(f"cannot read the base model's weights {unreadable_weights(Path(where))} "
                               f"(truncated or corrupt?): {exc}") from None


def unreadable_weights(folder: Path) -> Path | str:
    """The first ``*.safetensors`` file of ``folder`` that safetensors cannot open (the error does not name it)."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key)
        except SafetensorError:
            return path
    return f"in {folder}"


def load_reference(base: str, adapter_dir: Path, spec: FilterSpec) -> Loaded:
    """The card's recipe: fp32 base for sequence classification, pad id set, PEFT adapter on top."""
    from peft import PeftModel

    quiet_libraries()
    check_adapter_config(adapter_dir)
    tensors = read_adapter_tensors(adapter_dir)
    head = score_head(tensors, adapter_dir)
    if head.shape[0] != spec.num_labels:
        raise FilterServeError(
            f"the adapter's score head has {head.shape[0]} outputs but filter {spec.name!r} has "
            f"{spec.num_labels} dimensions ({', '.join(spec.dimensions)}); pass the matching --filter"
        )
    tokenizer = load_tokenizer(adapter_dir)
    check_head_tail_tokenizer(tokenizer, spec, adapter_dir)
    model = load_base_model(base, spec.num_labels)
    config_pad = model.config.pad_token_id
    if config_pad is not None and config_pad != tokenizer.pad_token_id:
        raise FilterServeError(
            f"the base {base!r} says pad_token_id {config_pad} but the tokenizer in {adapter_dir} pads with "
            f"{tokenizer.pad_token_id}: the pooling would read padding as text"
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    check_shapes(model, tensors, adapter_dir)
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    except RuntimeError as exc:  # size mismatches the checks above did not foresee
        raise FilterServeError(f"adapter {adapter_dir} does not match the base model: {exc}") from None
    model.eval()
    return Loaded(
        model=model,
        tokenizer=tokenizer,
        pad_token_id=int(tokenizer.pad_token_id),
        vocab_size=int(model.config.vocab_size),
        adapter_score_weight=head,
        architecture=str(model.config.model_type),
    )
