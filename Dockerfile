# The Cloud Run image: a gpt-2-simple run (checkpoint/run1) served by app/ without TensorFlow.
#
#   docker build -t gpt2 .                       # with the run in checkpoint/run1
#   docker run -p 8080:8080 --memory=2g --cpus=1 gpt2
#
# Three stages: `wheels` makes the llama-cpp-python wheel (PyPI has none: it compiles llama.cpp, or
# takes a fitting wheel from wheels/, where `make setup` keeps the one it built); `export` installs
# TensorFlow only to turn the checkpoint into a GGUF file (python -m finetune.export), so a checkpoint
# straight from a notebook works with no extra step; the runtime stage holds the serving
# requirements (that wheel, no compiler), app/ and the exported model, baked in because Cloud Run
# has no local storage to fetch a model into. Layers go from least to most often changed: a new
# checkpoint rebuilds only the model layers, never the packages.
#
# llama.cpp's CPU build is portable, never -march=native (a builder with AVX-512 would make an image
# that crashes on Cloud Run hosts without it): GGML_NATIVE=OFF for x86-64-v3 (AVX2, FMA, F16C, BMI2),
# which every Cloud Run CPU has, compiled once. The reasons, and the flags: scripts/llama_wheel.sh.

# ---- wheels: llama-cpp-python, compiled here unless wheels/ holds one built with the portable flags
FROM python:3.11-slim AS wheels
WORKDIR /build
COPY requirements.txt scripts/llama_wheel.sh ./
COPY wheels/ wheels/
# Debian's compilers of the base image's release: what the wheel is built with needs no version pin.
# hadolint ignore=DL3008
RUN if ! sh llama_wheel.sh wheels --check; then \
        apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
        && rm -rf /var/lib/apt/lists/* && sh llama_wheel.sh wheels; \
    fi \
    && mkdir /wheels && cp wheels/llama_cpp_python-*.whl /wheels/

# ---- export: checkpoint -> weights/model.gguf (TensorFlow lives only in this stage)
FROM python:3.11-slim AS export
WORKDIR /build
COPY requirements.txt requirements-train.txt ./
# TensorFlow, gguf and the serving packages (llama.cpp quantizes), at their pinned versions; nothing
# else of requirements-train.txt.
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    grep -hE '^(numpy|tensorflow-cpu|gguf|pyyaml|diskcache|jinja2|MarkupSafe|typing-extensions|llama-cpp-python)==' \
        requirements.txt requirements-train.txt > export-requirements.txt \
    && pip install --no-cache-dir --find-links /wheels --only-binary llama-cpp-python -r export-requirements.txt
COPY finetune/ finetune/
COPY checkpoint/run1/ checkpoint/run1/
# Gather what the server reads: the export, the tokenizer files, hparams, the exported checkpoint's
# .index, and the `checkpoint` and best.json files (small; the server checks the export against them to
# refuse a stale one: an export of the best step, not the latest, is served only beside the best.json
# naming it), and corpus.json (the run's text format) when the run has them. The big model-N.data
# files stay behind in this stage. Readable by all: the export's folder is made private.
# The weight type: docker build --build-arg QUANT=Q4_K_M (F32, F16, Q8_0, Q5_K_M, Q4_K_M; README).
ARG QUANT=Q8_0
RUN python -m finetune.export checkpoint/run1 --quant "$QUANT" \
    && exported="$(python -c 'import json; print(json.load(open("checkpoint/run1/weights/manifest.json"))["checkpoint"])')" \
    && mkdir /model \
    && cp -r checkpoint/run1/weights checkpoint/run1/checkpoint checkpoint/run1/hparams.json \
       checkpoint/run1/encoder.json checkpoint/run1/vocab.bpe "checkpoint/run1/${exported}.index" /model/ \
    && for optional in best.json corpus.json; do \
           if [ -f "checkpoint/run1/$optional" ]; then cp "checkpoint/run1/$optional" /model/; fi; \
       done \
    && chmod -R a+rX /model

# ---- runtime: what Cloud Run starts
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8080 \
    MODEL_DIR=/srv/checkpoint/run1
WORKDIR /srv
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gpt2
COPY requirements.txt ./
# llama-cpp-python only from the wheel built above (mounted, so it leaves no layer behind).
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-cache-dir --find-links /wheels --only-binary llama-cpp-python -r requirements.txt
# The model before the code: editing app/ then does not re-push the weights layer.
COPY --from=export /model/ checkpoint/run1/
COPY app/ app/
# Compiled now, as root: the server's user cannot write here, and a cold start should not compile.
RUN python -m compileall -q app
# Everything above is root-owned and read-only to the server.
USER 10001
EXPOSE 8080
# One process, one worker: Cloud Run runs it with --concurrency=1 and scales out by instances.
CMD ["python", "-m", "app"]
