"""One decoding thread and its bounded queue: requests are decoded one at a time (batch 1).

The HTTP side (an asyncio loop) submits a `Job` and reads its events; the worker thread runs
`engine.generate` and posts events back to that loop: text deltas while decoding, then one
terminal event ("done" with a `Finished`, "error" with an `APIError`, or "cancelled").
A job whose client left is cancelled: removed from the queue at once if still waiting, or stopped
after the current step through `should_stop` if being decoded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..errors import CTCDrafterError
from .metrics import ServerMetrics
from .protocol import APIError, Finished, Speculation, Usage
from .stops import StopText

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """No room in the queue: the request is refused (429) rather than left waiting without bound."""


class ShuttingDown(Exception):
    """The server is draining: no new requests."""


@dataclass
class Job:
    """One request on its way through the worker."""

    endpoint: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stops: tuple[str, ...]
    stream: bool  # post text deltas (a non-streaming request needs only the terminal event)
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)

    def post(self, kind: str, payload=None) -> None:
        """Hand an event to the HTTP side, from any thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class _ReplyStreamer:
    """The engine's streamer for one job: new token ids in, stop-safe text deltas out.

    It also answers the engine's `should_stop`: a stop string appeared, or the client left.
    """

    def __init__(self, job: Job, engine, metrics: ServerMetrics):
        self.job, self.engine, self.metrics = job, engine, metrics
        self.tokens: list[int] = []
        self.text = StopText(job.stops)
        self._prompt_seen = False
        self._first_sent = False

    def put(self, ids) -> None:
        if not self._prompt_seen:  # the engine hands over the prompt first, as HF streamers expect
            self._prompt_seen = True
            return
        self.tokens += ids.tolist()
        self._send(self.text.update(self.engine.decode(self.tokens)))

    def end(self) -> None:
        self._send(self.text.update(self.engine.decode(self.tokens), final=True))

    def should_stop(self, tokens: list[int]) -> bool:
        return self.text.stopped or self.job.cancelled.is_set()

    def _send(self, delta: str) -> None:
        if not delta:
            return
        if not self._first_sent:
            self._first_sent = True
            self.metrics.time_to_first_token.observe(time.perf_counter() - self.job.arrived)
        if self.job.stream:
            self.job.post("delta", delta)


class DecodeWorker:
    """Owns the engine for the server's lifetime (so any state its proposer keeps persists)."""

    def __init__(self, engine, speculative: bool, max_queue: int, metrics: ServerMetrics):
        if max_queue < 1:
            raise CTCDrafterError(f"the queue must hold at least 1 request, got {max_queue}")
        self.engine, self.speculative, self.max_queue, self.metrics = engine, speculative, max_queue, metrics
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._current: Job | None = None
        self._thread = threading.Thread(target=self._run, name="ctc-drafter-decoder", daemon=True)
        metrics.track(queue_depth=lambda: self.depth, busy=lambda: self.busy)

    @property
    def depth(self) -> int:
        """Requests waiting (the one being decoded not included)."""
        return len(self._pending)

    @property
    def busy(self) -> bool:
        return self._current is not None

    # ---- the HTTP side ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise ShuttingDown()
            if len(self._pending) >= self.max_queue:
                raise QueueFull()
            self._pending.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client left: drop the job if it still waits, else stop it after the current step."""
        job.cancelled.set()
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                self.metrics.count(job.endpoint, "cancelled")

    def stop(self) -> None:
        """Finish every job already accepted, then end the thread (the drain on Ctrl-C / SIGTERM)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    # ---- the worker thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                self._current = self._pending.popleft()
            try:
                self._decode(self._current)
            finally:
                self._current = None

    def _decode(self, job: Job) -> None:
        if job.cancelled.is_set():  # its client left just as it was taken from the queue
            self.metrics.count(job.endpoint, "cancelled")
            return
        streamer = _ReplyStreamer(job, self.engine, self.metrics)
        try:
            res = self.engine.generate(job.prompt_ids, max_new_tokens=job.max_tokens, temperature=job.temperature,
                                       top_p=job.top_p, top_k=job.top_k, seed=job.seed, streamer=streamer,
                                       speculative=self.speculative, should_stop=streamer.should_stop)
        except CTCDrafterError as e:
            self._fail(job, APIError(400, str(e)), "invalid")
            return
        except Exception as e:  # a bug: answer 500 and keep serving the others
            log.exception("decoding failed")
            self._fail(job, APIError(500, f"decoding failed: {type(e).__name__}: {e}", type="server_error"), "error")
            return
        self.metrics.observe_decoding(len(job.prompt_ids), res)
        if job.cancelled.is_set():
            self.metrics.count(job.endpoint, "cancelled")
            return
        job.post("done", self._finished(job, res, streamer))
        self.metrics.count(job.endpoint, "ok")

    def _fail(self, job: Job, err: APIError, outcome: str) -> None:
        job.post("error", err)
        self.metrics.count(job.endpoint, outcome)

    def _finished(self, job: Job, res, streamer: _ReplyStreamer) -> Finished:
        stopped = streamer.text.stopped or res.stop_reason == "eos"
        usage = Usage(prompt_tokens=len(job.prompt_ids), completion_tokens=res.new_tokens,
                      total_tokens=len(job.prompt_ids) + res.new_tokens)
        spec = Speculation(speculative=self.speculative, steps=res.steps,
                           accepted_tokens_per_step=round(res.mean_accept_length, 4),
                           tokens_per_s=round(res.tokens_per_s, 3), prefill_s=round(res.prefill_s, 4),
                           wall_s=round(res.wall_s, 4))
        return Finished(text=streamer.text.sent, finish_reason="stop" if stopped else "length", usage=usage,
                        speculation=spec)
