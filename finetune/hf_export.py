"""A run's checkpoint as a Hugging Face GPT-2 folder: `python -m finetune.export RUN --format hf`.

RUN/hf/ is what transformers' GPT2LMHeadModel and AutoTokenizer load, and through them MLServer's
HuggingFace runtime, Triton's Python backend, vLLM and the Hub (docs/huggingface.md):
- config.json: GPT-2 with the run's hparams; `<|endoftext|>` is bos and eos.
- model.safetensors: the checkpoint's float32 tensors under Hugging Face's names. gpt-2-simple's
  conv1d weights [1, nx, nf] are Hugging Face's Conv1D weights [nx, nf] as they are; the output
  layer is the token embedding (tied), so it is not stored.
- vocab.json and merges.txt (the run's encoder.json and vocab.bpe, the merges as gpt-2-simple reads
  them), tokenizer.json (the same BPE for the fast tokenizer) and tokenizer_config.json.
  `<|endoftext|>` written in a text stays ordinary pieces (split_special_tokens), as gpt-2-simple's
  encoder made the training ids and as the server encodes; the id itself is still bos/eos.
- generation_config.json: the server's sampling defaults (app/params.py).
- README.md: the model card (base model, steps, held-out loss, memorization, corpus, rights).
Written into a new hidden folder and renamed into place when complete, as the GGUF export is: a
failed export leaves no hf/ or the previous one as it was.

Imports numpy, tensorflow (through finetune.export), safetensors and tokenizers; not transformers.
"""
import json
import os
import shutil
import tempfile

from finetune.export import ExportError, locate, read_tensors
from finetune.files import replace_dir
from finetune.gguf_export import END_OF_TEXT, variable_shapes

FOLDER = "hf"
START_OF_TEXT = "<|startoftext|>"
# gpt-2-simple's per-layer variables -> Hugging Face's GPT2Model names (under transformer.h.N.)
LAYER_NAMES = {
    "ln_1/g": "ln_1.weight", "ln_1/b": "ln_1.bias", "ln_2/g": "ln_2.weight", "ln_2/b": "ln_2.bias",
    "attn/c_attn/w": "attn.c_attn.weight", "attn/c_attn/b": "attn.c_attn.bias",
    "attn/c_proj/w": "attn.c_proj.weight", "attn/c_proj/b": "attn.c_proj.bias",
    "mlp/c_fc/w": "mlp.c_fc.weight", "mlp/c_fc/b": "mlp.c_fc.bias",
    "mlp/c_proj/w": "mlp.c_proj.weight", "mlp/c_proj/b": "mlp.c_proj.bias",
}
# OpenAI's releases on the Hub, by (n_layer, n_embd, n_head): what a run fine-tuned from one started from
HUB_NAMES = {"124M": "openai-community/gpt2", "355M": "openai-community/gpt2-medium",
             "774M": "openai-community/gpt2-large", "1558M": "openai-community/gpt2-xl"}


def hf_tensors(tensors, hparams):
    """{Hugging Face name: array} from {gpt-2-simple variable: array}, checked against hparams.json."""
    for name, shape in variable_shapes(hparams).items():
        if name not in tensors:
            raise ExportError(f"the checkpoint has no variable {name}: not a GPT-2 model")
        if list(tensors[name].shape) != shape:
            raise ExportError(f"{name} is {list(tensors[name].shape)} in the checkpoint, hparams.json makes it {shape}")
    out = {"transformer.wte.weight": tensors["model/wte"], "transformer.wpe.weight": tensors["model/wpe"],
           "transformer.ln_f.weight": tensors["model/ln_f/g"], "transformer.ln_f.bias": tensors["model/ln_f/b"]}
    for i in range(hparams["n_layer"]):
        for ours, theirs in LAYER_NAMES.items():
            value = tensors[f"model/h{i}/{ours}"]
            out[f"transformer.h.{i}.{theirs}"] = value[0] if value.ndim == 3 else value
    return out


def read_tokenizer(run_dir, n_vocab):
    """(encoder, merges, id of <|endoftext|>) from the run's encoder.json and vocab.bpe."""
    files = {}
    for name in ("encoder.json", "vocab.bpe"):
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            raise ExportError(f"{path} is missing: the run's tokenizer is encoder.json and vocab.bpe")
        with open(path, encoding="utf-8") as f:
            files[name] = f.read()
    try:
        encoder = json.loads(files["encoder.json"])
    except ValueError as e:
        raise ExportError(f"{os.path.join(run_dir, 'encoder.json')} is not JSON: {e}") from None
    if not isinstance(encoder, dict) or END_OF_TEXT not in encoder:
        raise ExportError(f"{os.path.join(run_dir, 'encoder.json')} has no {END_OF_TEXT} token")
    outside = [piece for piece, i in encoder.items() if not (isinstance(i, int) and 0 <= i < n_vocab)]
    if outside:
        raise ExportError(f"encoder.json has id {encoder[outside[0]]!r} for {outside[0]!r}, outside the model's "
                          f"{n_vocab} tokens")
    merges = [line for line in files["vocab.bpe"].split("\n")[1:-1] if line]  # gpt-2-simple's parsing
    return encoder, merges, encoder[END_OF_TEXT]


def write_tokenizer(folder, encoder, merges, n_ctx):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(encoder, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(merge + "\n" for merge in merges))
    try:
        model = models.BPE(vocab=encoder, merges=[tuple(merge.split(" ", 1)) for merge in merges])
    except Exception as e:  # a merge whose pieces are not in encoder.json
        raise ExportError(f"vocab.bpe does not fit encoder.json: {e}") from None
    # GPT-2's tokenizer as Hugging Face writes it: the split regex, bytes as printable characters,
    # no prefix space, and <|endoftext|> the one special token.
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(END_OF_TEXT, special=True, normalized=False)])
    # Merges as "a b" strings, the form every tokenizers release reads (0.20 and later write pairs, which
    # the 0.19 that MLServer's HuggingFace runtime needs cannot read); byte-level pieces hold no space.
    data = json.loads(tokenizer.to_str())
    data["model"]["merges"] = [" ".join(pair) if isinstance(pair, list) else pair for pair in data["model"]["merges"]]
    write_json(os.path.join(folder, "tokenizer.json"), data)
    end = encoder[END_OF_TEXT]
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": n_ctx,
        "bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT,
        "add_prefix_space": False,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,  # decode gives the text back as it was
        "split_special_tokens": True,  # "<|endoftext|>" in a text is pieces, as in training
        "errors": "replace",
        "added_tokens_decoder": {str(end): {"content": END_OF_TEXT, "lstrip": False, "normalized": False,
                                            "rstrip": False, "single_word": False, "special": True}},
    }
    write_json(os.path.join(folder, "tokenizer_config.json"), config)
    write_json(os.path.join(folder, "special_tokens_map.json"),
               {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT})


def model_config(hparams, end):
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": hparams["n_vocab"],
        "n_positions": hparams["n_ctx"],
        "n_ctx": hparams["n_ctx"],
        "n_embd": hparams["n_embd"],
        "n_head": hparams["n_head"],
        "n_layer": hparams["n_layer"],
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # gpt-2-simple's gelu: the tanh approximation
        "layer_norm_epsilon": 1e-5,
        "bos_token_id": end,
        "eos_token_id": end,
        "tie_word_embeddings": True,
    }


def generation_config(hparams, end):
    """The server's defaults (app/params.py), in transformers' terms: its top_k 0 and top_p 0 mean
    off, which are top_k 0 and top_p 1.0 there; `length` is new tokens."""
    from app.params import parameters

    defaults = {name: spec.default for name, spec in parameters(hparams["n_ctx"], hparams["n_vocab"]).items()}
    return {
        "do_sample": True,
        "temperature": defaults["temperature"],
        "top_k": defaults["top_k"],
        "top_p": defaults["top_p"] or 1.0,
        "max_new_tokens": defaults["length"],
        "bos_token_id": end,
        "eos_token_id": end,
        "pad_token_id": end,  # GPT-2 has no padding token; batches pad with the end token
    }


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


def base_model(hparams):
    """(Hub name or None, words) for the card. The run folder does not name its base model, so a
    release's exact shape (and its 50,257 tokens and 1,024 context) is taken to be that release."""
    from finetune.fit import RELEASES

    shape = (hparams["n_layer"], hparams["n_embd"], hparams["n_head"])
    for size, release in RELEASES.items():
        if release == shape and hparams["n_vocab"] == 50257 and hparams["n_ctx"] == 1024:
            return HUB_NAMES[size], (f"OpenAI's GPT-2 {size} ([{HUB_NAMES[size]}](https://huggingface.co/"
                                     f"{HUB_NAMES[size]})), judged by its shape")
    return None, "none: trained from scratch (`python -m finetune --from-scratch`), with its own tokenizer"


def corpus_lines(run_dir):
    """What the card says of the corpus: RUN/corpus.json's record of data.extract's query, else unknown."""
    record = read_json(os.path.join(run_dir, "corpus.json")) or {}
    source = record.get("source") if isinstance(record, dict) else None
    lines = []
    if isinstance(source, dict) and source:
        shown = {k: v for k, v in source.items() if v not in (None, [], "")}
        lines.append("Extracted with `python -m data.extract` (the query, as it recorded it): "
                     + ", ".join(f"{k} `{json.dumps(v, ensure_ascii=False)}`" for k, v in shown.items()) + ".")
    else:
        lines.append("Unknown: the run has no record of the query that made its corpus"
                     + (f" (the corpus file was `{record['dataset']}`)." if record.get("dataset") else "."))
    if record.get("text_format") == "delimited":
        lines.append(f"Each training text was `{START_OF_TEXT}`...`{END_OF_TEXT}` (written out as text): start a "
                     f"prompt with `{START_OF_TEXT}` for a whole text, and cut the output at `{END_OF_TEXT}`.")
    return lines


def model_card(run_dir, name, step, val_loss, reason, hparams, generation):
    hub_name, base = base_model(hparams)
    best = read_json(os.path.join(run_dir, "best.json")) or {}
    report = read_json(os.path.join(run_dir, "report.json")) or {}
    counter = read_json(os.path.join(run_dir, "counter"))  # a plain number
    trained = counter if isinstance(counter, int) else step
    n_params = sum(_size(shape) for shape in variable_shapes(hparams).values())

    if best.get("val_loss") is not None:
        loss = f"{best['val_loss']:.4f} at the best checkpoint ({best.get('checkpoint')}, step {best.get('step')})"
        if best.get("checkpoint") != name:
            loss += f"; {val_loss:.4f} at {name}" if val_loss is not None else f"; not measured at {name}"
    else:
        loss = "not measured (fewer than 200 texts, or the run predates validation)"
    share = report.get("share_of_samples_with_copied_span")
    if share is not None:
        settings = report.get("settings") or {}
        memorized = f"{report.get('summary')} (share {share:.2f}"
        memorized += f"; measured on {settings.get('checkpoint')})" if settings.get("checkpoint") != name else ")"
        if report.get("warning"):
            memorized += f". Warning: {report['warning']}"
    else:
        memorized = "not measured (no report.json: `python -m finetune.report RUN`)"
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [gpt2, gpt-2-simple]"]
    front += [f"base_model: {hub_name}"] if hub_name else []
    rows = [
        ("base model", base),
        ("shape", f"{hparams['n_layer']} layers, {hparams['n_embd']} wide, {hparams['n_head']} heads, "
                  f"{hparams['n_vocab']:,} tokens, a context of {hparams['n_ctx']:,} tokens "
                  f"({n_params / 1e6:,.1f}M parameters, float32)"),
        ("checkpoint", f"{name}, step {step} of {trained} trained: {reason}"),
        ("held-out loss", loss),
        ("memorization", memorized),
    ]
    lines = front + ["---", "", f"# {os.path.basename(run_dir)}", "",
                     "A GPT-2 model trained with gpt-2-simple (`python -m finetune`) and exported from its "
                     "TensorFlow checkpoint with `python -m finetune.export RUN --format hf`.", "",
                     "| | |", "| --- | --- |"]
    lines += [f"| {key} | {value.replace('|', '/')} |" for key, value in rows]
    lines += ["", "## Corpus", "", *corpus_lines(run_dir), "",
              "## Rights", "",
              "Publish this model only if you have the right to publish a model trained on its corpus: a "
              "model can repeat its training text (see memorization above), and the texts' authors and the "
              "platform they came from (for Reddit, its terms for its content) keep their rights to them.", "",
              "## Use", "",
              "```python",
              "from transformers import pipeline",
              "generator = pipeline(\"text-generation\", model=\"PATH/TO/THIS/FOLDER\")",
              f"print(generator(\"{START_OF_TEXT}\")[0][\"generated_text\"])",
              "```", "",
              "generation_config.json holds the sampling defaults of the server it was trained for: "
              f"temperature {generation['temperature']}, top_k {generation['top_k']} and top_p "
              f"{generation['top_p']} (no cut), {generation['max_new_tokens']} new tokens. `{END_OF_TEXT}` "
              "typed in a prompt is encoded as ordinary text, as in training; its id is the end of a text "
              "(bos and eos).", ""]
    return "\n".join(lines)


def _size(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def export_hf(run_dir, which="best"):
    """Write run_dir/hf/ for the chosen checkpoint; return its path."""
    from safetensors.numpy import save_file

    run_dir = os.path.abspath(run_dir)
    name, step, val_loss, reason, hparams = locate(run_dir, which)
    encoder, merges, end = read_tokenizer(run_dir, hparams["n_vocab"])
    tensors = hf_tensors(read_tensors(os.path.join(run_dir, name)), hparams)

    out_dir = os.path.join(run_dir, FOLDER)
    tmp_dir = tempfile.mkdtemp(prefix=f".{FOLDER}.partial-", dir=run_dir)
    os.chmod(tmp_dir, 0o755)  # mkdtemp makes 0700; whoever serves it may be another user
    try:
        try:
            save_file(tensors, os.path.join(tmp_dir, "model.safetensors"), metadata={"format": "pt"})
            write_json(os.path.join(tmp_dir, "config.json"), model_config(hparams, end))
            generation = generation_config(hparams, end)
            write_json(os.path.join(tmp_dir, "generation_config.json"), generation)
            write_tokenizer(tmp_dir, encoder, merges, hparams["n_ctx"])
            with open(os.path.join(tmp_dir, "README.md"), "w", encoding="utf-8") as f:
                f.write(model_card(run_dir, name, step, val_loss, reason, hparams, generation))
            for entry in os.listdir(tmp_dir):  # safetensors makes its file 0600; readable by whoever serves it
                os.chmod(os.path.join(tmp_dir, entry), 0o644)
        except ExportError:
            raise
        except Exception as e:  # a full disk: OSError, or safetensors' own error type for its file
            raise ExportError(f"cannot write {out_dir}: {getattr(e, 'strerror', None) or e}") from None
        replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir
