"""The real default model behind a real server (slow: converts SmolLM2 once per session)."""
from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.slow


def test_server_generates_real_text_with_smollm2(default_model_dir, start_server):
    server = start_server(default_model_dir)
    r = httpx.post(server.url + "/v1/generate", timeout=120,
                   json={"task": "@base", "prompt": "The capital of France is", "max_new_tokens": 12})
    assert r.status_code == 200, r.text
    text = r.json()["text"]
    words = [w for w in text.split() if w.strip(".,;:!?").isalpha()]
    assert len(words) >= 2, text
