"""llama.cpp's engine alone on a GGUF file, through llama-cpp-python's own `Llama` class: the peer a
user would pick instead of our server (no HTTP, no tokenizer of ours, llama.cpp's sampler).

    python bench/llama_alone.py MODEL.gguf PLAN_JSON

PLAN_JSON: {"threads": 1, "prefix": "...", "first_length": 20, "warm": [[length, seed], ...]}.
Prints one JSON line per event on stdout: first_answer (t: wall clock when the first answer's tokens
were done, memory), warm (length, tokens, seconds), done (memory). Sampling matches our server's
default: temperature 0.7 over the whole vocabulary (no top-k, top-p or min-p), and the end token does
not stop it, so every run computes exactly `length` tokens.
"""
import json
import sys
import time

from baseline import memory_mb


def emit(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


def generate(llm, prompt, length, seed):
    llm.set_seed(seed)
    started = time.perf_counter()
    tokens = 0
    for _ in llm.generate(prompt, temp=0.7, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        tokens += 1
        if tokens == length:
            break
    return tokens, time.perf_counter() - started


def main():
    path, plan = sys.argv[1], json.loads(sys.argv[2])
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=1024, n_threads=plan["threads"], n_threads_batch=plan["threads"],
                verbose=False)
    prompt = llm.tokenize(plan["prefix"].encode(), add_bos=False)
    generate(llm, prompt, plan["first_length"], 0)
    emit("first_answer", t=time.time(), memory=memory_mb())
    for length, seed in plan.get("warm", []):
        tokens, seconds = generate(llm, prompt, length, seed)
        emit("warm", length=length, tokens=tokens, seconds=seconds)
    emit("done", memory=memory_mb())


if __name__ == "__main__":
    main()
