"""
The server's generation engine: one thread owns the model and runs continuous batching. Requests
wait in a bounded queue, join the running batch at the next token boundary, leave it when done,
and each keeps its own sampling settings and LUT. A prompt that joins while others decode is
prefilled in pieces beside their decode steps (prefill_chunk), so it never stops them for long.
Request threads block on their Job (or stream its text) while the engine thread does the work.
"""
import collections
import logging
import threading

from generate import DRAFT_TOKENS, PREFILL_CHUNK, Batcher, Sequence

log = logging.getLogger(__name__)


def apart(fn, *args, **kwargs):
    """fn(*args, **kwargs) run in a thread of its own that ends when fn does; its result is
    returned, its exception raised here. For torch work outside the engine (loading a model,
    teaching or loading a LUT): libgomp, torch's OpenMP on CPU, keeps a pool of worker threads for
    every thread that has run a parallel op, and once the pools hold more threads than there are
    cores, every worker sleeps between ops instead of spinning, so each of the engine's ops pays
    a wake-up (one stream decodes about a third slower: docs/performance.md). A thread that
    ends takes its pool with it, which leaves the engine threads the only ones holding one."""
    outcome = {}

    def call():
        try:
            outcome["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: B036 - handed to the caller, who decides
            outcome["error"] = e

    thread = threading.Thread(target=call, name=f"apart:{getattr(fn, '__name__', 'torch')}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


class QueueFull(Exception):
    """Too many requests waiting; answered with 503 and Retry-After."""


class EngineStopped(Exception):
    """The engine's model has been unloaded: it finishes what it holds and takes nothing new."""


class Job:
    """A submitted request: wait() for the finished Sequence, or iterate deltas() to stream."""

    def __init__(self, seq):
        self.seq = seq
        self.error = None
        self._changed = threading.Condition()

    def notify(self):
        with self._changed:
            self._changed.notify_all()

    def fail(self, error):
        self.error = error
        self.seq.cancel()
        self.notify()

    def cancel(self):
        """Stop generating (client gone); the engine drops it at the next token boundary."""
        if not self.seq.done:
            self.seq.cancel()

    def wait(self, timeout=None):
        with self._changed:
            if not self._changed.wait_for(lambda: self.seq.done, timeout):
                self.cancel()
                raise TimeoutError("generation took longer than the time limit")
        if self.error:
            raise self.error
        return self.seq

    def deltas(self, heartbeat=None):
        """Text as it becomes final; ends when the sequence is done. With heartbeat (seconds),
        an empty string is yielded after that long without news, so a streaming caller can
        write something and find out whether its client is still there."""
        seen = 0  # length of seq.text at the last look (its tail may be held back, see new_text)
        while True:
            with self._changed:
                news = self._changed.wait_for(lambda: self.seq.done or len(self.seq.text) != seen, heartbeat)
                done, seen = self.seq.done, len(self.seq.text)
                delta = self.seq.new_text()
            if delta or (not news and not self.error):  # text made before a failure reaches the client first
                yield delta
            if self.error:
                raise self.error
            if done:
                return


class Engine:

    def __init__(self, model, tokenizer, max_batch=8, max_queue=64, draft_tokens=DRAFT_TOKENS,
                 prefill_chunk=PREFILL_CHUNK):
        self.model, self.tokenizer = model, tokenizer
        self.batcher = Batcher(model, max_batch=max_batch, draft_tokens=draft_tokens, prefill_chunk=prefill_chunk)
        self.max_queue = max_queue
        self.waiting = collections.deque()
        self._wake = threading.Condition()
        self._stopped = False
        self.finished = collections.Counter()  # finish_reason -> requests
        self._thread = None  # started on first use: never before a fork (gunicorn workers)

    def submit(self, prompt_ids, params, lut=None):
        """Queue a request; raises GenerationError (bad request), QueueFull or EngineStopped."""
        seq = Sequence(prompt_ids, params, self.tokenizer, lut)
        seq.check_fits(self.batcher.model.config.block_size)
        job = Job(seq)
        with self._wake:
            if self._stopped:
                raise EngineStopped("the model was unloaded")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting; try again shortly")
            self.waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
                self._thread.start()
            self._wake.notify()
        return job

    @property
    def load(self):
        return {"running": len(self.batcher.seqs), "waiting": len(self.waiting),
                "max_batch": self.batcher.max_batch, "max_queue": self.max_queue, "finished": dict(self.finished)}

    def stop(self):
        with self._wake:
            self._stopped = True
            self._wake.notify()

    def _run(self):
        running = {}  # id(seq) -> job
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._stopped or self.waiting or self.batcher.seqs)
                if self._stopped and not self.waiting and not self.batcher.seqs:
                    return
                admitted = []
                while self.waiting and len(admitted) < self.batcher.free_slots:
                    job = self.waiting.popleft()
                    if not job.seq.done:  # cancelled while waiting
                        admitted.append(job)
                    else:
                        job.notify()
            try:
                if admitted:
                    running.update((id(j.seq), j) for j in admitted)
                    advanced = self.batcher.admit([j.seq for j in admitted])  # or the next steps prefill them
                else:
                    self.batcher.retire()  # drop sequences cancelled since the last step
                    advanced = self.batcher.step()
            except Exception as e:  # never let one bad batch kill the engine: fail its requests
                log.exception("generation step failed")
                for job in running.values():
                    job.fail(RuntimeError(f"generation failed: {e}"))
                running.clear()
                self.batcher = Batcher(self.model, max_batch=self.batcher.max_batch,
                                       draft_tokens=self.batcher.draft_tokens,
                                       prefill_chunk=self.batcher.prefill_chunk)
                continue
            for seq in advanced:
                job = running.get(id(seq))
                if job:
                    job.notify()
            for key in [k for k, j in running.items() if j.seq.done]:  # finished, or cancelled meanwhile
                job = running.pop(key)
                self.finished[job.seq.finish_reason] += 1
                job.notify()
