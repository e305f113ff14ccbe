"""Triton's generate extension: one text in, its generation out, as plain JSON (what Triton's LLM users,
its vLLM and TensorRT-LLM backends and genai-perf send).

    POST /v2/models/NAME/generate         {"text_input": "...", "parameters": {...}}
                                          -> {"model_name", "model_version", "text_output"}
    POST /v2/models/NAME/generate_stream  the same request; Server-Sent Events, one such object per new
                                          piece of text (an error is an event {"error": "..."})

The parameters are infer's (GET /limits' names but prefix and nsamples, plus the aliases max_tokens,
max_new_tokens and stop); they may also stand beside text_input, as Triton's model inputs do. `id`
comes back. Errors are {"error": "..."}, as in the rest of /v2.
"""
from app import answers, logs
from app.engine import Generation
from app.gate import run
from app.http import UJSONResponse, check_name, json_params, read_body, sse
from app.params import ParamError, alias_specs, given_prefix, parse, prompt_for, unalias
from app.schema import GENERATES, STRING, json_body, obj, responses, schema, sse_content

INPUT, OUTPUT = "text_input", "text_output"
NOT_PARAMETERS = ("prefix", "nsamples")  # the text is text_input; one text out


def shape(status, message, retry_after=None):
    return {"error": message}


def read_request(state, data, streamed):
    """(the generation's parameter values, text_input as its prefix; the request id) from a generate body."""
    if not isinstance(data.get(INPUT), str):
        raise ParamError(f'the request must be a JSON object with "{INPUT}": a string', INPUT)
    request_id = data.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ParamError('"id" must be a string', "id")
    parameters = {} if data.get("parameters") is None else data["parameters"]  # [] or "" is no object
    if not isinstance(parameters, dict):
        raise ParamError('"parameters" must be an object', "parameters")
    # null means absent, as in params.check: {"max_tokens": null, "length": 3} gives length once.
    parameters = {name: value for name, value in parameters.items() if value is not None}
    given = {name: value for name, value in data.items() if name not in (INPUT, "id", "parameters")
             and value is not None}
    if twice := set(given) & set(parameters):
        name = sorted(twice)[0]
        raise ParamError(f"{name} is given both beside {INPUT} and in parameters: give it once", name)
    given = unalias(state.table, {**given, **parameters})
    allowed = [name for name in state.table if name not in NOT_PARAMETERS]
    if unknown := [name for name in given if name not in allowed]:
        raise ParamError(f"unknown parameter {unknown[0]!r}; the parameters are {', '.join(allowed)} "
                         f"(or {', '.join(alias_specs(state.table))})", unknown[0])
    values = parse(state.table, {**given, **given_prefix(data[INPUT])})
    if values["stream"] and not streamed:
        raise ParamError("stream=true is for generate_stream; generate answers in one piece", "stream")
    values["stream"] = streamed  # generate_stream streams, whether or not the request says so
    return values, request_id


async def generate(request, streamed=False):
    state = request.app.state
    try:
        check_name(request)
        values, request_id = read_request(state, json_params(request, await read_body(request)), streamed)
        prompt = prompt_for(state.model, values)
    except ParamError as e:
        # The checks shared with GET / call the text prefix; a parameter sent as prefix is an unknown one.
        text = e.parameter == "prefix" and not e.message.startswith("unknown parameter")
        parameter = INPUT if text else e.parameter
        message = e.message.replace("prefix", INPUT) if text else e.message
        request.state.log = {"error": message, "parameter": parameter}
        return UJSONResponse(shape(e.status, message), e.status)

    request.state.log = fields = {"params": logs.private(values), "prompt_tokens": len(prompt)}
    head = {"model_name": state.name, "model_version": state.model.manifest["checkpoint"]}
    if request_id is not None:
        head["id"] = request_id
    generation = Generation(state.model, prompt, **{k: v for k, v in values.items() if k != "stream"})
    if streamed:
        return await answers.stream(request, generation, shape, frame(head), sse)

    async def work():
        result = await run(request, generation, state.gate)
        fields.update({k: result[k] for k in ("tokens", "stop_reason", "seconds")})
        return UJSONResponse({**head, OUTPUT: result["text"]})

    return await answers.answer(request, [generation], shape, work)


async def generate_stream(request):
    return await generate(request, streamed=True)


def frame(head):
    """An event {"model_name", "model_version", "text_output": piece} per new piece of text."""

    async def events(pieces):
        async for piece in pieces:
            if piece:
                yield sse({**head, OUTPUT: piece})

    return events


def paths(state):
    """The OpenAPI description of generate and generate_stream."""
    error = obj({"error": STRING}, ["error"])
    parameters = {n: schema(spec) for n, spec in state.table.items() if n not in NOT_PARAMETERS}
    parameters.update({n: schema(spec) for n, spec in alias_specs(state.table).items()})
    request = obj({INPUT: {**schema(state.table["prefix"]), "type": "string"}, "id": STRING,
                   "parameters": obj(parameters, additionalProperties=False), **parameters}, [INPUT],
                  additionalProperties=False)
    answer = obj({"model_name": STRING, "model_version": STRING, "id": STRING, OUTPUT: STRING},
                 ["model_name", "model_version", OUTPUT])
    model = [{"name": "name", "in": "path", "required": True, "schema": {"enum": [state.name]}}]
    body = {"required": True, "content": json_body(request)}
    return {
        "/v2/models/{name}/generate": {"post": {
            "summary": "Triton's generate extension: text_input in, text_output out",
            "operationId": "v2_generate", "parameters": model, "requestBody": body,
            "responses": responses(answer, error, GENERATES)}},
        "/v2/models/{name}/generate_stream": {"post": {
            "summary": "Triton's generate extension, streamed: an event per new piece of text_output",
            "operationId": "v2_generate_stream", "parameters": model, "requestBody": body,
            "responses": responses(answer, error, GENERATES,
                                   sse_content(["message"], {"anyOf": [answer, error]}))}},
    }
