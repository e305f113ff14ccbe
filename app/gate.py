"""One generation at a time: the gate requests queue at, the drain on SIGTERM, and `steps`/`run`, which
run a generation in a worker thread and stop it when its client hangs up or the drain's deadline passes."""
import asyncio
import collections
import contextlib
import contextvars
import math
import threading
import time

from app import metrics

DRAIN_SECONDS = 5  # after SIGTERM, a generation in flight may go on this long; Cloud Run kills at 10 s
CHECK_SECONDS = 0.25  # how often a long token is interrupted to check for a departed client or SIGTERM


class Busy(Exception):
    """Refused: a generation is running and the queue is full."""


class ShuttingDown(Exception):
    """Refused or stopped: the server got SIGTERM (see Gate.drain)."""


class ClientLeft(Exception):
    """The client hung up before its answer was ready."""


class Gate:
    """One generation at a time; up to `size` requests wait their turn (in order), more are refused.

    drain() (on SIGTERM) refuses the waiting at once and anyone new, and sets the deadline at which
    the generation running stops between tokens (see `steps`), so that the process exits within
    Cloud Run's 10 s."""

    def __init__(self, size):
        self.size = size
        self.running = False
        self.waiting = collections.deque()  # one future per waiting request, first come first served
        self.typical_seconds = 2.0  # a running average, for Retry-After
        self.deadline = None  # time.monotonic() at which a generation in flight stops; set by drain()
        self.loop = asyncio.get_running_loop()

    async def enter(self):
        if self.deadline is not None:
            raise ShuttingDown()
        if not self.running:
            self.running = True
            return
        if len(self.waiting) >= self.size:
            raise Busy()
        turn = self.loop.create_future()
        self.waiting.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self.leave()  # the turn came as this request was cancelled: pass it on
            elif turn in self.waiting:
                self.waiting.remove(turn)
            raise

    def leave(self, seconds=None):
        if seconds:
            self.typical_seconds = 0.7 * self.typical_seconds + 0.3 * seconds
        while self.waiting:
            turn = self.waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.running = False

    def drain(self, seconds=DRAIN_SECONDS):
        self.deadline = time.monotonic() + seconds
        while self.waiting:
            turn = self.waiting.popleft()
            if not turn.done():
                turn.set_exception(ShuttingDown())

    def stopping(self):
        return self.deadline is not None and time.monotonic() >= self.deadline

    def retry_after(self):
        return max(1, math.ceil(self.typical_seconds * (len(self.waiting) + 1)))


_DONE = object()


async def steps(request, generation, gate, every_piece=True):
    """Run `generation` in a worker thread and yield its new text piece by piece. The caller holds the gate.

    It stops with ClientLeft when the client hung up, or ShuttingDown once the drain deadline passed
    (checked between tokens, and every CHECK_SECONDS during a long one); the thread then ends after
    the token it is on. Use it with contextlib.aclosing, so that the thread is told to stop however
    the caller ends. With every_piece false (a plain answer, which needs only its end) the thread hands
    over only the first piece (the time to first token) and the end, and the checks run every
    CHECK_SECONDS: the event loop is not woken for every token."""
    if await request.is_disconnected():
        raise ClientLeft()  # gave up while waiting in the queue
    loop = asyncio.get_running_loop()
    pieces = asyncio.Queue()
    stop = threading.Event()

    def put(item):
        with contextlib.suppress(RuntimeError):  # the event loop is closed: the process is exiting
            loop.call_soon_threadsafe(pieces.put_nowait, item)

    def work():
        first = True
        try:
            for piece in generation:
                if stop.is_set():
                    return
                if every_piece or first:
                    put(piece)
                    first = False
        except Exception as e:
            put(e)
        else:
            put(_DONE)

    # In the request's context: whatever it logs (a library's warning) carries the request's trace (app/logs.py).
    threading.Thread(target=contextvars.copy_context().run, args=(work,), name="generation", daemon=True).start()
    timing = metrics.Timing()
    try:
        while True:
            try:
                piece = await asyncio.wait_for(pieces.get(), CHECK_SECONDS)
            except TimeoutError:
                piece = None
            if gate.stopping():
                raise ShuttingDown()
            if await request.is_disconnected():
                raise ClientLeft()
            if piece is _DONE:
                return
            if isinstance(piece, Exception):
                raise piece
            if piece is not None:
                timing.token()
                yield piece
    finally:
        stop.set()
        generation.stop.set()  # a long prompt being scored stops at its next chunk
        timing.done()


async def run(request, generation, gate):
    """The whole answer, generated between the same checks as a stream (see `steps`)."""
    async with contextlib.aclosing(steps(request, generation, gate, every_piece=False)) as pieces:
        async for _ in pieces:
            pass
    return generation.result
