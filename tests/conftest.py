"""Shared fixtures: a tiny randomly initialised Llama with a byte-level tokenizer, saved as an ordinary
transformers folder, so that most tests run in seconds without the real model."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks.loopback import ServerProcess

# The repository first (so that tests/client and tests/server never shadow the packages), then tests/ for
# `import support`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))


def pytest_configure(config):
    """Triton's interpreter for the Triton kernel tests (tests/server/test_triton_delta.py), set before anything
    imports triton: triton reads TRITON_INTERPRET when its own library functions (tl.zeros, tl.max, ...) are
    defined, at its import, which torch may do early (a kernel of ours then fails in the interpreter). Not for
    ``-m cuda``, which runs the kernels compiled on a GPU."""
    import os

    if "cuda" not in (config.option.markexpr or "").replace("not cuda", ""):
        os.environ.setdefault("TRITON_INTERPRET", "1")


def make_tiny_model(folder: Path, *, seed: int = 0, layers: int = 2) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<unk>")
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_base(tiny_model_dir, tmp_path_factory):
    """The tiny model loaded through the server's own loader (frozen, CPU, fp32)."""
    from server.model import load_base

    return load_base(tiny_model_dir, tmp_path_factory.mktemp("cache"), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def sparse_kernel(tmp_path_factory):
    """The compiled sparse-delta CPU kernel, built once per test session. The test machines have a C compiler
    (gcc), so a failed build fails the tests that use it rather than passing them on the fallback."""
    from server.sparse_kernel import build, load

    folder = tmp_path_factory.mktemp("kernels")
    build(folder)  # raises with the compiler's message
    kernel = load(folder)
    assert kernel is not None
    return kernel


@pytest.fixture
def start_server(tmp_path):
    """Factory: start_server(model_dir, store=None, **kw) -> a ServerProcess; all stopped at teardown."""
    started = []

    def start(model_dir, store: Path | None = None, wait: bool = True, **kw) -> ServerProcess:
        store = store or tmp_path / "store"
        server = ServerProcess(model_dir, store, tmp_path / "cache", **kw)
        started.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory) -> Path:
    """The real default model (SmolLM2-135M-Instruct), converted once per test session. Slow tests only."""
    from server.model import convert_default_model

    return convert_default_model(tmp_path_factory.mktemp("default-model-cache"))
