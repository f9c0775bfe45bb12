"""A filter whose scores mean something, trained in about a minute on CPU.

The stand-in's random weights prove that an export is faithful, but not that it keeps the
model's accuracy: a variant can stay within a parity tolerance on five texts and still move the
validation MAE. This fixture gives the accuracy benchmark labels that the model really learned:
each dimension has a few cue words, an article's label is a clipped count of its cues plus
noise, and a tiny Qwen2 + LoRA regression filter (the stand-in's layout, trained) learns them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from filterserve import defaults
from filterserve.errors import FilterServeError
from filterserve.export.standin import StandinShape, build_standin
from filterserve.filters import UPLIFTING_V4, FilterSpec
from filterserve.gate import labels, write_jsonl
from filterserve.progress import Steps

# Words the stand-in tokenizer was trained on (filterserve.data's articles), so each is one or
# two tokens; three per dimension, in the filter's dimension order.
CUE_POOL = (
    "volunteers organised residents "
    "new technology reopened "
    "families public people "
    "neighbours club members "
    "membrane solar design "
    "court innocence law "
    "flooded rebuild returning "
    "comet astronomers sun "
    "school students university "
    "energy water clean "
    "bakery bread food "
    "river valley village"
).split()
FILLER = (
    "the council budget markets shares investors rate outlook week month year plan a an of to in "
    "on with after while under from by at meeting station analysts traders company exchanges "
    "prices oil parking fees taxes bus car wall day night city regional central second third"
).split()
CUES_PER_DIMENSION = 3
BASELINE, PER_CUE, NOISE = 1.0, 2.5, 0.3


@dataclass(frozen=True)
class TrainedFixture:
    base_dir: Path
    adapter_dir: Path
    train_path: Path
    val_path: Path
    val_mae: float
    constant_mae: float


def cue_words(spec: FilterSpec) -> dict[str, list[str]]:
    needed = CUES_PER_DIMENSION * spec.num_labels
    if needed > len(CUE_POOL):
        raise FilterServeError(f"the trained fixture has cue words for at most {len(CUE_POOL) // CUES_PER_DIMENSION} dimensions")
    return {
        dim: CUE_POOL[i * CUES_PER_DIMENSION : (i + 1) * CUES_PER_DIMENSION] for i, dim in enumerate(spec.dimensions)
    }


def generate_articles(
    spec: FilterSpec,
    n: int,
    seed: int,
    cues: Mapping[str, Sequence[str]] | None = None,
    backgrounds: Sequence[Sequence[str]] | None = None,
) -> list[dict[str, Any]]:
    """Articles whose labels follow from their words: clipped weighted cue counts plus noise, on 0–10.

    By default an article is a bag of :data:`FILLER` words and :func:`cue_words`. ``cues``
    (dimension → words) and ``backgrounds`` (texts as word lists, with no cue word in them) let a
    caller train on its own articles instead: each generated article is then one background, in
    its order, with the cue words dropped in at random places, so the model learns the cues in
    the very sentences it will score (the demo does this with its sample articles).
    """
    rng = random.Random(seed)
    chosen: Mapping[str, Sequence[str]] = cues or cue_words(spec)
    if set(chosen) != set(spec.dimensions) or not all(chosen.values()):
        raise FilterServeError(f"cue words must name every dimension of {spec.name!r} with at least one word")
    articles = []
    for i in range(n):
        counts = {dim: rng.choice((0, 0, 1, 2, 3)) for dim in spec.dimensions}
        if backgrounds:
            words = list(rng.choice(backgrounds))
            for dim, count in counts.items():
                for _ in range(count):
                    words.insert(rng.randint(0, len(words)), rng.choice(chosen[dim]))
        else:
            words = [rng.choice(FILLER) for _ in range(rng.randint(20, 40))]
            for dim, count in counts.items():
                words += [rng.choice(chosen[dim]) for _ in range(count)]
            rng.shuffle(words)
        article: dict[str, Any] = {"id": f"t{seed}-{i}", "title": " ".join(words[:6]).capitalize(), "content": " ".join(words[6:]) + "."}
        for dim, count in counts.items():
            article[dim] = round(min(10.0, max(0.0, BASELINE + PER_CUE * count + rng.gauss(0.0, NOISE))), 3)
        articles.append(article)
    return articles


@contextmanager
def single_thread() -> Iterator[None]:
    """A tiny model gains nothing from intra-op threads, and on a CPU shared with another job
    their barriers stall: 300 steps took over 3 minutes on 2 threads and 6 s on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_trained_fixture(
    out: Path,
    spec: FilterSpec = UPLIFTING_V4,
    steps: int = defaults.FIXTURE_STEPS,
    n_train: int = 480,
    n_val: int = 120,
    seed: int = defaults.FIXTURE_SEED,
    cues: Mapping[str, Sequence[str]] | None = None,
    backgrounds: Sequence[Sequence[str]] | None = None,
    shape: StandinShape | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainedFixture:
    """Write ``out/base``, ``out/adapter`` (trained), ``out/train.jsonl`` and ``out/val.jsonl``.

    The stand-in's random adapter is the starting point, so the files are in exactly the layout
    the export reads; training only moves the LoRA weights and the score head. ``shape`` picks the
    base (default: the tiny Qwen2; :meth:`StandinShape.gemma3_tiny` for Gemma-3's layout). ``on_step``
    hears the number of steps done after each one (the demo's progress bar, across processes).
    """
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from filterserve.benchmarks.engines import TorchEngine
    from filterserve.export.load import load_tokenizer, quiet_libraries
    from filterserve.export.parity import encode

    if steps < 1 or n_train < 1 or n_val < 1:
        raise FilterServeError(f"steps, n_train and n_val must be positive, got {steps}, {n_train}, {n_val}")
    quiet_libraries()
    progress = Steps(total=4)
    out.mkdir(parents=True, exist_ok=True)
    with progress.step("generate labelled articles and the untrained stand-in"):
        articles = generate_articles(spec, n_train + n_val, seed, cues, backgrounds)
        train, val = articles[:n_train], articles[n_train:]
        write_jsonl(out / "train.jsonl", train)
        write_jsonl(out / "val.jsonl", val)
        standin = build_standin(out, spec, shape or StandinShape(), seed=seed)

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(standin.adapter_dir)
    base = AutoModelForSequenceClassification.from_pretrained(
        standin.base_dir, num_labels=spec.num_labels, dtype=torch.float32
    )
    base.config.pad_token_id = tokenizer.pad_token_id  # as the export does: the pooling needs it
    model = PeftModel.from_pretrained(base, str(standin.adapter_dir), is_trainable=True)
    y_train = torch.tensor(labels(train, spec), dtype=torch.float32)
    with progress.step(f"train LoRA + score head ({steps} steps, batch 16)"), single_thread():
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for step in range(steps):
            batch = torch.randint(len(train), (16,), generator=gen).tolist()
            texts = spec.model_texts([spec.input_text(train[i]["title"], train[i]["content"]) for i in batch], tokenizer)
            ids, mask = encode(tokenizer, texts, spec.max_length)
            logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
            loss = torch.nn.functional.smooth_l1_loss(logits, y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if on_step is not None:
                on_step(step + 1)
            if (step + 1) % max(1, steps // 5) == 0:
                progress.say(f"step {step + 1}: loss {loss.item():.3f}")
        model.eval()

    with progress.step("validate against a constant predictor"):
        y_val = labels(val, spec)
        texts = spec.model_texts([spec.input_text(a["title"], a["content"]) for a in val], tokenizer)
        predicted = TorchEngine("trained", model, tokenizer, spec.max_length).run(texts)
        val_mae = float(np.abs(predicted - y_val).mean())
        constant_mae = float(np.abs(np.median(labels(train, spec), axis=0) - y_val).mean())
        progress.say(f"validation MAE {val_mae:.3f} vs constant (train median) {constant_mae:.3f}")

    with progress.step(f"save the trained adapter to {standin.adapter_dir}"):
        model.save_pretrained(str(standin.adapter_dir))
    return TrainedFixture(standin.base_dir, standin.adapter_dir, out / "train.jsonl", out / "val.jsonl", val_mae, constant_mae)
