# The Cloud Run image: a gpt-2-simple run (checkpoint/run1) served by app/ without TensorFlow.
#
#   docker build -t gpt2 .                       # with the run in checkpoint/run1
#   docker run -p 8080:8080 --memory=2g --cpus=1 gpt2
#
# Two stages: `export` installs TensorFlow only to turn the checkpoint into .npy files
# (python -m finetune.export), so a checkpoint straight from a notebook works with no extra step;
# the runtime stage holds the serving requirements, app/ and the exported model, baked in because
# Cloud Run has no local storage to fetch a model into. Layers go from least to most often changed:
# a new checkpoint rebuilds only the model layers, never the packages.

# ---- export: checkpoint -> weights/ (TensorFlow lives only in this stage)
FROM python:3.11-slim AS export
WORKDIR /build
COPY requirements.txt requirements-train.txt ./
# Only TensorFlow and NumPy, at the versions pinned for training (nothing else of requirements-train.txt).
RUN grep -hE '^(numpy|tensorflow-cpu)==' requirements.txt requirements-train.txt > export-requirements.txt \
    && pip install --no-cache-dir -r export-requirements.txt
COPY finetune/ finetune/
COPY checkpoint/run1/ checkpoint/run1/
# Gather what the server reads: the export, the tokenizer files, hparams, and the `checkpoint` file with
# the latest .index (small; the server checks the export against them to refuse a stale one). The big
# model-N.data file stays behind in this stage. Readable by all: the export's folder is made private.
RUN python -m finetune.export checkpoint/run1 \
    && latest="$(python -c 'import json; print(json.load(open("checkpoint/run1/weights/manifest.json"))["checkpoint"])')" \
    && mkdir /model \
    && cp -r checkpoint/run1/weights checkpoint/run1/checkpoint checkpoint/run1/hparams.json \
       checkpoint/run1/encoder.json checkpoint/run1/vocab.bpe "checkpoint/run1/${latest}.index" /model/ \
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
# tokenizers goes in with --no-deps: its huggingface-hub dependency only serves from_pretrained,
# and the app builds its tokenizer from the run's encoder.json and vocab.bpe.
RUN grep -v '^tokenizers==' requirements.txt > /tmp/serving.txt \
    && grep '^tokenizers==' requirements.txt > /tmp/tokenizers.txt \
    && pip install --no-cache-dir -r /tmp/serving.txt \
    && pip install --no-cache-dir --no-deps -r /tmp/tokenizers.txt \
    && rm /tmp/serving.txt /tmp/tokenizers.txt
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
