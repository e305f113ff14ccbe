"""OpenAI-compatible completions: POST /v1/completions, GET /v1/models, and POST /v1/chat/completions
refused (this is a completion model, not a chat model).

Same model, gate, limits, logs and CORS as GET/POST /; OpenAI's names, defaults and answer shape.
Errors are OpenAI's {"error": {"message", "type", "param", "code"}}, which its SDK raises as
BadRequestError (400), NotFoundError (404), RateLimitError (429)... Parameters this model cannot
honour are refused by name unless they are given their neutral value.
"""
import contextlib
import re
import time
import uuid

from starlette.requests import ClientDisconnect
from starlette.responses import Response

from app import logs
from app.engine import Generation
from app.main import (Busy, ClientLeft, GenerationStream, ShuttingDown, UJSONResponse, json_params, prompt_for,
                      read_body, run, sse, steps, tokens_so_far)
from app.params import Boolean, Integer, Number, ParamError, Text

# What a neutral value looks like for each parameter we do not support: those values are accepted
# (clients such as LangChain send them), anything else is refused naming the parameter.
UNSUPPORTED = {"suffix": (None, ""), "logprobs": (None,), "best_of": (None, 1), "presence_penalty": (None, 0),
               "frequency_penalty": (None, 0), "logit_bias": (None, {})}
# Our engine's parameter -> OpenAI's name for it, to name the right one in errors.
OPENAI_NAMES = {"prefix": "prompt", "length": "max_tokens", "nsamples": "n", "truncate": "stop",
                "include_prefix": "echo"}


class Stop:
    """OpenAI's `stop`: a string or a list of up to `max_items` strings; always parsed to a list."""

    def __init__(self, max_chars, max_items=4):
        self.default, self.text, self.max_items = None, Text(None, max_chars), max_items

    def describe(self):
        return f"a string or a list of up to {self.max_items} strings of at most {self.text.max_chars} characters"

    def parse(self, value):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or len(items) > self.max_items:
            return None
        if any(self.text.parse(item) is None for item in items):
            return None
        return [item for item in items if item]

    def limits(self):
        return {"type": "string or list", "default": None, "max_chars": self.text.max_chars,
                "max_items": self.max_items}


def parameters(table):
    """POST /v1/completions' parameters with OpenAI's defaults, limited as the API's `table` limits them.
    The validation and /openapi.json both read this."""
    return {
        "model": Text(None, 200),  # required: checked against the served model's name
        "prompt": table["prefix"],
        "max_tokens": Integer(16, 1, table["length"].high),
        "temperature": Number(1.0, 0.0, table["temperature"].high),  # 0: greedy
        "top_p": Number(1.0, table["top_p"].low, table["top_p"].high),
        "n": Integer(1, 1, table["nsamples"].high),
        "stream": table["stream"],
        "stop": Stop(table["truncate"].max_chars),
        "seed": table["seed"],
        "echo": Boolean(False),
        "user": Text(None, 256),  # accepted, ignored
    }


def model_name(model):
    """The served model's name here and in /v2: its run folder's ("run1")."""
    return model.run_dir.resolve().name


def error(status, message, param=None, code=None, headers=None):
    kind = {429: "rate_limit_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    return UJSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                         headers=headers)


def openai_message(message):
    """A message from the shared checks, with our parameter names replaced by OpenAI's."""
    return re.sub(r"\b(" + "|".join(OPENAI_NAMES) + r")\b", lambda m: OPENAI_NAMES[m.group(1)], message)


def parse(table, given):
    """OpenAI's parameters, checked as params.parse checks ours; ParamError names OpenAI's name."""
    for name, value in given.items():
        if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
            raise ParamError(f"{name} is not supported by this model", name)
        if name not in table and name not in UNSUPPORTED and name != "stream_options":
            raise ParamError(f"unrecognized request argument {name!r}; the parameters are {', '.join(table)}", name)
    prompt = given.get("prompt")
    if isinstance(prompt, list):  # a batch of one (LangChain sends lists) is fine; more are not supported
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise ParamError("prompt must be a string (or a list of one string); several prompts or token "
                             "ids are not supported", "prompt")
        given = {**given, "prompt": prompt[0]}
    values = {}
    for name, spec in table.items():
        value = given.get(name)
        values[name] = spec.default if value is None else spec.parse(value)
        if values[name] is None and value is not None:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            if isinstance(value, str) and isinstance(spec, (Text, Stop)):
                shown = f"{len(value)} characters"  # not the user's text: it goes to the logs too
            raise ParamError(f"{name} must be {spec.describe()}, got {shown}", name)
    if values["model"] is None:
        raise ParamError("model is required: the name GET /v1/models lists", "model")
    if values["stream"] and values["n"] > 1:
        raise ParamError("stream=true works with n=1 only", "n")
    options = given.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage"}
                                    and isinstance(options.get("include_usage", False), bool)):
        raise ParamError('stream_options must be {"include_usage": true or false}', "stream_options")
    values["include_usage"] = bool(options and options.get("include_usage"))
    values["stop"] = values["stop"] or []
    return values


def engine_arguments(values, table):
    """Generation's keyword arguments for OpenAI's values; `table` is the API's, whose lowest temperature
    is the engine's: below it (OpenAI's 0 included) decoding is greedy, as is top_p 0."""
    greedy = values["temperature"] < table["temperature"].low or values["top_p"] == 0
    stops = values["stop"]
    return {"prefix": values["prompt"], "length": values["max_tokens"], "nsamples": values["n"],
            "seed": values["seed"], "temperature": 1.0 if greedy else values["temperature"],
            "top_k": 1 if greedy else 0, "top_p": 0.0 if greedy or values["top_p"] == 1 else values["top_p"],
            # One stop string the engine stops at itself; more are cut here (StopText).
            "truncate": stops[0] if len(stops) == 1 else None,
            "include_prefix": False}  # echo adds the prompt here, exactly as given


class StopText:
    """One choice's completion as pieces arrive, cut at the first stop string. `add` returns what may be
    shown so far, holding back an ending that could still become a stop string."""

    def __init__(self, stops):
        self.stops, self.text, self.shown, self.stopped = stops, "", 0, False

    def add(self, piece):
        self.text += piece
        hits = [i for s in self.stops if (i := self.text.find(s, self.shown)) >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
        end = len(self.text)
        if not self.stopped:
            end -= max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        piece, self.shown = self.text[self.shown:end], end
        return piece

    def finish(self):
        piece, self.shown = self.text[self.shown:], len(self.text)
        return piece


def finish_reason(stop_text, engine_reason):
    return "stop" if stop_text.stopped or engine_reason in ("end_token", "truncate") else "length"


async def complete(request, generation, gate, stops):
    """Run a generation under main.steps' checks; (texts, finish reasons, completion tokens). With one
    choice it ends as soon as a stop string appears; with several each is cut afterwards."""
    if len(generation.samples) == 1:
        cut = StopText(stops)
        async with contextlib.aclosing(steps(request, generation, gate)) as pieces:
            async for piece in pieces:
                cut.add(piece)
                if cut.stopped:
                    return [cut.text], ["stop"], tokens_so_far(generation)
        result = generation.result
        return [cut.text], [finish_reason(cut, result["stop_reason"])], result["tokens"]
    result = await run(request, generation, gate)
    cuts = [StopText(stops) for _ in result["texts"]]
    for cut, text in zip(cuts, result["texts"]):
        cut.add(text)
    return [c.text for c in cuts], [finish_reason(c, r) for c, r in zip(cuts, result["stop_reasons"])], result["tokens"]


def answer(values, model, choices):
    """A completion, or a chunk of one, without its usage."""
    return {"id": values["id"], "object": "text_completion", "created": values["created"],
            "model": model_name(model),
            "choices": [{"text": text, "index": i, "finish_reason": reason, "logprobs": None}
                        for i, (text, reason) in enumerate(choices)]}


def usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---------------------------------------------------------------- routes


async def completions(request):
    state = request.app.state
    try:
        values = parse(state.openai_table, json_params(request, await read_body(request)))
        engine = engine_arguments(values, state.table)
        if values["model"] != model_name(state.model):
            request.state.log = {"error": "unknown model", "parameter": "model"}
            return error(404, f"the model {values['model']!r} does not exist; this server serves "
                              f"{model_name(state.model)!r} (GET /v1/models)", "model", "model_not_found")
        prompt = prompt_for(state.model, engine)
    except ParamError as e:
        param = OPENAI_NAMES.get(e.parameter, e.parameter)
        request.state.log = {"error": e.message, "parameter": param}
        return error(e.status, openai_message(e.message), param)
    except ClientDisconnect:
        return Response(status_code=499)

    values.update(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()))
    # Logged as GET / logs: the prompt as its length (as prefix_chars) unless LOG_PROMPTS=1.
    logged = {k: v for k, v in values.items() if k not in ("id", "created", "prompt")}
    request.state.log = fields = {"params": logs.private({**logged, "prefix": values["prompt"]}),
                                  "prompt_tokens": len(prompt)}
    generation = Generation(state.model, prompt, **engine)
    try:
        await state.gate.enter()
    except Busy:
        retry = state.gate.retry_after()
        fields["error"] = "busy"
        return error(429, f"busy: one generation runs at a time and {state.gate.size} are waiting; "
                          f"retry in {retry} s", code="rate_limit_exceeded", headers={"Retry-After": str(retry)})
    except ShuttingDown:
        return shutting_down(fields)
    if values["stream"]:
        return CompletionStream(request, generation, state.gate, fields, values, state.model, len(prompt))
    try:
        texts, reasons, tokens = await complete(request, generation, state.gate, values["stop"])
    except ClientLeft:
        fields.update(disconnected=True, tokens=tokens_so_far(generation))
        return Response(status_code=499)
    except ShuttingDown:
        fields["tokens"] = tokens_so_far(generation)
        return shutting_down(fields)
    finally:
        state.gate.leave(generation.result and generation.result["seconds"])
    if values["echo"]:
        texts = [values["prompt"] + text for text in texts]
    fields.update(tokens=tokens, stop_reason=reasons[0])
    return UJSONResponse({**answer(values, state.model, zip(texts, reasons)), "usage": usage(len(prompt), tokens)})


SHUTDOWN_ERROR = {"error": {"message": "the server is shutting down; retry in 1 s", "type": "server_error",
                            "param": None, "code": "shutting_down"}}


def shutting_down(fields):
    fields["error"] = "shutting down"
    return UJSONResponse(SHUTDOWN_ERROR, 503, headers={"Retry-After": "1"})


class CompletionStream(GenerationStream):
    """OpenAI's Server-Sent Events: a text_completion chunk per new piece, one with the finish_reason,
    (a usage chunk if stream_options asked for it), then `data: [DONE]`. An error is a chunk with
    "error", which the SDK raises."""

    def __init__(self, request, generation, gate, fields, values, model, prompt_tokens):
        self.values, self.model, self.prompt_tokens = values, model, prompt_tokens
        self.cut = StopText(values["stop"])
        super().__init__(request, generation, gate, fields)

    def chunk(self, text, reason=None):
        return sse(answer(self.values, self.model, [(text, reason)]))

    async def events(self, request):
        if self.values["echo"]:
            yield self.chunk(self.values["prompt"])
        try:
            async with contextlib.aclosing(steps(request, self.generation, self.gate)) as pieces:
                async for piece in pieces:
                    if shown := self.cut.add(piece):
                        yield self.chunk(shown)
                    if self.cut.stopped:
                        break
        except ClientLeft:
            return
        except ShuttingDown:
            self.fields["error"] = "shutting down"
            yield sse(SHUTDOWN_ERROR)
            return
        except Exception:
            logs.logger.exception("generation failed")
            self.fields["error"] = "generation failed"
            yield sse({"error": {"message": "the generation failed (an internal error, logged on the server)",
                                 "type": "server_error", "param": None, "code": None}})
            return
        if rest := self.cut.finish():
            yield self.chunk(rest)
        result = self.generation.result
        yield self.chunk("", finish_reason(self.cut, result and result["stop_reason"]))
        if self.values["include_usage"]:
            tokens = result["tokens"] if result else tokens_so_far(self.generation)
            yield sse({**answer(self.values, self.model, []), "usage": usage(self.prompt_tokens, tokens)})
        yield "data: [DONE]\n\n"

    async def __call__(self, scope, receive, send):
        await super().__call__(scope, receive, send)
        if self.cut.stopped:  # it ended at a stop string, not because the client left
            self.fields.pop("disconnected", None)
            self.fields["stop_reason"] = "stop"


async def models(request):
    model = request.app.state.model
    return UJSONResponse({"object": "list", "data": [
        {"id": model_name(model), "object": "model", "created": int(model.run_dir.stat().st_mtime),
         "owned_by": "gpt2-run"}]})


async def chat_completions(request):
    return error(404, "this is a completion model, not a chat model: there is no /v1/chat/completions; "
                      "use POST /v1/completions with a prompt", code="not_found")
