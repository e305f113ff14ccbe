"""OpenAI-compatible completions: POST /v1/completions, GET /v1/models, and POST /v1/chat/completions
refused (this is a completion model, not a chat model).

Same model, gate, limits, logs and CORS as GET/POST /; OpenAI's names, defaults and answer shape.
Errors are OpenAI's {"error": {"message", "type", "param", "code"}}, which its SDK raises as
BadRequestError (400), NotFoundError (404), RateLimitError (429)... Parameters this model cannot
honour are refused by name unless they are given their neutral value.
"""
import re
import time
import uuid

from app import answers, logs
from app.engine import Generation
from app.gate import run
from app.http import UJSONResponse, json_params, read_body, sse
from app.params import STEERING, Boolean, Integer, Number, ParamError, Stop, Text, check, prompt_for
from app.schema import (BOOLEAN, GENERATES, INTEGER, STRING, budget, get, json_body, obj, responses, schema,
                        sse_content)

# What a neutral value looks like for each parameter we do not support: those values are accepted
# (clients such as LangChain send them), anything else is refused naming the parameter.
UNSUPPORTED = {"suffix": (None, ""), "logprobs": (None,), "best_of": (None, 1)}
# Our engine's parameter -> OpenAI's name for it, to name the right one in errors.
OPENAI_NAMES = {"prefix": "prompt", "length": "max_tokens", "nsamples": "n", "truncate": "stop",
                "include_prefix": "echo"}


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
        "top_k": Integer(0, -1, table["top_k"].high),  # vLLM's and llama-server's; -1 (vLLM's) or 0: off
        **{name: table[name] for name in STEERING},  # presence_penalty, frequency_penalty, logit_bias: OpenAI's
    }


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
    values = check(table, given)
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
    return {"prefix": values["prompt"], "length": values["max_tokens"], "nsamples": values["n"],
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


def completion_tokens(model, texts):
    """usage.completion_tokens: the tokens of the text returned (not of what was generated past a stop)."""
    return sum(len(model.tokenizer.encode(text)) for text in texts)


def answer(values, name, choices):
    """A completion, or a chunk of one, without its usage."""
    return {"id": values["id"], "object": "text_completion", "created": values["created"], "model": name,
            "choices": [{"text": text, "index": i, "finish_reason": reason, "logprobs": None}
                        for i, (text, reason) in enumerate(choices)]}


def usage(prompt_tokens, completion):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


# ---------------------------------------------------------------- routes


async def completions(request):
    state = request.app.state
    try:
        values = parse(state.openai_table, json_params(request, await read_body(request)))
        engine = engine_arguments(values, state.table)
        if values["model"] != state.name:
            request.state.log = {"error": "unknown model", "parameter": "model"}
            return error(404, f"the model {values['model']!r} does not exist; this server serves "
                              f"{state.name!r} (GET /v1/models)", "model", "model_not_found")
        prompt = prompt_for(state.model, engine)
    except ParamError as e:
        param = OPENAI_NAMES.get(e.parameter, e.parameter)
        request.state.log = {"error": e.message, "parameter": param}
        return error(e.status, openai_message(e.message), param)

    values.update(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()))
    # Logged as GET / logs: the prompt as its length (as prefix_chars) unless LOG_PROMPTS=1.
    logged = {k: v for k, v in values.items() if k not in ("id", "created", "prompt")}
    request.state.log = fields = {"params": logs.private({**logged, "prefix": values["prompt"]}),
                                  "prompt_tokens": len(prompt)}
    generation = Generation(state.model, prompt, **engine)
    if values["stream"]:
        return await answers.stream(request, generation, shape,
                                    frame(values, state.name, len(prompt), generation, state.model, fields), sse)

    async def work():
        result = await run(request, generation, state.gate)
        texts, reasons = result.get("texts", [result["text"]]), result.get("stop_reasons", [result["stop_reason"]])
        choices = [(values["prompt"] + text if values["echo"] else text, finish_reason(reason))
                   for text, reason in zip(texts, reasons)]
        fields.update(tokens=result["tokens"], stop_reason=choices[0][1], seconds=result["seconds"])
        return UJSONResponse({**answer(values, state.name, choices),
                              "usage": usage(len(prompt), completion_tokens(state.model, texts))})

    return await answers.answer(request, [generation], shape, work)


def frame(values, name, prompt_tokens, generation, model, fields):
    """OpenAI's Server-Sent Events: a text_completion chunk per new piece, one with the finish_reason,
    (a usage chunk if stream_options asked for it), then `data: [DONE]`. An error is a chunk with
    "error", which the SDK raises."""

    def chunk(text, reason=None):
        return sse(answer(values, name, [(text, reason)]))

    async def events(pieces):
        if values["echo"]:
            yield chunk(values["prompt"])
        async for piece in pieces:
            if piece:
                yield chunk(piece)
        result = generation.result
        fields["stop_reason"] = finish_reason(result["stop_reason"])  # logged as OpenAI's
        yield chunk("", fields["stop_reason"])
        if values["include_usage"]:
            tokens = completion_tokens(model, [result["text"]])
            yield sse({**answer(values, name, []), "usage": usage(prompt_tokens, tokens)})
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
    properties["prompt"] = {"anyOf": [prompt, {"type": "array", "items": prompt, "minItems": 1, "maxItems": 1}]}
    properties.update({n: {"enum": list(neutral)} for n, neutral in UNSUPPORTED.items()})
    properties["stream_options"] = {"anyOf": [obj({"include_usage": BOOLEAN}, additionalProperties=False),
                                              {"type": "null"}]}
    choice = obj({"text": STRING, "index": INTEGER, "logprobs": {"type": "null"},
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
