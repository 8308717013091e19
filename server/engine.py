"""The scheduler: one thread owns the model runner. Requests wait in a bounded queue; between decode steps new
requests are prefilled into free batch rows (continuous batching), finished and cancelled ones leave at once,
and a new adapter bank state (a registered task) is swapped in. Events go back to each request's asyncio queue."""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass

import torch

from .bank import BASE, BankState, RowPlan
from .errors import BadRequest, JumploraError, NotFound, NotReady, Overloaded
from .metrics import Metrics
from .runner import ModelRunner
from .sampling import Detokenizer, SamplingParams, make_generator, sample

log = logging.getLogger(__name__)


@dataclass
class Token:
    text: str  # the text this token releases (may be empty: a partial character, or a possible stop string)
    token_id: int


@dataclass
class Finished:
    text: str  # the whole generated text
    tail: str  # text held back until now (a stop-string prefix that did not complete), to be shown last
    finish_reason: str  # "length" | "stop" | "eos"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    error: Exception


class RequestHandle:
    """The API's side of one request: events arrive on ``queue`` from the engine thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, task: str, endpoint: str, prompt_ids: list[int],
                 params: SamplingParams):
        self.loop, self.task, self.endpoint = loop, task, endpoint
        self.prompt_ids, self.params = prompt_ids, params
        self.queue: asyncio.Queue = asyncio.Queue()
        self.created = time.monotonic()
        self.cancelled = False

    def cancel(self) -> None:
        """The client went away: the engine frees its row (or drops it from the queue) before the next step."""
        self.cancelled = True

    def emit(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True


class Sequence:
    """An admitted request occupying one batch row."""

    def __init__(self, handle: RequestHandle, adapter: tuple[BankState, int], tokenizer):
        self.handle = handle
        self.adapter = adapter
        self.params = handle.params
        self.gen = make_generator(handle.params)
        self.detok = Detokenizer(tokenizer, handle.prompt_ids, handle.params.stop)
        self.pos = len(handle.prompt_ids)  # tokens in the cache
        self.last = -1  # the token to feed at the next step
        self.generated = 0
        self.last_time = 0.0


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer, state: BankState, metrics: Metrics, *, max_batch: int,
                 max_queue: int, max_len: int, prefill_budget: int = 2048):
        self.runner, self.tokenizer, self.metrics = runner, tokenizer, metrics
        self.max_batch, self.max_queue, self.max_len = max_batch, max_queue, max_len
        self.prefill_budget = prefill_budget
        eos = getattr(getattr(runner.model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        self._state = state
        self._pending_state: BankState | None = None
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._cv = threading.Condition()
        self._active: list[Sequence] = []
        self._plan_key: tuple | None = None
        self._plan: RowPlan | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.step_times: collections.deque[float] = collections.deque(maxlen=64)

    # -- called from the API (event loop thread) -------------------------------------------------------------

    @property
    def state(self) -> BankState:
        """The newest bank state (what new requests are admitted under)."""
        return self._pending_state or self._state

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    def set_state(self, state: BankState) -> None:
        """Serve ``state`` from the next step on; requests in flight keep the state they were admitted under."""
        with self._cv:
            self._pending_state = state
            self._cv.notify_all()

    def submit(self, task: str, prompt: str, params: SamplingParams, endpoint: str,
               loop: asyncio.AbstractEventLoop, param_names: dict[str, str] | None = None) -> RequestHandle:
        """Validate and queue a request. Raises NotFound (task), BadRequest (context length), Overloaded."""
        names = param_names or {}
        if task != BASE and task not in self.state.slots:
            raise NotFound(f"task {task!r} is not served (see GET /v1/tasks)", param=names.get("task", "task"))
        ids = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise BadRequest("the prompt has no tokens", param=names.get("prompt", "prompt"))
        if len(ids) + params.max_new_tokens > self.max_len:
            raise BadRequest(
                f"prompt ({len(ids)} tokens) plus max_new_tokens ({params.max_new_tokens}) is "
                f"{len(ids) + params.max_new_tokens}, over the context of {self.max_len} tokens",
                param=names.get("max_new_tokens", "max_new_tokens"))
        handle = RequestHandle(loop, task, endpoint, ids, params)
        with self._cv:
            if self._stopping:
                raise NotReady("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"the request queue is full ({self.max_queue} waiting)",
                                 retry_after=self._retry_after())
            self._waiting.append(handle)
            self.metrics.queue_length.set(len(self._waiting))
            self._cv.notify_all()
        return handle

    def _retry_after(self) -> float:
        step = sum(self.step_times) / len(self.step_times) if self.step_times else 0.1
        return max(1.0, step * 32)

    # -- the engine thread -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                if self._stopping:
                    break
                if self._pending_state is not None:
                    self._state, self._pending_state = self._pending_state, None
                if not self._active and not self._waiting:
                    self._cv.wait(timeout=0.5)
                    continue
            try:
                self._drop_cancelled()
                self._admit()
                if self._active:
                    self._step()
            except Exception as e:  # a failed step fails its requests, not the server
                log.exception("engine step failed")
                for seq in self._active:
                    seq.handle.emit(Failed(e))
                self._active.clear()
        self._fail_all(NotReady("the server is shutting down"))

    def _fail_all(self, error: JumploraError) -> None:
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for handle in waiting:
            handle.emit(Failed(error))
        for seq in self._active:
            seq.handle.emit(Failed(error))
        self._active.clear()

    def _drop_cancelled(self) -> None:
        with self._cv:
            kept = [h for h in self._waiting if not h.cancelled]
            for h in self._waiting:
                if h.cancelled:
                    self.metrics.requests.labels(h.task, h.endpoint, "499").inc()
            self._waiting = collections.deque(kept)
            self.metrics.queue_length.set(len(kept))
        gone = [i for i, seq in enumerate(self._active) if seq.handle.cancelled]
        for i in gone:
            h = self._active[i].handle
            self.metrics.requests.labels(h.task, h.endpoint, "499").inc()
        self._remove(gone)

    def _admit(self) -> None:
        budget = self.prefill_budget
        while len(self._active) < self.max_batch and budget > 0:
            with self._cv:
                if not self._waiting:
                    break
                handle = self._waiting.popleft()
                self.metrics.queue_length.set(len(self._waiting))
            if handle.cancelled:
                continue
            state = self._state
            try:
                slot = state.slot_of(handle.task)
            except KeyError:  # the task went away while the request waited
                handle.emit(Failed(NotFound(f"task {handle.task!r} is no longer served", param="task")))
                continue
            seq = Sequence(handle, (state, slot), self.tokenizer)
            row = len(self._active)
            logits = self.runner.prefill(row, handle.prompt_ids, RowPlan([seq.adapter], self.runner.device))
            budget -= len(handle.prompt_ids)
            self.metrics.prompt_tokens.labels(handle.task).inc(len(handle.prompt_ids))
            token = sample(logits[None], [seq.params], [seq.gen])[0]
            if not self._advance(seq, token):
                self._active.append(seq)
        self.metrics.batch_size.set(len(self._active))

    def _step(self) -> None:
        start = time.monotonic()
        rows = [seq.adapter for seq in self._active]
        key = RowPlan.key(rows)
        if key != self._plan_key:
            self._plan, self._plan_key = RowPlan(rows, self.runner.device), key
        dev = self.runner.device
        tokens = torch.tensor([seq.last for seq in self._active], device=dev)
        positions = torch.tensor([seq.pos for seq in self._active], device=dev)
        logits = self.runner.decode(tokens, positions, self._plan)  # (n, vocab)
        chosen = sample(logits, [s.params for s in self._active], [s.gen for s in self._active])
        done = []
        for i, (seq, token) in enumerate(zip(self._active, chosen)):
            seq.pos += 1
            if self._advance(seq, token):
                done.append(i)
        self._remove(done)
        elapsed = time.monotonic() - start
        self.step_times.append(elapsed)
        self.metrics.step_seconds.observe(elapsed)
        self.metrics.batch_size.set(len(self._active))

    def _advance(self, seq: Sequence, token: int) -> bool:
        """Take the token chosen for ``seq``; emit it; return True when the request is finished."""
        now = time.monotonic()
        handle = seq.handle
        if token in self.eos_ids:
            return self._finish(seq, "eos")
        seq.generated += 1
        piece = seq.detok.push(token)
        if seq.generated == 1:
            self.metrics.ttft.labels(handle.task).observe(now - handle.created)
        else:
            self.metrics.itl.labels(handle.task).observe(now - seq.last_time)
        seq.last_time = now
        self.metrics.generated_tokens.labels(handle.task).inc()
        handle.emit(Token(piece, token))
        if seq.detok.stopped:
            return self._finish(seq, "stop")
        if seq.generated >= seq.params.max_new_tokens:
            return self._finish(seq, "length")
        seq.last = token
        return False

    def _finish(self, seq: Sequence, reason: str) -> bool:
        tail = seq.detok.flush()
        if seq.detok.stopped:  # a stop string completed only once the last characters could be decoded
            reason = "stop"
        seq.handle.emit(Finished(seq.detok.text, tail, reason, len(seq.handle.prompt_ids), seq.generated))
        return True

    def _remove(self, indices: list[int]) -> None:
        """Free the rows at ``indices``, keeping the active rows packed at the front of the cache."""
        for i in sorted(indices, reverse=True):
            last = len(self._active) - 1
            if i != last:
                self.runner.cache.move_row(last, i, self._active[last].pos)
                self._active[i] = self._active[last]
            self._active.pop()

    # -- introspection ---------------------------------------------------------------------------------------

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._active)
