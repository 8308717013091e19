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

from .bank import BASE, BankState, KernelTables, Plan, Route
from . import triton_delta
from .sparse_kernel import SparseDeltaKernel, applies_to
from .errors import (BadRequest, EngineError, InvalidRequest, JumploraError, NotFound, NotReady, Overloaded,
                     PayloadTooLarge)
from .merged import MergedRoutes, merged_size
from .metrics import Metrics
from .runner import Chunk, ModelRunner
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


def request_error(e: Exception) -> JumploraError:
    """What the client of a failed request is told: our own errors as they are, anything else as a 500 that
    names only the exception's type (the traceback is in the server log)."""
    if isinstance(e, JumploraError):
        return e
    return EngineError(f"the engine failed on this request ({type(e).__name__}); see the server log")


class RequestHandle:
    """The API's side of one request: events arrive on ``queue`` from the engine thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, task: str, endpoint: str, prompt_ids: list[int],
                 params: SamplingParams, stream: bool = True):
        self.loop, self.task, self.endpoint = loop, task, endpoint
        self.stream = stream  # False: no Token events, only the final one
        self.prompt_ids, self.params = prompt_ids, params
        self.queue: asyncio.Queue = asyncio.Queue()
        self.created = time.monotonic()
        self.cancelled = False

    def cancel(self) -> None:
        """The client went away: the engine frees its row (or drops it from the queue) before the next step."""
        self.cancelled = True

    def emit(self, event) -> None:
        """Send one event now (from any thread). The engine batches its events per step instead (``Outbox``)."""
        Outbox.send(self.loop, [(self, event)])


class Outbox:
    """Events of one engine step, handed to the event loop in one wake-up: waking the event loop once per token
    per request costs the engine thread the GIL hundreds of times per step."""

    def __init__(self) -> None:
        self.items: list[tuple[RequestHandle, object]] = []

    def put(self, handle: RequestHandle, event) -> None:
        if isinstance(event, Token) and not handle.stream:
            return
        self.items.append((handle, event))

    def flush(self) -> None:
        by_loop: dict[int, list] = {}
        for handle, event in self.items:
            by_loop.setdefault(id(handle.loop), []).append((handle, event))
        self.items = []
        for batch in by_loop.values():
            Outbox.send(batch[0][0].loop, batch)

    @staticmethod
    def send(loop: asyncio.AbstractEventLoop, batch: list) -> None:
        def deliver() -> None:
            for handle, event in batch:
                handle.queue.put_nowait(event)
        try:
            loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            for handle, _ in batch:
                handle.cancelled = True


class Sequence:
    """An admitted request occupying one batch row."""

    def __init__(self, handle: RequestHandle, route: Route, tokenizer):
        self.handle = handle
        self.route = route  # the adapters of its task, as served when it was admitted
        self.params = handle.params
        self.gen = make_generator(handle.params)
        self.detok = Detokenizer(tokenizer, handle.prompt_ids, handle.params.stop)
        self.row: int | None = None  # cache row, from its first prompt chunk on
        self.pos = 0  # tokens in the cache (the prompt first, chunk by chunk)
        self.last = -1  # the token to feed at the next decode step
        self.generated = 0
        self.last_time = 0.0


class Engine:
    """Rows 0..n-1 of the cache hold the requests that are decoding (``_decoding[i].row == i``); requests whose
    prompt is being prefilled (``_prefilling``, first come first served) hold rows above those. Each step runs
    one forward over all decode rows plus up to ``prefill_budget`` prompt tokens, chunking a long prompt over
    several steps."""

    def __init__(self, runner: ModelRunner, tokenizer, state: BankState, metrics: Metrics, *, max_batch: int,
                 max_queue: int, max_len: int, prefill_budget: int = 512, max_prompt_tokens: int | None = None,
                 max_new_tokens: int | None = None, sparse_kernel: SparseDeltaKernel | None = None,
                 cuda_graphs: bool = False, triton: bool = False, merged_mb: int = 0, merged_min_steps: int = 0):
        self.runner, self.tokenizer, self.metrics = runner, tokenizer, metrics
        self.max_batch, self.max_queue, self.max_len = max_batch, max_queue, max_len
        self.prefill_budget = prefill_budget
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
        eos = getattr(getattr(runner.model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        self._state = state
        self._pending_state: BankState | None = None
        self._pending_threads: int | None = None
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._cv = threading.Condition()
        self._decoding: list[Sequence] = []
        self._prefilling: list[Sequence] = []
        self._in_step: list[Sequence] = []
        self._plan_key: tuple | None = None
        self._plan: Plan | None = None  # the decode rows' plan, kept while the batch stays the same
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._stopped = threading.Event()
        self.step_times: collections.deque[float] = collections.deque(maxlen=64)
        self._outbox = Outbox()
        # the compiled kernel does the sparse deltas where it applies (fp32 on CPU), the Triton kernel on CUDA;
        # their tables are kept here
        self._kernel = None
        if sparse_kernel is not None and applies_to(runner.device, runner.dtype):
            self._kernel = KernelTables(sparse_kernel)
        elif triton and triton_delta.applies_to(runner.device):
            self._kernel = KernelTables(triton_delta.TritonDeltas())
        # fp32 on CPU: a batch on one route runs on its merged weights, cached (server/merged.py)
        self._merged = None
        self.merged_min_steps = merged_min_steps  # a route's merged weights are built only for a batch this long
        if merged_mb > 0 and runner.device.type == "cpu" and runner.dtype == torch.float32:
            self._merged = MergedRoutes(merged_mb << 20, merged_size, metrics)
        self._graphs = None  # on CUDA: decode steps without task adapters replayed from graphs
        if cuda_graphs and runner.device.type == "cuda":
            from .cuda_graphs import DecodeGraphs
            self._graphs = DecodeGraphs(runner)

    # -- called from the API (event loop thread) -------------------------------------------------------------

    @property
    def state(self) -> BankState:
        """The newest bank state (what new requests are admitted under)."""
        return self._pending_state or self._state

    def start(self) -> None:
        """Run the engine loop in a thread of its own."""
        self._thread.start()

    def run(self) -> None:
        """Run the engine loop in the calling thread until ``stop()``. The server calls this from the thread
        that loaded the model: torch's OpenMP pool belongs to one thread, and a second thread running parallel
        ops makes both slower (with more OpenMP threads than cores, GNU OpenMP stops spinning at barriers: a
        16-row decode step of SmolLM2 on 2 cores went from 72 ms to 100 ms)."""
        self._loop()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        else:
            self._stopped.wait(timeout=30)

    def set_threads(self, n: int) -> None:
        """Use ``n`` torch threads from the next step on (set from the engine thread, which owns the pool)."""
        with self._cv:
            self._pending_threads = n
            self._cv.notify_all()

    def set_state(self, state: BankState) -> None:
        """Serve ``state`` from the next step on; requests in flight keep the state they were admitted under."""
        with self._cv:
            self._pending_state = state
            self._cv.notify_all()

    def submit(self, task: str, prompt: str, params: SamplingParams, endpoint: str,
               loop: asyncio.AbstractEventLoop, param_names: dict[str, str] | None = None,
               stream: bool = True) -> RequestHandle:
        """Validate and queue a request. Raises NotFound (task), InvalidRequest (max_new_tokens over the
        limit), PayloadTooLarge (prompt over the limit), BadRequest (over the context), Overloaded (queue)."""
        names = param_names or {}
        if task not in self.state.routes:
            raise NotFound(f"task {task!r} is not served (see GET /v1/tasks)", param=names.get("task", "task"))
        if self.max_new_tokens is not None and params.max_new_tokens > self.max_new_tokens:
            name = names.get("max_new_tokens", "max_new_tokens")
            raise InvalidRequest(f"{name}: {params.max_new_tokens} is over the limit of {self.max_new_tokens}",
                                 param=name)
        ids = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise BadRequest("the prompt has no tokens", param=names.get("prompt", "prompt"))
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise PayloadTooLarge(f"prompt: {len(ids)} tokens, over the limit of {self.max_prompt_tokens}",
                                  param=names.get("prompt", "prompt"))
        if len(ids) + params.max_new_tokens > self.max_len:
            raise BadRequest(
                f"prompt ({len(ids)} tokens) plus max_new_tokens ({params.max_new_tokens}) is "
                f"{len(ids) + params.max_new_tokens}, over the context of {self.max_len} tokens",
                param=names.get("max_new_tokens", "max_new_tokens"))
        handle = RequestHandle(loop, task, endpoint, ids, params, stream)
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
                    if self._merged is not None:  # merged sets of deleted tasks' adapters go
                        self._merged.retain({id(a) for route in self._state.routes.values() for a in route})
                if self._pending_threads is not None:
                    torch.set_num_threads(self._pending_threads)
                    self._pending_threads = None
                if not self._decoding and not self._prefilling and not self._waiting:
                    self._cv.wait(timeout=0.5)
                    continue
            try:
                self._drop_cancelled()
                self._admit()
                if self._decoding or self._prefilling:
                    self._step()
                self.metrics.batch_size.set(len(self._decoding))
                self._outbox.flush()
            except Exception as e:  # a failed step fails its requests, not the server
                log.exception("engine step failed")
                self._outbox.flush()
                failed = {id(s): s for s in self._decoding + self._prefilling + self._in_step}
                for seq in failed.values():
                    seq.handle.emit(Failed(request_error(e)))
                self._decoding.clear()
                self._prefilling.clear()
                self.runner.cache.clean = 0  # a failed forward may have left non-finite values: zero again
        self._fail_all(NotReady("the server is shutting down"))
        self._stopped.set()

    def _fail_all(self, error: JumploraError) -> None:
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for handle in waiting:
            handle.emit(Failed(error))
        for seq in self._decoding + self._prefilling:
            seq.handle.emit(Failed(error))
        self._decoding.clear()
        self._prefilling.clear()

    def _count_cancelled(self, handle: RequestHandle) -> None:
        self.metrics.requests.labels(handle.task, handle.endpoint, "499").inc()

    def _drop_cancelled(self) -> None:
        with self._cv:
            for h in self._waiting:
                if h.cancelled:
                    self._count_cancelled(h)
            self._waiting = collections.deque(h for h in self._waiting if not h.cancelled)
            self.metrics.queue_length.set(len(self._waiting))
        for seq in self._prefilling:
            if seq.handle.cancelled:
                self._count_cancelled(seq.handle)
        self._prefilling = [seq for seq in self._prefilling if not seq.handle.cancelled]
        gone = [i for i, seq in enumerate(self._decoding) if seq.handle.cancelled]
        for i in gone:
            self._count_cancelled(self._decoding[i].handle)
        self._remove(gone)

    def _admit(self) -> None:
        """Take waiting requests while rows are free; each keeps the bank state of its admission."""
        while len(self._decoding) + len(self._prefilling) < self.max_batch:
            with self._cv:
                if not self._waiting:
                    break
                handle = self._waiting.popleft()
                self.metrics.queue_length.set(len(self._waiting))
            route = self._state.routes.get(handle.task)
            if route is None:  # the task went away while the request waited
                handle.emit(Failed(NotFound(f"task {handle.task!r} is no longer served", param="task")))
                continue
            try:
                seq = Sequence(handle, route, self.tokenizer)
            except Exception as e:  # this request alone fails, and is told so at once
                log.exception("admitting a request failed")
                handle.emit(Failed(request_error(e)))
                continue
            self._prefilling.append(seq)

    def _free_row(self, above: int) -> int:
        used = {seq.row for seq in self._prefilling if seq.row is not None}
        return next(r for r in range(above, self.max_batch) if r not in used)

    def _chunks(self) -> list[tuple[Sequence, Chunk]]:
        """Prompt chunks for this step, first come first served, within the prefill budget."""
        budget, out = self.prefill_budget, []
        for seq in self._prefilling:
            if budget <= 0:
                break
            ids = seq.handle.prompt_ids
            take = min(len(ids) - seq.pos, budget)
            if seq.row is None:
                seq.row = self._free_row(len(self._decoding))
            out.append((seq, Chunk(seq.row, ids[seq.pos:seq.pos + take], seq.pos, seq.pos + take == len(ids))))
            budget -= take
        return out

    def _step(self) -> None:
        start = time.monotonic()
        chunks = self._chunks()
        self._in_step = [seq for seq, _ in chunks]  # may leave both lists mid-step: failed too if the step fails
        n = len(self._decoding)
        segments, offset = [], n
        for seq, chunk in chunks:
            segments.append((offset, offset + len(chunk.token_ids), seq.route))
            offset += len(chunk.token_ids)
        tokens = torch.tensor([seq.last for seq in self._decoding], dtype=torch.long)
        positions = torch.tensor([seq.pos for seq in self._decoding], dtype=torch.long)
        routes = [seq.route for seq in self._decoding]
        try:
            plan = (Plan(routes, segments, self.runner.device, self._kernel, self._merged,
                         self._lasting(self._decoding + [seq for seq, _ in chunks]))
                    if segments else self._decode_plan(routes))
            logits = self._graphs.run(tokens, positions, plan) if self._graphs is not None and not chunks else None
            if logits is not None:
                chunk_logits = []
            else:
                logits, chunk_logits = self.runner.step(tokens, positions, [c for _, c in chunks], plan)
        except Exception:
            if not chunks:  # the decode rows alone, each of which went through a step before: fail them all
                raise
            log.exception("a step with prompt chunks failed; running the decode rows and each chunk apart")
            logits, chunks, chunk_logits = self._step_apart(tokens, positions, routes, chunks)
        # decode rows
        chosen = self._sample_rows(logits, self._decoding) if n else []
        done = []
        for i, (seq, token) in enumerate(zip(self._decoding, chosen)):
            if token is None:  # its sampling failed (reported)
                done.append(i)
                continue
            seq.pos += 1
            try:
                if self._advance(seq, token):
                    done.append(i)
            except Exception as e:
                self._fail_row(seq, e, seq.pos)
                done.append(i)
        self._remove(done)
        # prompt chunks: first every one's length (a prompt that moves rows below must take this step's chunk
        # with it), then a finished prompt gives its request's first token and a decode row
        for seq, chunk in chunks:
            seq.pos = chunk.end
            self.metrics.prompt_tokens.labels(seq.handle.task).inc(len(chunk.token_ids))
        for (seq, chunk), lg in zip(chunks, chunk_logits):
            if lg is None:
                continue
            self._prefilling.remove(seq)
            try:
                token = sample(lg[None], [seq.params], [seq.gen])[0]
                finished = self._advance(seq, token)
            except Exception as e:
                self._fail_row(seq, e, chunk.end)
                continue
            if not finished:
                self._start_decoding(seq)
        elapsed = time.monotonic() - start
        if n:
            self.step_times.append(elapsed)
            self.metrics.step_seconds.observe(elapsed)

    def _decode_plan(self, routes: list[Route]) -> Plan:
        """The decode rows' plan, kept while the batch's routes stay the same."""
        key = Plan.key(routes)
        if key != self._plan_key:
            self._plan, self._plan_key = Plan(routes, (), self.runner.device, self._kernel, self._merged,
                                              self._lasting(self._decoding)), key
        return self._plan

    def _lasting(self, seqs: list[Sequence]) -> bool:
        """Whether a batch of ``seqs`` is to run ``merged_min_steps`` more steps (the most new tokens one of them
        may still take): only then is a route's merged weights' build (tens of ms, stalling every row) worth it
        (``server/merged.py``)."""
        return any(seq.params.max_new_tokens - seq.generated >= self.merged_min_steps for seq in seqs)

    def _step_apart(self, tokens, positions, routes, chunks):
        """After a failed step: the decode rows in one forward (if that fails too, the engine loop fails them
        all), then each prompt chunk in a forward of its own; a chunk that fails alone fails its request only.
        Writing the cache again is harmless: every position gets the same keys and values. Returns the decode
        logits and the chunks that went through, with their logits."""
        logits = None
        if len(routes):
            logits = self.runner.step(tokens, positions, [], self._decode_plan(routes))[0]
        empty = torch.empty(0, dtype=torch.long)
        kept, kept_logits = [], []
        for seq, chunk in chunks:
            try:
                plan = Plan([], [(0, len(chunk.token_ids), seq.route)], self.runner.device, self._kernel,
                            self._merged, self._lasting([seq]))
                kept_logits.append(self.runner.step(empty, empty, [chunk], plan)[1][0])
            except Exception as e:
                self._prefilling.remove(seq)
                self._fail_row(seq, e, chunk.end)
                continue
            kept.append((seq, chunk))
        return logits, kept, kept_logits

    def _sample_rows(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int | None]:
        """Each decode row's next token; if sampling the batch fails, each row alone, and a row that fails
        alone is failed (None). (A row sampled before the batch failed draws its random numbers again.)"""
        try:
            return sample(logits, [s.params for s in seqs], [s.gen for s in seqs])
        except Exception:
            log.exception("sampling the batch failed; sampling each row alone")
        out: list[int | None] = []
        for i, seq in enumerate(seqs):
            try:
                out.append(sample(logits[i:i + 1], [seq.params], [seq.gen])[0])
            except Exception as e:
                self._fail_row(seq, e, seq.pos + 1)
                out.append(None)
        return out

    def _fail_row(self, seq: Sequence, error: Exception, length: int) -> None:
        """Fail one request, which leaves its row (the caller removes it): zero the first ``length`` positions
        of that cache row, which may hold non-finite values (masked positions still multiply their values)."""
        log.error("request of task %r failed: %r", seq.handle.task, error, exc_info=error)
        if seq.row is not None:
            self.runner.cache.clear_row(seq.row, length)
        self._outbox.put(seq.handle, Failed(request_error(error)))

    def _start_decoding(self, seq: Sequence) -> None:
        """Give ``seq`` the next decode row, moving its cache there; a prefilling request that holds that row
        trades rows with it (seq's old row is the one row sure to be free: the batch may be full)."""
        target = len(self._decoding)
        if seq.row != target:
            blocker = next((s for s in self._prefilling if s.row == target), None)
            if blocker is not None:
                self.runner.cache.swap_rows(seq.row, target, max(seq.pos, blocker.pos))
                blocker.row = seq.row
            else:
                self.runner.cache.move_row(seq.row, target, seq.pos)
            seq.row = target
        self._decoding.append(seq)

    def _advance(self, seq: Sequence, token: int) -> bool:
        """Take the token chosen for ``seq``; emit it; return True when the request is finished."""
        now = time.monotonic()
        handle = seq.handle
        if token in self.eos_ids and not seq.params.ignore_eos:
            return self._finish(seq, "eos")
        seq.generated += 1
        piece = seq.detok.push(token)
        if seq.generated == 1:
            self.metrics.ttft.labels(handle.task).observe(now - handle.created)
        else:
            self.metrics.itl.labels(handle.task).observe(now - seq.last_time)
        seq.last_time = now
        self.metrics.generated_tokens.labels(handle.task).inc()
        self._outbox.put(handle, Token(piece, token))
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
        self._outbox.put(seq.handle, Finished(seq.detok.text, tail, reason, len(seq.handle.prompt_ids),
                                              seq.generated))
        return True

    def _remove(self, indices: list[int]) -> None:
        """Free the decode rows at ``indices``, keeping the decode rows packed at the front of the cache."""
        for i in sorted(indices, reverse=True):
            last = len(self._decoding) - 1
            if i != last:
                moved = self._decoding[last]
                self.runner.cache.move_row(last, i, moved.pos)
                moved.row = i
                self._decoding[i] = moved
            self._decoding.pop()

    # -- introspection ---------------------------------------------------------------------------------------

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._decoding) + len(self._prefilling)
