"""Loading the base model, its fingerprint, and the one-time conversion of the default model."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from server import model as model_mod
from server.errors import ModelLoadError


def test_base_is_frozen_eval_and_fp32_on_cpu(tiny_base):
    assert all(not p.requires_grad for p in tiny_base.model.parameters())
    assert not tiny_base.model.training
    assert tiny_base.device.type == "cpu" and tiny_base.dtype == torch.float32
    assert next(tiny_base.model.parameters()).dtype == torch.float32


def test_fingerprint_is_stable_and_sees_one_changed_weight(tiny_model_dir, tiny_base, tmp_path):
    again = model_mod.load_base(tiny_model_dir, tmp_path, device="cpu", dtype="float32")
    assert again.fingerprint == tiny_base.fingerprint and len(again.fingerprint) == 64
    with torch.no_grad():
        again.model.model.layers[0].self_attn.q_proj.weight[0, 0] += 1e-3
    assert model_mod.fingerprint(again.model) != tiny_base.fingerprint


def test_fingerprint_sees_the_config(tiny_base):
    tiny_base.model.config.rms_norm_eps *= 2
    try:
        assert model_mod.fingerprint(tiny_base.model) != tiny_base.fingerprint
    finally:
        tiny_base.model.config.rms_norm_eps /= 2


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not a transformers model folder"):
        model_mod.load_base(tmp_path / "nope", tmp_path, device="cpu")


def test_device_auto_is_cpu_without_cuda():
    if torch.cuda.is_available():
        assert model_mod.resolve_device("auto").type == "cuda"
    else:
        assert model_mod.resolve_device("auto").type == "cpu"
        with pytest.raises(ModelLoadError, match="CUDA"):
            model_mod.resolve_device("cuda")


def test_target_linears_and_replace(tiny_base):
    found = model_mod.target_linears(tiny_base.model, ["q_proj", "v_proj"])
    assert list(found) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                           "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(ValueError, match="nope"):
        model_mod.target_linears(tiny_base.model, ["q_proj", "nope"])


@pytest.mark.slow
def test_interrupted_conversion_leaves_no_usable_folder_then_converts(tmp_path):
    code = "from server.model import convert_default_model; import sys; convert_default_model(sys.argv[1])"
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)])
    target = model_mod.converted_default_path(tmp_path)
    deadline = time.monotonic() + 120
    # Kill it once its temporary folder exists (it is writing), well before it can finish.
    while not (target.parent.exists() and any(target.parent.glob(".tmp-*"))):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    start = time.monotonic()
    path = model_mod.convert_default_model(tmp_path)
    first = time.monotonic() - start
    assert path == target and model_mod.is_complete(path)
    start = time.monotonic()
    base = model_mod.load_base(None, tmp_path, device="cpu")
    cached = time.monotonic() - start
    assert base.model.config.num_hidden_layers == 30
    assert cached < first
    print(f"conversion {first:.1f} s, cached load {cached:.1f} s")
