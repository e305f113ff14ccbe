"""A gpt-2-simple checkpoint's tensors as one GGUF file for llama.cpp (architecture "gpt2").

F32, F16 and Q8_0 are written by the `gguf` package straight from the tensors (NumPy only: the
training image exports without llama.cpp). The K-quants, which the `gguf` package cannot make, come
from that F32 file through llama.cpp's own quantizer (llama_model_quantize, what `llama-quantize`
runs), which also picks llama.cpp's per-tensor mix (e.g. Q6_K for some tensors of Q4_K_M).

The vocabulary is the run's own (encoder.json + vocab.bpe) with GPT-2's pre-tokenizer declared;
the server tokenizes itself and hands llama.cpp token ids, but llama.cpp checks the vocabulary
when it loads the file.
"""
import ctypes
import json
import os

import numpy as np

END_OF_TEXT = "<|endoftext|>"
# --quant name -> llama.cpp file type (gguf.LlamaFileType values)
QUANTS = {"F32": 0, "F16": 1, "Q8_0": 7, "Q5_K_M": 17, "Q4_K_M": 15}
DEFAULT_QUANT = "Q8_0"
WRITTEN_DIRECTLY = ("F32", "F16", "Q8_0")

# gpt-2-simple's per-layer variables -> llama.cpp's GPT-2 tensor names.
LAYER_NAMES = {
    "ln_1/g": "attn_norm.weight", "ln_1/b": "attn_norm.bias",
    "attn/c_attn/w": "attn_qkv.weight", "attn/c_attn/b": "attn_qkv.bias",
    "attn/c_proj/w": "attn_output.weight", "attn/c_proj/b": "attn_output.bias",
    "ln_2/g": "ffn_norm.weight", "ln_2/b": "ffn_norm.bias",
    "mlp/c_fc/w": "ffn_up.weight", "mlp/c_fc/b": "ffn_up.bias",
    "mlp/c_proj/w": "ffn_down.weight", "mlp/c_proj/b": "ffn_down.bias",
}


def variable_shapes(hp):
    """Every variable gpt-2-simple's model() creates, with its shape."""
    c, v = hp["n_embd"], hp["n_vocab"]
    shapes = {"model/wte": [v, c], "model/wpe": [hp["n_ctx"], c], "model/ln_f/g": [c], "model/ln_f/b": [c]}
    for i in range(hp["n_layer"]):
        p = f"model/h{i}/"
        shapes.update({
            p + "ln_1/g": [c], p + "ln_1/b": [c], p + "ln_2/g": [c], p + "ln_2/b": [c],
            p + "attn/c_attn/w": [1, c, 3 * c], p + "attn/c_attn/b": [3 * c],
            p + "attn/c_proj/w": [1, c, c], p + "attn/c_proj/b": [c],
            p + "mlp/c_fc/w": [1, c, 4 * c], p + "mlp/c_fc/b": [4 * c],
            p + "mlp/c_proj/w": [1, 4 * c, c], p + "mlp/c_proj/b": [c],
        })
    return shapes


def gguf_tensors(tensors, hparams):
    """{gguf name: array} from {gpt-2-simple variable: array}. Conv1d weights [1, nx, nf] become
    [nf, nx]: ggml's matrix layout. The output head is wte itself (GPT-2 ties them)."""
    for name, shape in variable_shapes(hparams).items():
        if name not in tensors:
            raise ValueError(f"the checkpoint has no variable {name}: not a GPT-2 model")
        if list(tensors[name].shape) != shape:
            raise ValueError(f"{name} is {list(tensors[name].shape)} in the checkpoint, hparams.json makes it {shape}")
    n_layer = hparams["n_layer"]
    out = {"token_embd.weight": tensors["model/wte"], "position_embd.weight": tensors["model/wpe"],
           "output_norm.weight": tensors["model/ln_f/g"], "output_norm.bias": tensors["model/ln_f/b"]}
    for i in range(n_layer):
        for ours, theirs in LAYER_NAMES.items():
            value = tensors[f"model/h{i}/{ours}"]
            out[f"blk.{i}.{theirs}"] = np.ascontiguousarray(value[0].T) if value.ndim == 3 else value
    return out


def vocabulary(run_dir, n_vocab):
    """Token texts by id (padded to n_vocab), their types and the merges, from the run's files."""
    import gguf

    with open(os.path.join(run_dir, "encoder.json"), encoding="utf-8") as f:
        encoder = json.load(f)
    with open(os.path.join(run_dir, "vocab.bpe"), encoding="utf-8") as f:
        merges = [line for line in f.read().split("\n")[1:-1] if line]  # gpt-2-simple's parsing
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for piece, i in encoder.items():
        if not 0 <= i < n_vocab:
            raise ValueError(f"encoder.json has id {i} for {piece!r}, outside the model's {n_vocab} tokens")
        tokens[i] = piece
        types[i] = gguf.TokenType.CONTROL if piece == END_OF_TEXT else gguf.TokenType.NORMAL
    if END_OF_TEXT not in encoder:
        raise ValueError(f"encoder.json has no {END_OF_TEXT} token")
    return tokens, types, merges, encoder[END_OF_TEXT]


def write_gguf(path, tensors, hparams, run_dir, quant=DEFAULT_QUANT, name="gpt2"):
    """Write the GGUF file `path` (a new file: callers write into a fresh folder, then rename it)."""
    if quant in WRITTEN_DIRECTLY:
        _write(path, tensors, hparams, run_dir, quant, name)
        return
    f32 = path + ".f32"
    try:
        _write(f32, tensors, hparams, run_dir, "F32", name)
        quantize(f32, path, QUANTS[quant])
    finally:
        if os.path.exists(f32):
            os.unlink(f32)


def _write(path, tensors, hparams, run_dir, quant, name):
    import gguf

    c, n_layer = hparams["n_embd"], hparams["n_layer"]
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_name(name)
    writer.add_context_length(hparams["n_ctx"])
    writer.add_embedding_length(c)
    writer.add_feed_forward_length(4 * c)
    writer.add_block_count(n_layer)
    writer.add_head_count(hparams["n_head"])
    writer.add_layer_norm_eps(1e-5)  # gpt-2-simple's norm()
    writer.add_file_type(QUANTS[quant])
    tokens, types, merges, end = vocabulary(run_dir, hparams["n_vocab"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(end)
    writer.add_eos_token_id(end)
    for key, value in gguf_tensors(tensors, hparams).items():
        # 1-D tensors (norms, biases) stay F32, as in llama.cpp's own files; Q8_0 needs rows of
        # whole 32-value blocks (a row that is not stays F16).
        if quant == "Q8_0" and value.ndim == 2 and value.shape[1] % 32 == 0:
            writer.add_tensor(key, gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif quant != "F32" and value.ndim == 2:
            writer.add_tensor(key, value.astype(np.float16))
        else:
            writer.add_tensor(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _no_log(level, text, user_data):
    pass


def quantize(src, dst, ftype):
    """llama.cpp's quantizer: src (an F32 GGUF) -> dst at file type `ftype`."""
    import llama_cpp

    llama_cpp.llama_log_set(_no_log, None)  # it reports every tensor on stderr
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = len(os.sched_getaffinity(0))
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise ValueError(f"llama.cpp could not quantize {src}")
