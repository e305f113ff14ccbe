"""The tokenizer over HTTP, in vLLM's shapes (which lm-evaluation-harness's `tokenizer_backend=remote`
uses, and its `auto` looks for): GET /tokenizer_info, POST /tokenize, POST /detokenize.

/tokenize reads text as Hugging Face's GPT-2 tokenizer does: "<|endoftext|>" in it is the one end
token (lm-eval takes the end token's id from /tokenize of `eos_token`), where a prompt on the generating
routes keeps gpt-2-simple's reading (ordinary pieces). No special token is ever added (GPT-2's
tokenizer adds none), so `add_special_tokens` changes nothing. Errors in OpenAI's shape, as /v1's.
"""
from app.http import UJSONResponse, json_params, read_body
from app.params import Boolean, ParamError, Text, check, kind
from app.schema import BOOLEAN, INTEGER, STRING, get, json_body, obj, responses
from app.tokenizer import END_OF_TEXT

TEXT_MAX_CHARS = 16 * 1024  # the body's limit (app/http.py) bounds it anyway


def shape(status, message, retry_after=None, param=None):
    """An error as vLLM (and OpenAI) answer it."""
    return {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                      "param": param, "code": status}}


def error(status, message, param=None):
    return UJSONResponse(shape(status, message, param=param), status)


def table(state):
    return {"model": Text(None, 200), "prompt": Text(None, TEXT_MAX_CHARS), "add_special_tokens": Boolean(True),
            "return_token_strs": Boolean(False)}


def parse(request, given, names):
    """The parameters `names` of `given` (others refused by name); `model`, when given, must be the served one."""
    unknown = [name for name in given if name not in names]
    if unknown:
        raise ParamError(f"unrecognized request argument {unknown[0]!r}; the parameters are {', '.join(names)}",
                         unknown[0])
    values = check({n: s for n, s in table(request.app.state).items() if n in names}, given)
    if values.get("model") not in (None, request.app.state.name):
        raise ParamError(f"the model {values['model']!r} does not exist; this server serves "
                         f"{request.app.state.name!r}", "model", 404)
    return values


async def answer(request, work):
    try:
        return UJSONResponse(work(json_params(request, await read_body(request))))
    except ParamError as e:
        request.state.log = {"error": e.logged, "parameter": e.parameter}
        return error(e.status, e.message, e.parameter)


async def tokenizer_info(request):
    model = request.app.state.model
    return UJSONResponse({"tokenizer_class": "GPT2TokenizerFast", "eos_token": END_OF_TEXT, "bos_token": END_OF_TEXT,
                          "unk_token": END_OF_TEXT, "model_max_length": model.n_ctx, "vocab_size": model.n_vocab,
                          "add_prefix_space": False})


async def tokenize(request):
    model = request.app.state.model

    def work(given):
        values = parse(request, given, ("model", "prompt", "add_special_tokens", "return_token_strs"))
        if values["prompt"] is None:
            raise ParamError("prompt is required: the text to tokenize", "prompt")
        tokens = model.tokenizer.encode(values["prompt"], special=True)
        answer = {"count": len(tokens), "max_model_len": model.n_ctx, "tokens": tokens}
        if values["return_token_strs"]:
            answer["token_strs"] = [model.tokenizer.token_bytes(t).decode("utf-8", "replace") for t in tokens]
        return answer

    return await answer(request, work)


async def detokenize(request):
    model = request.app.state.model

    def work(given):
        parse(request, {k: v for k, v in given.items() if k != "tokens"}, ("model", "tokens"))
        tokens = given.get("tokens")
        if not (isinstance(tokens, list) and all(type(t) is int for t in tokens)):
            raise ParamError(f"tokens must be a list of token ids, got {kind(tokens)}", "tokens")
        outside = next((t for t in tokens if not 0 <= t < model.n_vocab), None)
        if outside is not None:
            raise ParamError(f"tokens holds the token id {outside}, outside the vocabulary (0 to "
                             f"{model.n_vocab - 1})", "tokens")
        return {"prompt": model.tokenizer.decode(tokens)}

    return await answer(request, work)


def paths(state):
    """The OpenAPI description of the three routes."""
    error = obj({"error": obj({"message": STRING, "type": STRING, "param": {"type": ["string", "null"]},
                               "code": INTEGER}, ["message", "type", "param", "code"])}, ["error"])
    ids = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": state.model.n_vocab - 1}}
    codes = (400, 404, 408, 413, 415)

    def post(summary, operation, body, answer):
        return {"post": {"summary": summary, "operationId": operation,
                         "requestBody": {"required": True, "content": json_body(body)},
                         "responses": responses(answer, error, codes)}}

    tokenize = obj({"model": {"enum": [state.name]}, "prompt": {"type": "string", "maxLength": TEXT_MAX_CHARS},
                    "add_special_tokens": BOOLEAN, "return_token_strs": BOOLEAN}, ["prompt"],
                   additionalProperties=False)
    tokens = obj({"count": INTEGER, "max_model_len": INTEGER, "tokens": ids,
                  "token_strs": {"type": "array", "items": STRING}}, ["count", "max_model_len", "tokens"])
    detokenize = obj({"model": {"enum": [state.name]}, "tokens": ids}, ["tokens"], additionalProperties=False)
    return {
        "/tokenizer_info": get("The tokenizer's facts, as vLLM gives them", "tokenizer_info",
                               obj({"tokenizer_class": STRING, "eos_token": STRING, "bos_token": STRING,
                                    "model_max_length": INTEGER}, ["eos_token", "model_max_length"])),
        "/tokenize": post("Text to token ids (\"<|endoftext|>\" is the end token), as vLLM's", "tokenize",
                          tokenize, tokens),
        "/detokenize": post("Token ids to text, as vLLM's", "detokenize", detokenize,
                            obj({"prompt": STRING}, ["prompt"])),
    }
