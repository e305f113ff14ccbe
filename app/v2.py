"""The V2 inference protocol (KServe, Triton, MLServer: the Open Inference Protocol) over HTTP.

    GET  /v2                          server metadata
    GET  /v2/health/live, /v2/health/ready
    GET  /v2/models/NAME              a BYTES input `text_input` and a BYTES output `text_output`, shape [-1]
    GET  /v2/models/NAME/ready
    POST /v2/models/NAME/infer        the prefixes in text_input, the generation settings (GET /limits'
                                      names) as request `parameters`; one text out per text in, run one
                                      after another under the same gate as GET/POST /, all of them
                                      together within the model's context (params.prompt_for)

Tensors travel as JSON or with Triton's binary tensor data extension (what tritonclient sends by
default: a JSON header of Inference-Header-Content-Length bytes, then each BYTES element as a 4-byte
little-endian length and its bytes). Errors are {"error": "..."}; a wrong model name, tensor name,
datatype or shape is a 400.
"""
import re
import time

from starlette.responses import Response

from app import answers, logs
from app.engine import Generation
from app.gate import run
from app.http import UJSONResponse, check_name, json_object, read_body
from app.params import ParamError, alias_specs, given_prefix, kind, parse, prompt_for, unalias
from app.schema import (BOOLEAN, GENERATES, INTEGER, STRING, STRINGS, budget, get, json_body, obj, responses,
                        schema)

INPUT, OUTPUT = "text_input", "text_output"
MAX_TEXTS = 4  # texts in one request: they hold the gate one after another, sharing n_ctx tokens
NOT_PARAMETERS = ("prefix", "stream", "nsamples")  # the text is the input; one text out per text in


def shape(status, message, retry_after=None):
    return {"error": message}


def error(status, message, headers=None):
    return UJSONResponse(shape(status, message), status, headers=headers)


# ---------------------------------------------------------------- tensors


def unpack_bytes(raw):
    """Triton's binary BYTES tensor: each element is a 4-byte little-endian length, then its bytes."""
    items, i = [], 0
    while i < len(raw):
        size = int.from_bytes(raw[i:i + 4], "little")
        if i + 4 + size > len(raw):
            raise ParamError(f"{INPUT}'s binary data is cut short: an element of {size} bytes does not fit")
        items.append(raw[i + 4:i + 4 + size])
        i += 4 + size
    return items


def pack_bytes(items):
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


def read_request(body, header_lengths):
    """(texts, generation parameters, request id, whether to answer in binary) from an infer body and its
    Inference-Header-Content-Length headers. An error that quotes a tensor name logs only its length."""
    if len(header_lengths) > 1:
        raise ParamError("Inference-Header-Content-Length is given more than once")
    header_length = header_lengths[0] if header_lengths else None
    if header_length is None:
        header, binary = body, b""
    elif header_length.isascii() and header_length.isdigit() and int(header_length) <= len(body):
        header, binary = body[:int(header_length)], body[int(header_length):]
    else:
        raise ParamError(f"Inference-Header-Content-Length must be a number of bytes up to the body's {len(body)}")
    data = json_object(header, "the request")
    if not isinstance(data, dict) or not isinstance(data.get("inputs"), list):
        raise ParamError(f'the request must be a JSON object with "inputs": [{{"name": "{INPUT}", ...}}]')
    if unknown := set(data) - {"id", "parameters", "inputs", "outputs"}:
        raise ParamError(f"unknown request field {sorted(unknown)[0]!r}")
    if not isinstance(data.get("id", ""), str):
        raise ParamError('"id" must be a string')
    if len(data["inputs"]) != 1 or not isinstance(data["inputs"][0], dict):
        raise ParamError(f"the model takes exactly one input tensor, {INPUT}")
    tensor = data["inputs"][0]
    if tensor.get("name") != INPUT:
        raise ParamError(f"unknown input {tensor.get('name')!r}; the model's input is {INPUT}",
                         logged=f"unknown input ({kind(tensor.get('name'))}); the model's input is {INPUT}")
    if tensor.get("datatype") != "BYTES":
        raise ParamError(f"{INPUT} must have datatype BYTES, got {tensor.get('datatype')!r}")
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and len(shape) == 1 and type(shape[0]) is int and 1 <= shape[0] <= MAX_TEXTS):
        raise ParamError(f"{INPUT} must have shape [N] with N from 1 to {MAX_TEXTS}, got {shape!r}")
    tensor_params = {} if tensor.get("parameters") is None else tensor["parameters"]
    if not isinstance(tensor_params, dict):
        raise ParamError(f"{INPUT}'s parameters must be an object")
    size = tensor_params.get("binary_data_size")
    if size is not None:
        if "data" in tensor:
            raise ParamError(f"{INPUT} has both data and binary_data_size: send its elements one way")
        if type(size) is not int or size != len(binary):
            raise ParamError(f"{INPUT}'s binary_data_size must be the {len(binary)} bytes after the JSON header")
        items = unpack_bytes(binary)
    else:
        items = tensor.get("data")
        if binary or not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ParamError(f"{INPUT}'s data must be a list of strings (or binary data)")
        items = [item.encode("utf-8", "surrogatepass") for item in items]
    if len(items) != shape[0]:
        raise ParamError(f"{INPUT} has shape {shape} but {len(items)} elements")
    try:
        texts = [item.decode("utf-8") for item in items]
    except UnicodeDecodeError:
        raise ParamError(f"{INPUT} must be UTF-8 text") from None

    parameters = {} if data.get("parameters") is None else data["parameters"]  # [] or "" is no object
    outputs = [] if data.get("outputs") is None else data["outputs"]
    if not isinstance(parameters, dict) or not isinstance(outputs, list):
        raise ParamError('"parameters" must be an object and "outputs" a list')
    parameters = {name: value for name, value in parameters.items() if value is not None}  # null: absent
    binary_out = parameters.pop("binary_data_output", False) is True
    if len(outputs) > 1:
        raise ParamError(f"the model has one output, {OUTPUT}: list it once")
    for output in outputs:
        if not isinstance(output, dict) or output.get("name") != OUTPUT:
            name = output.get("name") if isinstance(output, dict) else output
            raise ParamError(f"unknown output {name!r}; the model's output is {OUTPUT}",
                             logged=f"unknown output ({kind(name)}); the model's output is {OUTPUT}")
        if not isinstance(output.get("parameters") or {}, dict):
            raise ParamError(f"{OUTPUT}'s parameters must be an object")
        binary_out = (output.get("parameters") or {}).get("binary_data", binary_out) is True
    return texts, parameters, data.get("id"), binary_out


def generation_parameters(table):
    """What a request's `parameters` may set: GET /limits' parameters but the text and the answer's shape."""
    return {name: spec for name, spec in table.items() if name not in NOT_PARAMETERS}


def check_parameters(table, parameters):
    allowed = generation_parameters(table)
    if unknown := [name for name in parameters if name not in allowed]:
        raise ParamError(f"unknown parameter {unknown[0]!r}; the parameters are {', '.join(allowed)} "
                         f"(and binary_data_output)", unknown[0])


# ---------------------------------------------------------------- routes


async def server_metadata(request):
    return UJSONResponse({"name": "gpt2-run", "version": "1", "extensions": ["binary_tensor_data"]})


async def live(request):
    return UJSONResponse({"live": True})


async def ready(request):
    if request.app.state.gate.deadline is not None:  # draining after SIGTERM: send no more requests
        return error(503, "the server is shutting down", headers={"Retry-After": "1"})
    return UJSONResponse({"ready": True})  # the model loads before the port opens


async def model_metadata(request):
    try:
        check_name(request)
    except ParamError as e:
        return error(e.status, e.message)
    model = request.app.state.model
    tensor = {"datatype": "BYTES", "shape": [-1]}
    return UJSONResponse({"name": request.app.state.name, "versions": [model.manifest["checkpoint"]],
                          "platform": "gpt2-run", "inputs": [{"name": INPUT, **tensor}],
                          "outputs": [{"name": OUTPUT, **tensor}]})


async def model_ready(request):
    try:
        check_name(request)
    except ParamError as e:
        return error(e.status, e.message)
    return UJSONResponse({"name": request.app.state.name, "ready": True})


async def infer(request):
    state = request.app.state
    try:
        check_name(request)
        texts, parameters, request_id, binary_out = read_request(
            await read_body(request), request.headers.getlist("inference-header-content-length"))
        parameters = unalias(state.table, parameters)  # max_tokens, max_new_tokens, stop
        check_parameters(state.table, parameters)
        runs = []
        for text in texts:
            values = parse(state.table, {**parameters, **given_prefix(text)})
            runs.append((prompt_for(state.model, values, len(texts)), values))
    except ParamError as e:
        # The checks shared with GET / call the text prefix; a parameter sent as prefix is unknown.
        text = not e.message.startswith("unknown parameter")
        message, logged = (re.sub(r"\bprefix\b", INPUT, m) if text else m for m in (e.message, e.logged))
        request.state.log = {"error": message if logs.LOG_PROMPTS else logged,
                             "parameter": INPUT if text and e.parameter == "prefix" else e.parameter}
        return error(e.status, message)

    request.state.log = fields = {"params": logs.private(runs[0][1]),
                                  "texts": len(texts), "prompt_tokens": [len(prompt) for prompt, _ in runs]}
    generations = [Generation(state.model, prompt, **{k: v for k, v in values.items() if k != "stream"})
                   for prompt, values in runs]

    async def work():
        started, results = time.perf_counter(), []
        for generation in generations:
            results.append(await run(request, generation, state.gate))
        fields.update(tokens=sum(r["tokens"] for r in results), stop_reason=[r["stop_reason"] for r in results],
                      seconds=round(time.perf_counter() - started, 3))
        return respond(results, state, request_id, binary_out)

    return await answers.answer(request, generations, shape, work)


def respond(results, state, request_id, binary_out):
    """The infer answer: text_output as JSON, or as Triton's binary tensor data when asked."""
    output = {"name": OUTPUT, "datatype": "BYTES", "shape": [len(results)]}
    answer = {"model_name": state.name, "model_version": state.model.manifest["checkpoint"], "outputs": [output]}
    if request_id is not None:
        answer["id"] = request_id
    if not binary_out:
        output["data"] = [r["text"] for r in results]
        return UJSONResponse(answer)
    data = pack_bytes([r["text"].encode("utf-8") for r in results])
    output["parameters"] = {"binary_data_size": len(data)}
    header = UJSONResponse(answer).body
    return Response(header + data, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


# ---------------------------------------------------------------- the OpenAPI description


def paths(state):
    """The OpenAPI description of /v2, its health, the model's metadata and readiness, and inference."""
    error = obj({"error": STRING}, ["error"])
    texts = {"type": "array", "items": STRING, "minItems": 1, "maxItems": MAX_TEXTS}
    sizes = {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": MAX_TEXTS},
             "minItems": 1, "maxItems": 1}
    tensor = {"datatype": {"const": "BYTES"}, "shape": {"const": [-1]}}
    parameters = {n: schema(spec) for n, spec in generation_parameters(state.table).items()}
    parameters.update({n: schema(spec) for n, spec in alias_specs(state.table).items()})
    parameters["binary_data_output"] = BOOLEAN
    request = obj({
        "id": STRING,
        "parameters": obj(parameters, additionalProperties=False),
        "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": obj(
            {"name": {"const": INPUT}, "datatype": {"const": "BYTES"}, "shape": sizes, "data": texts},
            ["name", "datatype", "shape", "data"])},
        "outputs": {"type": "array", "items": obj({"name": {"const": OUTPUT},
                                                   "parameters": obj({"binary_data": BOOLEAN})}, ["name"])},
    }, ["inputs"])
    answer = obj({"model_name": STRING, "model_version": STRING, "id": STRING, "outputs": {
        "type": "array", "items": obj({"name": STRING, "datatype": STRING, "shape": {"type": "array", "items": INTEGER},
                                       "data": STRINGS, "parameters": {"type": "object"}},
                                      ["name", "datatype", "shape"])}}, ["model_name", "outputs"])
    model = [{"name": "name", "in": "path", "required": True, "schema": {"enum": [state.name]}}]
    return {
        "/v2": get("V2 server metadata", "v2_server",
                   obj({"name": STRING, "version": STRING, "extensions": STRINGS}, ["name", "version", "extensions"])),
        "/v2/health/live": get("V2 liveness", "v2_live", obj({"live": BOOLEAN}, ["live"])),
        "/v2/health/ready": get("V2 readiness (usable as Cloud Run's health check)", "v2_ready",
                                obj({"ready": BOOLEAN}, ["ready"]), error, (503,)),
        "/v2/models/{name}": get("V2 model metadata", "v2_model", obj(
            {"name": STRING, "versions": STRINGS, "platform": STRING,
             "inputs": {"type": "array", "items": obj({"name": {"const": INPUT}, **tensor})},
             "outputs": {"type": "array", "items": obj({"name": {"const": OUTPUT}, **tensor})}},
            ["name", "platform", "inputs", "outputs"]), error, (400,), model),
        "/v2/models/{name}/ready": get("V2 model readiness", "v2_model_ready",
                                       obj({"name": STRING, "ready": BOOLEAN}, ["name", "ready"]),
                                       error, (400,), model),
        "/v2/models/{name}/infer": {"post": {
            "summary": "V2 inference: texts in text_input, generated texts in text_output",
            "description": budget(state.model.n_ctx, "texts in text_input") + f" Up to {MAX_TEXTS} texts, "
                           "generated one after another.",
            "operationId": "v2_infer", "parameters": model,
            "requestBody": {"required": True, "content": json_body(request)},
            "responses": responses(answer, error, [c for c in GENERATES if c != 415], {
                **json_body(answer), "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}})}},
    }
