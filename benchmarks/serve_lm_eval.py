"""The serving benchmark's interop arm: lm-evaluation-harness scoring one local multiple-choice task through each
live server (ours and vLLM) with ``local-completions``, the model's own HF tokenizer on the client (so both
servers receive the same token ids), and the per-item choices and loglikelihoods compared between them.

    folder = write_task(out / "lm_eval", items, bos="")             # task YAML + JSONL, nothing downloaded
    ours = score(server.base, "smollm2", hf_dir, folder)            # [{"logliks": [C floats], "pred", "target"}]
    row = compare(ours, theirs)                                     # same choices, max |d loglik|, accuracies

Items: the built-in 4-way continuation task (``eval.mc_tasks.builtin_items``, real held-out text of the default
corpus) for the real model; a few word-phrase items for ``--quick`` (no corpus needed).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TASK = "readme_jax_mc"
#: lm-eval's task YAML over a local JSONL (``{data}``: its path); scored by loglikelihood, lm-eval's ``acc``.
MC_TASK = """task: readme_jax_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{text}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
"""


def phrase_items(n: int, seed: int = 2) -> list:
    """``n`` items of random word phrases (context 6 words, 3 choices of 1-3 words): the --quick task."""
    from readme_jax.eval.multiple_choice import MCItem
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone", "bird", "cloud", "fire"]

    def phrase(k):
        return " ".join(rng.choice(words, k))
    return [MCItem(phrase(6), tuple(" " + phrase(int(k)) for k in rng.integers(1, 4, 3)), int(rng.integers(3)), "g")
            for _ in range(n)]


def write_task(folder: Path, items, bos: str = "") -> Path:
    """The task YAML and its JSONL in ``folder`` (each context prefixed with ``bos``, the text of the BOS token
    when the client's tokens must equal ``eval.multiple_choice``'s, which starts every row with it)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps({"text": bos + it.context, "choices": list(it.choices), "answer": it.answer})
                            + "\n" for it in items))
    (folder / f"{TASK}.yaml").write_text(MC_TASK.format(data=data))
    return folder


def score(base: str, model: str, folder: Path, tokenizer: dict, *, batch_size: int = 8,
          max_length: int = 512) -> list[dict]:
    """lm-eval ``local-completions`` on the task in ``folder`` against ``base``/v1/completions; ``tokenizer``: its
    model_args for the client tokenizer (``{"tokenizer_backend": "remote"}`` or ``{"tokenizer_backend":
    "huggingface", "tokenizer": HF_DIR}``). Per item in task order: the choices' loglikelihoods, lm-eval's pick
    (their argmax) and the target."""
    import os

    import lm_eval
    from lm_eval.tasks import TaskManager
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=[TASK], task_manager=TaskManager(include_path=str(folder)),
        model_args={"model": model, "base_url": f"{base}/v1/completions", "num_concurrent": 1, "max_retries": 1,
                    "max_length": max_length, **tokenizer},
        batch_size=batch_size, log_samples=True, limit=None)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    result = []
    for s in samples:
        logliks = [float(ll) for ll, _ in s["filtered_resps"]]
        result.append({"logliks": logliks, "pred": int(np.argmax(logliks)), "target": int(s["target"])})
    return result


def compare(ours: list[dict], theirs: list[dict] | None) -> dict:
    """Accuracy of each, and (with ``theirs``) how many items pick the same choice and the largest loglikelihood
    difference."""
    acc = lambda rs: float(np.mean([r["pred"] == r["target"] for r in rs])) if rs else None  # noqa: E731
    out = {"items": len(ours), "acc_ours": acc(ours), "acc_vllm": acc(theirs) if theirs else None}
    if theirs:
        if len(theirs) != len(ours):
            raise ValueError(f"lm-eval scored {len(ours)} items on ours and {len(theirs)} on vLLM")
        out["same_choice"] = sum(a["pred"] == b["pred"] for a, b in zip(ours, theirs))
        out["max_abs_dloglik"] = max(abs(x - y) for a, b in zip(ours, theirs)
                                     for x, y in zip(a["logliks"], b["logliks"]))
    return out


def benchmark_items(items_per_domain: int | None, out: Path) -> list:
    """The serving benchmark's task: ``items_per_domain`` None gives 6 phrase items (--quick); else the built-in
    task on the default corpus (built once under ``out`` when no default run holds one), cut with SmolLM2's
    tokenizer."""
    if items_per_domain is None:
        return phrase_items(6)
    from benchmarks.serve import resolve_corpus
    from readme_jax import assets
    from readme_jax.data.tokenizers import tokenizer_from_gguf
    from readme_jax.eval.mc_tasks import builtin_items
    return builtin_items(resolve_corpus(None, out), tokenizer_from_gguf(assets.smollm2_gguf()),
                         items_per_domain=items_per_domain)
