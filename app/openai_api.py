"""OpenAI-compatible completions: POST /v1/completions, GET /v1/models, and POST /v1/chat/completions
refused (this is a completion model, not a chat model).

Same model, gate, limits, logs and CORS as GET/POST /; OpenAI's names, defaults and answer shape.
Errors are OpenAI's {"error": {"message", "type", "param", "code"}}, which its SDK raises as
BadRequestError (400), NotFoundError (404), RateLimitError (429)... Parameters this model cannot
honour are refused by name unless they are given their neutral value.

A prompt is a string, a list of strings, a list of token ids or a list of such lists (one choice per
prompt, times n, prompt-major, as OpenAI indexes them; they run one after another, sharing n_ctx).
`logprobs: k` gives each choice OpenAI's legacy log-probabilities of its tokens (LlamaModel.logprobs), with
`echo` those of the prompt too; `max_tokens: 0` with `echo` scores the prompt and generates nothing.
"""
import re
import time
import uuid

from app import answers, logs
from app.engine import Generation
from app.tokenizer import TextDecoder
from app.gate import run
from app.http import UJSONResponse, json_params, read_body, sse
from app.params import STEERING, Boolean, Integer, Number, ParamError, Stop, Text, check, kind, prompt_for
from app.schema import (BOOLEAN, GENERATES, INTEGER, NUMBER, STRING, STRINGS, budget, get, json_body, obj,
                        responses, schema, sse_content)

# What a neutral value looks like for each parameter we do not support: those values are accepted
# (clients such as LangChain send them), anything else is refused naming the parameter.
UNSUPPORTED = {"suffix": (None, ""), "best_of": (None, 1)}
# Our engine's parameter -> OpenAI's name for it, to name the right one in errors.
OPENAI_NAMES = {"prefix": "prompt", "length": "max_tokens", "nsamples": "n", "truncate": "stop",
                "include_prefix": "echo"}


def parameters(table):
    """POST /v1/completions' parameters with OpenAI's defaults, limited as the API's `table` limits them.
    The validation and /openapi.json both read this."""
    return {
        "model": Text(None, 200),  # required: checked against the served model's name
        "prompt": Text("", table["prefix"].max_chars),  # empty: start a text (engine_arguments)
        "max_tokens": Integer(16, 0, table["length"].high),  # 0: with echo, the prompt scored only
        "temperature": Number(1.0, 0.0, table["temperature"].high),  # 0: greedy
        "top_p": Number(1.0, table["top_p"].low, table["top_p"].high),
        "n": Integer(1, 1, table["nsamples"].high),
        "stream": table["stream"],
        "stop": Stop(table["truncate"].max_chars, MAX_STOPS),
        "seed": table["seed"],
        "echo": Boolean(False),
        "logprobs": Integer(None, 0, 5),  # OpenAI's most
        "user": Text(None, 256),  # accepted, ignored
        "metadata": Metadata(),  # accepted, ignored
        "top_k": Integer(0, -1, table["top_k"].high),  # vLLM's and llama-server's; -1 (vLLM's) or 0: off
        **{name: table[name] for name in STEERING},  # presence_penalty, frequency_penalty, logit_bias: OpenAI's
    }


MAX_STOPS = 16  # OpenAI takes 4; evaluation clients send their task's stop strings and <|endoftext|>


class Metadata:
    """OpenAI's `metadata`: up to 16 pairs of strings (keys of at most 64 characters, values 512)."""
    type, default = "object", None

    def describe(self):
        return "an object of up to 16 strings (keys of at most 64 characters, values of at most 512)"

    def parse(self, value):
        ok = isinstance(value, dict) and len(value) <= 16 and all(
            isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in value.items())
        return value if ok else None

    def limits(self):
        return {"type": self.type, "default": None}


TYPES = {404: "not_found_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}
CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded", 503: "shutting_down"}


def shape(status, message, retry_after=None, param=None, code=None):
    """OpenAI's error, which its SDK raises as BadRequestError (400), RateLimitError (429)..."""
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code or CODES.get(status)}}


def error(status, message, param=None, code=None):
    return UJSONResponse(shape(status, message, param=param, code=code), status)


def openai_message(message):
    """A message from the shared checks, with our parameter names replaced by OpenAI's."""
    return re.sub(r"\b(" + "|".join(OPENAI_NAMES) + r")\b", lambda m: OPENAI_NAMES[m.group(1)], message)


def parse(table, given, n_vocab):
    """OpenAI's parameters, checked as params.parse checks ours; ParamError names OpenAI's name."""
    for name, value in given.items():
        if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
            raise ParamError(f"{name} is not supported by this model", name)
        if name not in table and name not in UNSUPPORTED and name != "stream_options":
            raise ParamError(f"unrecognized request argument {name!r}; the parameters are {', '.join(table)}", name)
    prompts = prompt_list(given.get("prompt"), n_vocab)
    for prompt in prompts:  # each string checked as a prompt
        if isinstance(prompt, str):
            check({"prompt": table["prompt"]}, {"prompt": prompt})
    values = check(table, {**given, "prompt": None})
    values["prompts"] = prompts
    if values["model"] is None:
        raise ParamError("model is required: the name GET /v1/models lists", "model")
    if values["stream"] and values["n"] > 1:
        raise ParamError("stream=true works with n=1 only", "n")
    if values["stream"] and len(prompts) > 1:
        raise ParamError("stream=true works with one prompt only", "prompt")
    if values["max_tokens"] == 0 and not values["echo"]:
        raise ParamError("max_tokens 0 scores the prompt, which needs echo: true (and logprobs)", "max_tokens")
    options = given.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage"}
                                    and isinstance(options.get("include_usage", False), bool)):
        raise ParamError('stream_options must be {"include_usage": true or false}', "stream_options")
    values["include_usage"] = bool(options and options.get("include_usage"))
    values["stop"] = values["stop"] or []
    return values


def prompt_list(prompt, n_vocab):
    """OpenAI's prompt as a list of prompts, each a string or a list of token ids (checked: a 400 names
    the first id outside the vocabulary); absent, one default prompt."""
    if prompt is None or isinstance(prompt, str):
        return [prompt or ""]
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        prompt = [prompt]
    if not (isinstance(prompt, list) and prompt and (
            all(isinstance(p, str) for p in prompt) or
            all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in prompt))):
        raise ParamError("prompt must be a string, a list of strings, a list of token ids or a list of lists "
                         f"of token ids, got {kind(prompt)}", "prompt")
    for t in (t for p in prompt if isinstance(p, list) for t in p):
        if not 0 <= t < n_vocab:
            raise ParamError(f"prompt holds the token id {t}, outside the vocabulary (0 to {n_vocab - 1})", "prompt")
    return prompt


def engine_arguments(values, table, prompt=""):
    """Generation's keyword arguments for OpenAI's values and one of its prompts (a string's; ids go to
    prompt_for); `table` is the API's, whose lowest temperature is the engine's: below it (OpenAI's 0
    included) decoding is greedy, as is top_p 0."""
    greedy = values["temperature"] < table["temperature"].low or values["top_p"] == 0
    # OpenAI: with no prompt "the model will generate as if from the beginning of a new document": for
    # a run trained on <|startoftext|>-delimited texts, the native API's default start does that.
    return {"prefix": (prompt or table["prefix"].default) if isinstance(prompt, str) else "",
            "length": values["max_tokens"], "nsamples": values["n"], "logprobs": values["logprobs"],
            "score_prompt": values["echo"] and values["logprobs"] is not None,
            "seed": values["seed"], "temperature": 1.0 if greedy else values["temperature"],
            "top_k": 1 if greedy else max(values["top_k"], 0),
            "top_p": 0.0 if greedy or values["top_p"] == 1 else values["top_p"],
            "top_p_replaces_top_k": False,  # both apply, top_k first (as vLLM)
            **{name: values[name] for name in STEERING},
            "truncate": values["stop"],  # the engine stops each choice at its first stop string
            "include_prefix": False,  # echo adds the prompt here, exactly as given
            "strip_newlines": False}  # a completion is exactly what was generated


def finish_reason(engine_reason):
    return "stop" if engine_reason in ("end_token", "truncate") else "length"


def answer(values, name, choices):
    """A completion, or a chunk of one, without its usage; choices: (text, finish_reason, logprobs)."""
    return {"id": values["id"], "object": "text_completion", "created": values["created"], "model": name,
            "choices": [{"text": text, "index": i, "finish_reason": reason, "logprobs": logprobs}
                        for i, (text, reason, logprobs) in enumerate(choices)]}


def usage(prompt_tokens, completion):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


# ---------------------------------------------------------------- log-probabilities


class Echo:
    """A prompt as echoed: its text, and (when it was given: not the default empty one) its tokens and
    where each one's text starts in it."""

    def __init__(self, tokenizer, prompt, ids):
        self.text, self.ids, self.offsets = prompt if isinstance(prompt, str) else "", [], []
        if prompt:
            decoder, text = TextDecoder(tokenizer), ""
            for t in ids:
                piece, at = decoder.add_at(t)
                self.offsets.append(len(text) + at)
                text += piece
            self.text, self.ids = text + decoder.flush(), ids


def token_text(tokenizer, token):
    """A token's text; OpenAI's "bytes:\\xNN..." for a token that is part of a character."""
    data = tokenizer.token_bytes(token)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def logprobs_of(tokenizer, ids, offsets, scores, end, base=0):
    """OpenAI's legacy logprobs of tokens: `offsets` in a text of `end` characters (a token's text is cut
    there, as a stop string cuts it), which starts at `base` in the choice's text."""
    tokens, top_logprobs = [], []
    for t, offset, score in zip(ids, offsets, scores):
        text = token_text(tokenizer, t)
        if t != tokenizer.end_token and not text.startswith("bytes:"):
            text = text[:max(0, end - offset)]
        tokens.append(text)
        top_logprobs.append(score and {**{token_text(tokenizer, i): lp for i, lp in score[1]},
                                       **({} if t in dict(score[1]) else {token_text(tokenizer, t): score[0]})})
    return {"tokens": tokens, "token_logprobs": [score and score[0] for score in scores],
            "top_logprobs": top_logprobs, "text_offset": [base + offset for offset in offsets]}


def choice_logprobs(tokenizer, echo, generation, sample, tokens, prompt=True):
    """A choice's logprobs: the echoed prompt's tokens (with `echo`, unless not `prompt`: a stream's later
    chunks), then the sample's `tokens` (a range of its tokens)."""
    base = len(echo.text) if echo else 0
    part = slice(tokens.start, tokens.stop)
    tail = logprobs_of(tokenizer, sample.ids[part], sample.offsets[part], sample.scores[part],
                       len(sample.generated), base)
    if not (echo and prompt):
        return tail
    head = logprobs_of(tokenizer, echo.ids, echo.offsets, generation.prompt_scores[:len(echo.ids)], len(echo.text))
    return {k: head[k] + tail[k] for k in tail}


# ---------------------------------------------------------------- routes


async def completions(request):
    state = request.app.state
    model = state.model
    try:
        values = parse(state.openai_table, json_params(request, await read_body(request)), model.n_vocab)
        if values["model"] != state.name:
            request.state.log = {"error": "unknown model", "parameter": "model"}
            return error(404, f"the model {values['model']!r} does not exist; this server serves "
                              f"{state.name!r} (GET /v1/models)", "model", "model_not_found")
        prompts, runs = values["prompts"], []
        for prompt in prompts:
            engine = engine_arguments(values, state.table, prompt)
            ids = prompt_for(model, engine, len(prompts), None if isinstance(prompt, str) else prompt)
            runs.append((prompt, ids, engine))
    except ParamError as e:
        param = OPENAI_NAMES.get(e.parameter, e.parameter)
        request.state.log = {"error": e.message, "parameter": param}
        return error(e.status, openai_message(e.message), param)

    values.update(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()))
    # Logged as GET / logs: the prompt as its length (as prefix_chars) unless LOG_PROMPTS=1; token ids
    # as their number (prompt_tokens); metadata (the client's texts) not at all.
    logged = {k: v for k, v in values.items() if k not in ("id", "created", "prompt", "prompts", "metadata")}
    texts = [p for p in prompts if isinstance(p, str)]
    prompt_tokens = [len(ids) for _, ids, _ in runs]
    request.state.log = fields = {
        "params": logs.private({**logged, "prefix": (texts[0] if len(prompts) == 1 else texts) if texts else None}),
        "prompt_tokens": prompt_tokens[0] if len(runs) == 1 else prompt_tokens}
    generations = [Generation(model, ids, **engine) for _, ids, engine in runs]
    echoes = [Echo(model.tokenizer, prompt, ids) if values["echo"] else None for prompt, ids, _ in runs]
    if values["stream"]:
        return await answers.stream(request, generations[0], shape,
                                    frame(values, state.name, sum(prompt_tokens), generations[0], echoes[0],
                                          model, fields), sse)

    async def work():
        choices, started = [], time.perf_counter()
        for generation, echo in zip(generations, echoes):
            await run(request, generation, state.gate)
            for sample in generation.samples:
                logprobs = None if values["logprobs"] is None else \
                    choice_logprobs(model.tokenizer, echo, generation, sample, sample.held())
                choices.append(((echo.text if echo else "") + sample.text(), finish_reason(sample.stop_reason),
                                logprobs))
        tokens = sum(generation.result["tokens"] for generation in generations)
        fields.update(tokens=tokens, stop_reason=choices[0][1], seconds=round(time.perf_counter() - started, 3))
        return UJSONResponse({**answer(values, state.name, choices), "usage": usage(sum(prompt_tokens), tokens)})

    return await answers.answer(request, generations, shape, work)


def frame(values, name, prompt_tokens, generation, echo, model, fields):
    """OpenAI's Server-Sent Events: a text_completion chunk per new piece (with the log-probabilities of
    the tokens it completes, when asked; the echoed prompt first), one with the finish_reason, (a usage
    chunk if stream_options asked for it), then `data: [DONE]`. An error is a chunk with "error", which
    the SDK raises."""
    sample, scored = generation.samples[0], values["logprobs"] is not None

    def chunk(text, reason=None, tokens=range(0), first=False):
        logprobs = choice_logprobs(model.tokenizer, echo, generation, sample, tokens, first) if scored else None
        return sse(answer(values, name, [(text, reason, logprobs)]))

    async def events(pieces):
        echoed = echo is None
        async for piece in pieces:
            if not echoed:  # after the first piece: the prompt is scored by then
                yield chunk(echo.text, first=True)
                echoed = True
            if piece or piece.tokens:
                yield chunk(piece, tokens=piece.tokens)
        result = generation.result
        fields["stop_reason"] = finish_reason(result["stop_reason"])  # logged as OpenAI's
        yield chunk("", fields["stop_reason"])
        if values["include_usage"]:
            yield sse({**answer(values, name, []), "usage": usage(prompt_tokens, result["tokens"])})
        yield "data: [DONE]\n\n"

    return events


async def models(request):
    model = request.app.state.model
    return UJSONResponse({"object": "list", "data": [
        {"id": request.app.state.name, "object": "model", "created": int(model.run_dir.stat().st_mtime),
         "owned_by": "gpt2-run", **model.served()}]})


async def chat_completions(request):
    return error(404, "this is a completion model, not a chat model: there is no /v1/chat/completions; "
                      "use POST /v1/completions with a prompt", code="not_found")


# ---------------------------------------------------------------- the OpenAPI description


def paths(state):
    """The OpenAPI description of /v1/completions, /v1/models and /v1/chat/completions."""
    error = obj({"error": obj({"message": STRING, "type": STRING, "param": {"type": ["string", "null"]},
                               "code": {"type": ["string", "null"]}}, ["message", "type", "param", "code"])},
                ["error"])
    properties = {n: schema(spec) for n, spec in state.openai_table.items()}
    properties["model"] = {"enum": [state.name]}
    prompt = properties["prompt"]
    ids = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": state.model.n_vocab - 1},
           "minItems": 1}
    properties["prompt"] = {"anyOf": [prompt, {"type": "array", "items": prompt, "minItems": 1}, ids,
                                      {"type": "array", "items": ids, "minItems": 1}]}
    properties.update({n: {"enum": list(neutral)} for n, neutral in UNSUPPORTED.items()})
    properties["stream_options"] = {"anyOf": [obj({"include_usage": BOOLEAN}, additionalProperties=False),
                                              {"type": "null"}]}
    scores = {"type": "array", "items": {"type": ["number", "null"]}}
    logprobs = obj({"tokens": STRINGS, "token_logprobs": scores, "text_offset": {"type": "array", "items": INTEGER},
                    "top_logprobs": {"type": "array", "items": {
                        "anyOf": [{"type": "object", "additionalProperties": NUMBER}, {"type": "null"}]}}},
                   ["tokens", "token_logprobs", "top_logprobs", "text_offset"])
    choice = obj({"text": STRING, "index": INTEGER, "logprobs": {"anyOf": [logprobs, {"type": "null"}]},
                  "finish_reason": {"enum": ["stop", "length", None]}}, ["text", "index", "finish_reason"])
    usage = obj({k: INTEGER for k in ("prompt_tokens", "completion_tokens", "total_tokens")})
    completion = obj({"id": STRING, "object": {"const": "text_completion"}, "created": INTEGER, "model": STRING,
                      "choices": {"type": "array", "items": choice}, "usage": usage},
                     ["id", "object", "created", "model", "choices"])
    model = obj({"id": STRING, "object": {"const": "model"}, "created": INTEGER, "owned_by": STRING,
                 # ours: the served checkpoint, its step and validation loss (null when unknown)
                 "checkpoint": STRING, "step": {"type": ["integer", "null"]},
                 "val_loss": {"type": ["number", "null"]}}, ["id", "object"])
    return {
        "/v1/completions": {"post": {
            "summary": "OpenAI-compatible completion", "operationId": "openai_completions",
            "description": budget(state.model.n_ctx, "n", "max_tokens"),
            "requestBody": {"required": True,
                            "content": json_body(obj(properties, ["model"], additionalProperties=False))},
            "responses": responses(completion, error, (*GENERATES, 404), {
                **json_body(completion), **sse_content(["message"], {"anyOf": [completion, error]}, "[DONE]")})}},
        "/v1/models": get("The served model, OpenAI's way", "openai_models",
                          obj({"object": {"const": "list"}, "data": {"type": "array", "items": model}},
                              ["object", "data"])),
        "/v1/chat/completions": {"post": {
            "summary": "Not offered: this is a completion model (always 404)", "operationId": "openai_chat",
            "responses": {"404": {"description": "use /v1/completions", "content": json_body(error)}}}},
    }
