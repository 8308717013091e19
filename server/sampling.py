"""Per-request token choice (greedy, temperature, top-k, top-p, seeded) and incremental detokenization with
stop strings."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # keep generating through end-of-sequence tokens (benchmarks)

    @property
    def greedy(self) -> bool:
        """Temperatures this close to 0 are greedy: dividing logits by them overflows."""
        return self.temperature <= GREEDY_BELOW


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A per-request generator: the same seed and prompt give the same text, whatever else is in the batch."""
    if params.greedy:
        return None
    gen = torch.Generator()
    gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return gen


def sample(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator | None]) -> list[int]:
    """logits: (n, vocab) fp32 -> one token id per row."""
    chosen = logits.argmax(dim=-1).tolist()  # greedy for every row; sampled rows overwrite theirs below
    for i, (p, gen) in enumerate(zip(params, gens)):
        if p.greedy:
            continue
        row = logits[i] / p.temperature  # (vocab,)
        if p.top_k and p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # drop a token when the tokens before it already reach top_p (the first token always stays)
            drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
            drop[0] = False  # rounding must not drop the most likely token (a tiny top_p keeps it alone)
            row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = torch.softmax(row, dim=-1)
        if not bool(torch.isfinite(probs).all()):  # overflow at extreme settings: the greedy choice stands
            continue
        chosen[i] = int(torch.multinomial(probs.cpu(), 1, generator=gen).item())
    return chosen


class Detokenizer:
    """Turns generated token ids into text pieces as they arrive. Decodes a short window that starts in the
    prompt, so that tokenizers which drop a leading space at the start of a decode still give it, and holds back
    pieces that end in an incomplete UTF-8 character. Applies stop strings, holding back text that could still
    become one."""

    WINDOW = 5

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-self.WINDOW:])
        self.prefix = 0  # decode window start
        self.read = len(self.ids)  # ids before this are already in self.text
        self.text = ""  # all generated text so far (stop string removed once found)
        self.emitted = 0  # characters of self.text already handed out
        self.stop = [s for s in stop if s]
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that may be shown now (possibly empty). Once a stop
        string has appeared, nothing more is added."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        if self.stop:
            self._apply_stop()
        return self._release()

    def _apply_stop(self) -> None:
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _release(self) -> str:
        limit = len(self.text)
        if self.stop and not self.stopped:  # keep back a tail that may be the start of a stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        limit = min(limit, len(self.text) - k)
                        break
        piece = self.text[self.emitted:limit]
        self.emitted = max(self.emitted, limit)
        return piece

    def flush(self) -> str:
        """At the end of generation: whatever was held back, incomplete characters included (as the
        tokenizer's own decode shows them). The full text is then ``self.text``."""
        if not self.stopped and self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix:self.read])
            self.text += self._decode(self.ids[self.prefix:])[len(before):]
            self.read = len(self.ids)
            if self.stop:
                self._apply_stop()
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece
