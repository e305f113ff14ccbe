"""GPT-2's forward pass in llama.cpp, in-process through llama-cpp-python's C bindings.

Token ids go in; tokens come out, drawn by llama.cpp's own sampler chain from the logits in place
(no copy of the logits into Python, and no NumPy in the server: 20 MB less at peak, 50 ms less of a
cold start, measured); app/engine.py chooses the chain so that every API parameter means what it meant with
gpt-2-simple, and handles the text. The GGUF file carries the run's vocabulary, whose
tokenizer (GPT-2's byte-level BPE) app/tokenizer.py uses through `tokenize` and `piece`. The GGUF
file is memory-mapped (never rewritten in place: see finetune/export.py). Samples of one request
are sequences 0..B-1 of one key/value cache; the prompt is computed once, in sequence 0, and shared
with the others. The cache holds n_ctx positions in all: a request's samples share the model's
context (the API's limit), which keeps it at 36 MB at the 124M shape whatever the request.

Threads: give it only CPUs that are the server's alone: ggml's threads wait for each other at every
operation by spinning, so a thread that is not scheduled stalls every token (measured: 50-100 ms a
token instead of 1-2 with 2 threads on a busy 2-core machine).
"""
import array
import ctypes
import math
import importlib
import importlib.util
import sys


def _bindings():
    """llama-cpp-python's ctypes bindings of llama.h (llama_cpp.llama_cpp), without running the
    package's __init__, which also imports its high-level Llama class and with it jinja2 and more
    (measured: 4-5 MB and 50-130 ms of a cold start). A later `import llama_cpp` (a test, a script)
    runs that __init__, which reuses these bindings."""
    if "llama_cpp" not in sys.modules:
        sys.modules["llama_cpp"] = importlib.util.module_from_spec(importlib.util.find_spec("llama_cpp"))
        try:
            return importlib.import_module("llama_cpp.llama_cpp")
        finally:
            del sys.modules["llama_cpp"]
    return importlib.import_module("llama_cpp.llama_cpp")


L = _bindings()


GGML_LOG_LEVEL_ERROR = 4  # ggml.h's enum ggml_log_level
SCORE_CHUNK = 64  # positions a prompt is scored in at a time (LlamaModel.score): 12.9 MB of logits at 50,257 tokens


class LlamaError(Exception):
    pass


_errors = []  # llama.cpp's last error lines, to say why a load failed


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _log(level, text, user_data):
    if level == GGML_LOG_LEVEL_ERROR:  # the rest (tensor lists, timings) is noise in a server log
        _errors[:] = _errors[-4:] + [text.decode("utf-8", "replace").strip()]


class LlamaModel:
    """A GGUF model, and a context for up to `n_seqs` sequences of up to `n_ctx` positions each;
    with n_ctx None, the model's vocabulary alone (for tokenize and piece)."""

    def __init__(self, path, n_ctx, n_seqs, threads):
        self.n_vocab = 0
        self.model = self.ctx = None
        L.llama_log_set(_log, None)
        L.llama_backend_init()
        _errors.clear()
        params = L.llama_model_default_params()
        params.vocab_only = n_ctx is None
        self.model = L.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise LlamaError(f"llama.cpp cannot load {path}: {' '.join(_errors) or 'unknown error'}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.end_token = L.llama_vocab_eos(self.vocab)  # finetune/gguf_export.py: <|endoftext|>
        if n_ctx is None:
            return
        params = L.llama_context_default_params()
        params.n_ctx = params.n_batch = n_ctx  # a whole prompt in one llama_decode
        params.n_seq_max = n_seqs
        params.kv_unified = True  # one cache for all sequences: the shared prompt is stored once
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise LlamaError(f"llama.cpp cannot make a context for {path}: {' '.join(_errors) or 'out of memory?'}")
        self.memory = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(n_ctx, 0, 1)
        self.scores = None  # made at the first request for log-probabilities

    def _decode(self, tokens, positions, seqs, outputs):
        """Run the model on a batch; the logits of the positions flagged in `outputs` stay in the
        context, for Sampler.sample and logits()."""
        batch = self.batch
        for i, (token, pos, seq, out) in enumerate(zip(tokens, positions, seqs, outputs)):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, out
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(tokens)
        code = L.llama_decode(self.ctx, batch)
        if code != 0:
            raise LlamaError(f"llama_decode failed ({code}): {' '.join(_errors)}")

    def logits(self, rows):
        """The last decode's logits for its first `rows` outputs: float32 bytes, [rows, n_vocab] row
        by row (numpy.frombuffer reads them; the server itself only checks they are finite)."""
        return ctypes.string_at(L.llama_get_logits(self.ctx), 4 * rows * self.n_vocab)

    def prompt(self, ids, all_logits=False):
        """Start afresh with `ids` in sequence 0, computing the logits of its last position (output
        -1), or of every position."""
        n = len(ids)
        L.llama_memory_clear(self.memory, False)
        self._decode(ids, range(n), [0] * n, [all_logits] * (n - 1) + [True])

    def score(self, ids, read, stopped):
        """prompt(ids), with every position's logits: decoded SCORE_CHUNK positions at a time, and
        read(i, output) called for position i (its logits are `output` of the last decode: see
        `logprobs`) before the next chunk, so that no
        more than SCORE_CHUNK rows are held at once (the context's output buffer grows to the most
        outputs one decode asked for: a whole 1,024-token prompt's would be 206 MB at GPT-2's vocabulary).
        Between chunks, stopped() true ends it: False is returned."""
        L.llama_memory_clear(self.memory, False)
        for start in range(0, len(ids), SCORE_CHUNK):
            if start and stopped():
                return False
            chunk = ids[start:start + SCORE_CHUNK]
            self._decode(chunk, range(start, start + len(chunk)), [0] * len(chunk), [True] * len(chunk))
            for j in range(len(chunk)):
                read(start + j, j)
        return True

    def logprobs(self, output, token, k):
        """(log-probability of `token`, [(id, log-probability)] of the k likeliest tokens, likeliest first)
        under the log-softmax of output `output`'s raw logits (-1: the last of the last decode). See Scores."""
        if self.scores is None:
            self.scores = Scores(self.n_vocab)
        return self.scores(L.llama_get_logits_ith(self.ctx, output), token, k)

    def fork(self, n_seqs):
        """Sequences 1..n_seqs-1 continue from sequence 0's prompt (shared cache cells, no copy)."""
        for seq in range(1, n_seqs):
            L.llama_memory_seq_cp(self.memory, 0, seq, -1, -1)

    def step(self, tokens, pos):
        """Token i goes to sequence i at position `pos`; its next logits are output i."""
        n = len(tokens)
        self._decode(tokens, [pos] * n, range(n), [True] * n)

    def tokenize(self, text, special=False):
        """GPT-2's byte-level BPE of `text` with the model's vocabulary, none added: by default no
        special tokens (an "<|endoftext|>" in the text is ordinary pieces); with `special`, an
        "<|endoftext|>" is the end token, as Hugging Face's tokenizers read it."""
        data = text.encode("utf-8")
        ids = (L.llama_token * (len(data) + 1))()  # a token is at least one byte
        n = L.llama_tokenize(self.vocab, data, len(data), ids, len(ids), False, special)
        if n < 0:
            raise LlamaError(f"llama_tokenize failed ({n})")
        return ids[:n]

    def piece(self, token):
        """The bytes token id `token` stands for ("<|endoftext|>" for the end token). A buffer per call:
        the request being read and the one generating may both ask."""
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        if n < 0:  # a longer piece than the buffer: -n is its length
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[:n]

    def sample(self, sampler, output):
        """A token drawn by `sampler` from the logits of output `output` (-1: the last) of the last
        decode."""
        return L.llama_sampler_sample(sampler.chain, self.ctx, output)

    def __del__(self):
        if getattr(self, "ctx", None):
            L.llama_batch_free(self.batch)
            L.llama_free(self.ctx)
        if getattr(self, "model", None):
            L.llama_model_free(self.model)


BAN = -1e30  # a banned token's logit bias: exp() of it is 0, and it stays finite (no NaN when all are banned)


class Scores:
    """Log-probabilities of one position's logits, computed by llama.cpp's own samplers (no NumPy):
    its `dist` sampler turns the logits into probabilities (softmax, float32), then `top_k` brings the
    k likeliest first. log-sum-exp = the likeliest's logit - log(its probability), which is never
    small (at least 1/n_vocab, so float32 keeps it to ~1e-7), and each log-probability is a logit minus
    that, in double precision. The logits are copied into the samplers' token array with two strided
    copies, never through Python floats: 9 times faster than log-softmax in plain Python (measured:
    2.4 against 21 ms a position at GPT-2's vocabulary, on a busy 2-core machine)."""

    def __init__(self, n_vocab):
        self.n = n_vocab
        self.data = (L.llama_token_data * n_vocab)()  # {id: int32, logit: float, p: float}
        raw = memoryview(self.data).cast("B")
        self.ids_view, self.floats_view = raw.cast("i"), raw.cast("f")
        self.ids = array.array("i", range(n_vocab))
        self.softmax = L.llama_sampler_init_dist(0)  # its draw is not used
        self.top = {}

    def __call__(self, logits, token, k):
        n = self.n
        self.ids_view[0::3] = self.ids  # the samplers reorder the array: ids afresh each time
        self.floats_view[1::3] = memoryview((ctypes.c_float * n).from_address(
            ctypes.addressof(logits.contents))).cast("B").cast("f")
        chosen = self.floats_view[3 * token + 1]
        candidates = L.llama_token_data_array(data=self.data, size=n, selected=-1, sorted=False)
        L.llama_sampler_apply(self.softmax, ctypes.byref(candidates))
        top = self.top.get(k) or self.top.setdefault(k, L.llama_sampler_init_top_k(max(k, 1)))
        L.llama_sampler_apply(top, ctypes.byref(candidates))
        first = candidates.data[0]
        total = first.logit - math.log(first.p)
        return chosen - total, [(candidates.data[j].id, candidates.data[j].logit - total) for j in range(k)]

    def __del__(self):
        for sampler in [getattr(self, "softmax", None), *getattr(self, "top", {}).values()]:
            if sampler:
                L.llama_sampler_free(sampler)


class Sampler:
    """llama.cpp's sampler chain: logits / temperature, then top_k (if > 0) and top_p (if > 0), then
    a draw from the softmax of what is left with a generator (std::mt19937) of its own, seeded.

    The steering controls (app/steering.py), each in the chain only when asked for: first llama.cpp's
    logit bias (`logit_bias`: {token: bias}), then `steps`, Python's changes to the logits at each step
    (an object with accept(token), and apply(logits) which reads and sets logits[token]), both before
    the temperature; llama.cpp's min_p (`min_p`) after top_p. Every drawn token is accepted into the
    chain (llama_sampler_sample does it); `accept` adds others (the prompt's)."""

    def __init__(self, temperature, top_k, top_p, seed, *, n_vocab=0, min_p=0.0, logit_bias=None, steps=None):
        assert 0 <= seed < L.LLAMA_DEFAULT_SEED, seed  # LLAMA_DEFAULT_SEED would mean "a random seed"
        params = L.llama_sampler_chain_default_params()
        params.no_perf = True
        self.chain = L.llama_sampler_chain_init(params)
        if logit_bias:
            entries = (L.llama_logit_bias * len(logit_bias))(*logit_bias.items())
            self._add(L.llama_sampler_init_logit_bias(n_vocab, len(entries), entries))
        if steps is not None:
            self._add(self._python_sampler(steps))
        self._add(L.llama_sampler_init_temp(temperature))
        if top_k > 0:
            self._add(L.llama_sampler_init_top_k(top_k))
        if top_p > 0:
            self._add(L.llama_sampler_init_top_p(top_p, 1))
        if min_p > 0:
            self._add(L.llama_sampler_init_min_p(min_p, 1))
        self._add(L.llama_sampler_init_dist(seed))

    def _add(self, sampler):
        L.llama_sampler_chain_add(self.chain, sampler)

    def _python_sampler(self, steps):
        """A sampler whose accept and apply are Python's `steps`."""

        def accept(smpl, token):
            steps.accept(token)

        def apply(smpl, candidates):
            steps.apply(Logits(candidates.contents))

        self._callbacks = (L.llama_sampler_i_accept(accept), L.llama_sampler_i_apply(apply))
        self._interface = L.llama_sampler_i(accept=self._callbacks[0], apply=self._callbacks[1])
        return L.llama_sampler_init(ctypes.byref(self._interface), None)

    def accept(self, tokens):
        for token in tokens:
            L.llama_sampler_accept(self.chain, token)

    def __del__(self):
        if getattr(self, "chain", None):
            L.llama_sampler_free(self.chain)


class Logits:
    """The candidates' logits by token id, read (`get`) and set (`set`) in place, several at a time (a
    step's Python work is a few dozen tokens: one call each way). Early in the chain (before any sampler
    that sorts or cuts) the candidates are the whole vocabulary in id order (llama_sampler_sample makes
    them so): token t's logit is entry t's, read through a float view of the array (llama_token_data is
    {id, logit, p})."""

    def __init__(self, array):
        self.floats = ctypes.cast(array.data, ctypes.POINTER(ctypes.c_float))
        last = array.size - 1
        self.index = None if array.data[last].id == last else {array.data[i].id: i for i in range(array.size)}

    def _at(self, tokens):
        return [3 * t + 1 for t in tokens] if self.index is None else [3 * self.index[t] + 1 for t in tokens]

    def get(self, tokens):
        floats = self.floats
        return [floats[i] for i in self._at(tokens)]

    def set(self, tokens, logits):
        floats = self.floats
        for i, logit in zip(self._at(tokens), logits):
            floats[i] = logit
