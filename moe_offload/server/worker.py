"""The bounded queue and the one thread that runs generations.

The engine decodes one sequence at a time, so requests are run one after another by a single thread; a queue of
`queue_size` places lets that many wait, and a request that finds it full is refused at once (429) rather than
left to wait without bound. Each job talks back to its request's event loop through an asyncio queue of events
(Delta, Done, Failed). A job whose client went away is cancelled: its streamer's next put returns True, which
stops generation after that token on both of the pipeline's generation paths; a cancelled job still waiting in
the queue is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..errors import MoeOffloadError
from .metrics import Metrics
from .textstream import TextStream

log = logging.getLogger("moe_offload.server")


class Delta(NamedTuple):
    text: str


class Done(NamedTuple):
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


class Failed(NamedTuple):
    status: int
    message: str


@dataclass
class Job:
    input_ids: torch.Tensor  # [1, T] prompt token ids
    max_new_tokens: int
    sampling: dict[str, Any]  # transformers generate's do_sample, temperature, top_p, top_k
    seed: int | None
    stop: tuple[str, ...]
    arrived: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    events: asyncio.Queue | None = None
    loop: asyncio.AbstractEventLoop | None = None

    def bind(self) -> None:
        """Deliver this job's events to the running event loop (call from it)."""
        self.loop, self.events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(self, event: Delta | Done | Failed) -> None:
        """From the generation thread: hand an event to the request's loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


SHUTDOWN_MESSAGE = "the server is shutting down"


class GenerationWorker:
    """One thread, one bounded queue, one pipeline."""

    def __init__(self, pipe, served, metrics: Metrics, queue_size: int):
        self.pipe, self.served, self.metrics = pipe, served, metrics
        self.queue_size = queue_size
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="moe-offload-generation", daemon=True)
        self._current: Job | None = None
        self.closing = False
        tokenizer = served.tokenizer
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = pipe.model.generation_config.eos_token_id
        self._eos = set([eos] if isinstance(eos, int) else eos or [])
        metrics.set_offload(pipe.get_offload_stats())  # before the thread starts: nothing else uses the device

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull (or ShuttingDown)."""
        if self.closing:
            raise ShuttingDown
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def queued(self) -> int:
        return self._queue.qsize()

    def shutdown(self) -> None:
        """Refuse new jobs; end the running one after its current token and the waiting ones now, each with a 503
        (so that a server asked to stop closes its streams at once instead of waiting them out)."""
        self.closing = True
        current = self._current
        if current is not None:
            current.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.emit(Failed(503, SHUTDOWN_MESSAGE))

    def close(self, timeout: float = 30.0) -> None:
        """shutdown(), then stop the thread."""
        self.shutdown()
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        if self.pipe.device.type == "cuda":  # the current device is per thread: this one's is the model's
            torch.cuda.set_device(self.pipe.device)
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            self._current = job
            self.metrics.set_running(1)
            try:
                self._generate(job)
            except MoeOffloadError as err:
                job.emit(Failed(400, str(err)))
            except Exception:  # noqa: BLE001  (a bug: logged with its traceback, the client gets one line)
                log.exception("generation failed")
                job.emit(Failed(500, "generation failed inside the server (its log has the details)"))
            finally:
                self._current = None
                self.metrics.set_running(0)
                try:
                    self.metrics.set_offload(self.pipe.get_offload_stats())
                except Exception:  # noqa: BLE001  (metrics must not take the worker down)
                    log.exception("reading the offload counters failed")

    def _generate(self, job: Job) -> None:
        if job.seed is not None:
            torch.manual_seed(job.seed)  # this thread is the only one that generates: the seed is the job's own
        stream = TextStream(self._decode, job.stop)
        streamer = _JobStreamer(job, stream, self.metrics)
        self.pipe.generate_tokens(job.input_ids.to(self.pipe.device), streamer=streamer,
                                  max_new_tokens=job.max_new_tokens, pad_token_id=self._pad, **job.sampling)
        tail = stream.finish()
        if tail:
            job.emit(Delta(tail))
        if self.closing:
            job.emit(Failed(503, SHUTDOWN_MESSAGE))
            return
        count = streamer.count
        ended = stream.stopped or (count and stream.ids[-1] in self._eos) or count < job.max_new_tokens
        self.metrics.finished(job.input_ids.shape[1], count, streamer.last - streamer.first if count else 0.0)
        job.emit(Done("stop" if ended else "length", job.input_ids.shape[1], count))

    def _decode(self, ids: list[int]) -> str:
        with self.served.lock:
            return self.served.tokenizer.decode(ids, skip_special_tokens=True)


class _JobStreamer:
    """transformers' streamer protocol for one job: the first put is the prompt, each later put new token ids.
    put returns True (stop after this token) once the client is gone or a stop string has appeared."""

    def __init__(self, job: Job, stream: TextStream, metrics: Metrics):
        self.job, self.stream, self.metrics = job, stream, metrics
        self.prompt_seen = False
        self.count = 0
        self.first = self.last = 0.0

    def put(self, value: torch.Tensor) -> bool:
        if not self.prompt_seen:
            self.prompt_seen = True
            return False
        ids = value.reshape(-1).tolist()
        self.last = time.monotonic()
        if self.count == 0:
            self.first = self.last
            self.metrics.first_token(self.first - self.job.arrived)
        self.count += len(ids)
        text = self.stream.push(ids)
        if text:
            self.job.emit(Delta(text))
        return self.job.cancelled.is_set() or self.stream.stopped

    def end(self) -> None:
        pass
