"""Token choice and incremental detokenization."""
from __future__ import annotations

import torch

from server.sampling import Detokenizer, SamplingParams, make_generator, sample


def _push_all(tok, text, stop=()):
    d = Detokenizer(tok, tok("prompt:")["input_ids"], list(stop))
    pieces = [d.push(t) for t in tok(text, add_special_tokens=False)["input_ids"]]
    return d, pieces


def test_pieces_add_up_to_the_decoded_text(tiny_base):
    d, pieces = _push_all(tiny_base.tokenizer, " héllo wörld")
    assert "".join(pieces) + d.flush() == " héllo wörld" == d.text
    assert "\ufffd" not in "".join(pieces)  # a multi-byte character is released whole


def test_stop_string_is_cut_and_never_shown(tiny_base):
    d, pieces = _push_all(tiny_base.tokenizer, "hello world, more", stop=["o w"])
    assert d.stopped and d.text == "hell"
    assert "".join(pieces) + d.flush() == "hell"


def test_text_that_might_start_a_stop_string_is_held_back(tiny_base):
    d, pieces = _push_all(tiny_base.tokenizer, "abcx", stop=["cxz"])
    assert pieces[-2:] == ["", ""]  # "c" and "cx" could still become "cxz"
    assert not d.stopped and d.flush() == "cx" and d.text == "abcx"


def test_greedy_top_k_and_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    assert sample(logits, [SamplingParams()], [None]) == [1]
    p = SamplingParams(temperature=1.0, top_k=1, seed=0)
    assert all(sample(logits, [p], [make_generator(p)]) == [1] for _ in range(5))
    # top_p 0.5: token 1 alone holds < 0.5, tokens 1 and 3 together pass it; 0 and 2 are never drawn.
    p = SamplingParams(temperature=1.0, top_p=0.5, seed=0)
    gen = make_generator(p)
    drawn = {sample(logits, [p], [gen])[0] for _ in range(200)}
    assert drawn == {1, 3}


def test_tiny_top_p_keeps_the_most_likely_token():
    logits = torch.tensor([[0.3, 2.0, 1.9, -1.0]])
    p = SamplingParams(temperature=1.8, top_p=5e-324, top_k=4355, seed=1)
    gen = make_generator(p)
    assert {sample(logits, [p], [gen])[0] for _ in range(20)} == {1}


def test_extreme_temperatures_do_not_break_sampling():
    logits = torch.tensor([[0.3, 2.0, 1.9, -1.0]])
    for t in (5e-324, 1e-6, 1e-30):
        p = SamplingParams(temperature=t, top_p=0.11, seed=1)
        assert sample(logits, [p], [make_generator(p)]) == [1]
    huge = torch.tensor([[3e38, -3e38, 1.0, 0.0]])
    p = SamplingParams(temperature=0.01, seed=2)
    assert sample(huge, [p], [make_generator(p)]) == [0]
