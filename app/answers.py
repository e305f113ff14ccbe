"""What a generation request gets back, decided here once for every protocol: it queues at the gate;
refused there it gets 429 (busy) or 503 (shutting down), both with Retry-After; a client that hangs up
stops its generation and is logged `disconnected` with status 499; a generation that fails is logged
and answered 500. A protocol supplies only its error shape, shape(status, message, retry_after=None)
-> a JSON object, and for a stream its framing of the pieces and of an error."""
import contextlib
import time

from starlette.responses import Response, StreamingResponse

from app import logs
from app.gate import Busy, ClientLeft, ShuttingDown, steps
from app.http import UJSONResponse

SHUTTING_DOWN = "the server is shutting down; retry in 1 s"
FAILED = "the generation failed (an internal error, logged on the server)"


def tokens(generations):
    """Tokens generated so far, every sample of every generation counted."""
    return sum(len(sample.ids) for generation in generations for sample in generation.samples)


def refused(gate, reason, fields, shape):
    """429 for Busy, 503 for ShuttingDown, with Retry-After, in the protocol's shape."""
    if isinstance(reason, Busy):
        retry = gate.retry_after()
        status, fields["error"] = 429, "busy"
        message = f"busy: one generation runs at a time and {gate.size} are waiting; retry in {retry} s"
    else:
        status, retry, message, fields["error"] = 503, 1, SHUTTING_DOWN, "shutting down"
    return UJSONResponse(shape(status, message, retry), status, headers={"Retry-After": str(retry)})


async def answer(request, generations, shape, work):
    """The answer to a plain (not streamed) request: `work()` is the protocol's coroutine, run once the
    gate lets it in, that generates `generations` (with app.gate's run or steps) and returns the response.
    The request's log fields are request.state.log."""
    gate, fields = request.app.state.gate, request.state.log
    try:
        await gate.enter()
    except (Busy, ShuttingDown) as e:
        return refused(gate, e, fields, shape)
    started, seconds = time.perf_counter(), None
    try:
        response = await work()
        seconds = time.perf_counter() - started
        return response
    except ClientLeft:
        fields.update(disconnected=True, tokens=tokens(generations))
        return Response(status_code=499)  # nobody reads it: it is for the log
    except ShuttingDown as e:
        fields["tokens"] = tokens(generations)
        return refused(gate, e, fields, shape)
    except Exception:
        logs.logger.exception("generation failed")
        fields.update(error="generation failed", tokens=tokens(generations))
        return UJSONResponse(shape(500, FAILED), 500)
    finally:
        gate.leave(seconds)


async def stream(request, generation, shape, frame, error_event):
    """The answer to a streamed request: Server-Sent Events once the gate lets it in (else 429 or 503).
    frame(pieces) is the protocol's async generator that turns the generation's text pieces into events
    (it may end early, e.g. at a stop string); error_event(body) frames an error, which ends the stream."""
    gate, fields = request.app.state.gate, request.state.log
    try:
        await gate.enter()
    except (Busy, ShuttingDown) as e:
        return refused(gate, e, fields, shape)
    return Stream(request, generation, shape, frame, error_event)


class Stream(StreamingResponse):
    """The events of one generation. It holds the gate until it ends, however it ends (done, error,
    client gone, cancelled)."""

    def __init__(self, request, generation, shape, frame, error_event):
        self.generation, self.shape, self.error_event = generation, shape, error_event
        self.gate, self.fields, self.finished = request.app.state.gate, request.state.log, False
        super().__init__(self.events(request, frame), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def events(self, request, frame):
        try:
            async with contextlib.aclosing(steps(request, self.generation, self.gate)) as pieces, \
                    contextlib.aclosing(frame(pieces)) as events:
                async for event in events:
                    yield event
            self.finished = True
        except ClientLeft:
            return
        except ShuttingDown:
            self.fields["error"] = "shutting down"
            yield self.error_event(self.shape(503, SHUTTING_DOWN, 1))
        except Exception:
            logs.logger.exception("generation failed")
            self.fields["error"] = "generation failed"
            yield self.error_event(self.shape(500, FAILED))

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            result = self.generation.result
            self.gate.leave(result and result["seconds"])
            # the tokens the answer holds when it was finished (as a plain answer counts them), else those drawn
            self.fields["tokens"] = result["tokens"] if result else tokens([self.generation])
            if result:
                self.fields.setdefault("stop_reason", result["stop_reason"])
                self.fields["seconds"] = result["seconds"]
            elif not self.finished and "error" not in self.fields:
                self.fields["disconnected"] = True
            await self.body_iterator.aclose()  # tells the worker thread to stop, if it still runs
