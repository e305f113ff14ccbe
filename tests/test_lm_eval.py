"""lm-evaluation-harness (lm_eval[api] 0.4.13, its `local-completions` model, through its CLI) against
`python -m app` over real HTTP. Its tokenizer is ours, found through /tokenizer_info, /tokenize and
/detokenize (tokenizer_backend=remote: no Hugging Face tokenizer, HF_HUB_OFFLINE=1); the tasks are YAML
files written here over local JSON Lines data (datasets' own `json` loader: nothing is downloaded).

- loglikelihood_rolling on held-out texts: the byte perplexity equals a direct computation on the same
  export, with finetune.report's held-out loss code, within 0.1%;
- multiple_choice: each choice's log-likelihood, and so the accuracy, equal a direct computation from
  the model's logits (llama.cpp's, every position, in the test process);
- generate_until with five stop strings (and lm-eval's <|endoftext|>: six): every answer is the
  server's own greedy answer to the same token ids, cut at the first stop string.
"""
import json
import math
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest

from conftest import all_logits
from test_server import running_server

ROLLING = ["<|startoftext|>the cat likes the red ball and my dog hates a long walk.",
           "<|startoftext|>our team found some fresh bread.",
           "<|startoftext|>a small robot sees the weather, and the weather sees a small robot.",
           "<|startoftext|>this model made good code on a warm day in the quiet park.",
           "<|startoftext|>my dog wants the quiet park."]
CHOICES = [" the red ball.", " a warm day.", " good code.", " the quiet park."]
CONTEXTS = ["<|startoftext|>the cat likes", "<|startoftext|>my dog hates", "<|startoftext|>our team made",
            "<|startoftext|>a small robot sees", "<|startoftext|>the weather wants", "<|startoftext|>this model found"]
UNTIL = [".", " ball", " day", " code", " park"]

TASKS = {
    "tiny_rolling": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "tiny_choice": """
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
""",
    "tiny_generate": f"""
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: {json.dumps(UNTIL)}
  max_gen_toks: 16
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
""",
}


def write_tasks(folder):
    """The three tasks' YAML and data files in `folder` (lm-eval's --include_path)."""
    data = {"tiny_rolling": [{"text": t} for t in ROLLING],
            "tiny_choice": [{"context": c, "choices": CHOICES, "label": i % 4} for i, c in enumerate(CONTEXTS)],
            "tiny_generate": [{"context": c, "target": " the red"} for c in CONTEXTS]}
    for task, body in TASKS.items():
        path = folder / f"{task}.jsonl"
        path.write_text("".join(json.dumps(doc) + "\n" for doc in data[task]))
        (folder / f"{task}.yaml").write_text(f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                             f"    test: {path}\ntest_split: test\n{body}")


@pytest.fixture(scope="module")
def evaluation(tiny_run, tmp_path_factory):
    """lm-eval's results and its logged samples per task, and the server's URL while it runs."""
    from conftest import find_free_port

    tmp = tmp_path_factory.mktemp("lm_eval")
    tasks, out = tmp / "tasks", tmp / "out"
    tasks.mkdir()
    write_tasks(tasks)
    with running_server(tiny_run, find_free_port(), tmp / "server.log") as server:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp / "hf"),
               "TOKENIZERS_PARALLELISM": "false"}
        result = subprocess.run(
            [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args",
             f"model=run1,base_url={server.url}/v1/completions,tokenizer_backend=remote,max_length=1024",
             "--tasks", ",".join(TASKS), "--include_path", str(tasks), "--output_path", str(out),
             "--log_samples", "--seed", "1"], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        [results_file] = out.rglob("results_*.json")
        samples = {task: [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text()
                          .splitlines()] for task in TASKS}
        yield json.loads(results_file.read_text())["results"], samples, server


@pytest.fixture(scope="module")
def model(tiny_run):
    from app.engine import GPT2

    return GPT2(tiny_run)


def test_rolling_perplexity_equals_the_held_out_loss_of_the_same_texts(evaluation, model):
    from finetune.report import heldout_loss

    results, _, _ = evaluation
    end = model.tokenizer.end_token
    # lm-eval's windows: the end token, then the text's tokens (each text fits in one window)
    total = sum(-heldout_loss(model, [np.array([end] + ids)]) * len(ids)
                for ids in (model.tokenizer.encode(text) for text in ROLLING))
    direct = math.exp(-total / sum(len(text.encode()) for text in ROLLING))
    assert results["tiny_rolling"]["byte_perplexity,none"] == pytest.approx(direct, rel=1e-3)


def test_multiple_choice_accuracy_equals_a_direct_computation(evaluation, model):
    results, samples, _ = evaluation
    right = 0
    for doc in sorted(samples["tiny_choice"], key=lambda s: s["doc_id"]):
        context = model.tokenizer.encode(doc["doc"]["context"])
        scores = []
        for choice in CHOICES:  # as lm-eval splits them: the whole text's tokens past the context's
            ids = model.tokenizer.encode(doc["doc"]["context"] + choice)
            logits = all_logits(model.llama, ids).astype(np.float64)
            top = logits.max(axis=1, keepdims=True)
            log_softmax = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
            scores.append(sum(log_softmax[j - 1, ids[j]] for j in range(len(context), len(ids))))
        assert [float(r[0]) for r in doc["filtered_resps"]] == pytest.approx(scores, abs=1e-3)  # logged as text
        right += int(np.argmax(scores)) == doc["doc"]["label"]
    assert results["tiny_choice"]["acc,none"] == pytest.approx(right / len(CONTEXTS))


def test_generate_until_stops_at_the_first_of_its_stop_strings(evaluation, model):
    _, samples, server = evaluation
    stopped = 0
    for doc in samples["tiny_generate"]:
        [[text]] = doc["resps"]
        answer = httpx.post(server.url + "/v1/completions", timeout=60, json={
            "model": "run1", "prompt": [model.tokenizer.encode(doc["doc"]["context"])], "max_tokens": 16,
            "temperature": 0, "stop": UNTIL + ["<|endoftext|>"]}).json()["choices"][0]
        assert text == answer["text"] and not any(stop in text for stop in UNTIL)
        stopped += answer["finish_reason"] == "stop"
    assert stopped  # the stop strings did cut answers
