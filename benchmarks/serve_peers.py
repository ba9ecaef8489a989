"""The transformers side of ``benchmarks/serve.py``: SmolLM2-135M (transformers' own GGUF loading, f32,
greedy, EOS off) served two ways, in one worker subprocess (2 torch threads).

- **continuous batching**: ``model.continuous_batching_context_manager`` — the manager behind
  ``model.generate_batch`` — with ``attn_implementation="paged|sdpa"`` requested at load. ``generate_batch``
  takes one ``max_new_tokens`` for all its inputs; the manager's ``add_request(ids, max_new_tokens=n)`` is the
  same machinery with each request's own output length, so no peer decodes tokens nobody asked for. The
  batching config is sized to the concurrency C: ``max_requests_per_batch=C``, ``max_batch_tokens`` = our
  per-step token budget, ``page_size`` 64 and ``num_blocks = C * ceil(max_len / 64)`` (every slot can hold
  a full sequence), prefix sharing off (prompts share nothing). Timed from the first ``add_request`` (the
  manager already started) to the last finished result.
- **static**: ``model.generate`` over the requests in order, in batches of C, left-padded with an attention
  mask, ``max_new_tokens`` = the batch's longest output; only each request's own first n tokens count.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

PAGE_SIZE = 64


def _gen_config(max_new_tokens: int):
    from transformers import GenerationConfig
    # eos_token_id=None plus min_length unset: nothing ends a row before max_new_tokens (EOS off).
    return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0,
                            bos_token_id=None)


class TransformersWorker:
    """Ops called by ``benchmarks.serve.Worker`` (each returns a JSON-able dict)."""

    def setup(self) -> dict:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        from benchmarks.common import set_torch_threads
        from readme_jax.assets import smollm2_gguf
        set_torch_threads()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        torch.set_grad_enabled(False)
        p = Path(smollm2_gguf())
        t0 = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32,
                                                          attn_implementation="paged|sdpa").eval()
        import transformers
        return {"load_s": time.perf_counter() - t0, "torch_threads": torch.get_num_threads(),
                "transformers": transformers.__version__, "torch": torch.__version__,
                "attn_implementation_loaded": self.model.config._attn_implementation}

    # ------------------------------------------------------------------------------ continuous batching
    def cb_config(self, slots: int, budget: int, max_len: int):
        from transformers import ContinuousBatchingConfig
        return ContinuousBatchingConfig(max_requests_per_batch=slots, max_batch_tokens=budget, page_size=PAGE_SIZE,
                                        num_blocks=slots * math.ceil(max_len / PAGE_SIZE),
                                        allow_block_sharing=False, use_async_batching=False, scheduler_type="fifo")

    def run_cb(self, requests: list, slots: int, budget: int, max_len: int) -> dict:
        """requests: [[prompt ids], max_tokens] -> tokens per request, wall seconds, the batching config."""
        import torch
        cb = self.cb_config(slots, budget, max_len)
        gen = _gen_config(max(n for _, n in requests))
        t_init = time.perf_counter()
        with torch.inference_mode(), self.model.continuous_batching_context_manager(
                generation_config=gen, continuous_batching_config=cb, block=True, timeout=60) as manager:
            attn = self.model.config._attn_implementation
            init_s = time.perf_counter() - t_init
            t0 = time.perf_counter()
            ids = [manager.add_request(list(p), max_new_tokens=n, eos_token_id=-1) for p, n in requests]
            results: dict = {}
            while len(results) < len(ids):
                r = manager.get_result(timeout=1)
                if r is not None and r.is_finished():
                    results[r.request_id] = r
                elif r is None and not manager.is_running():
                    raise RuntimeError(f"transformers' continuous batching thread stopped with "
                                       f"{len(ids) - len(results)} requests unfinished")
            wall = time.perf_counter() - t0
        errors = [results[i].error for i in ids if results[i].error]
        if errors:
            raise RuntimeError(f"transformers' continuous batching: {len(errors)} requests failed: {errors[0]}")
        tokens = [list(results[i].generated_tokens)[:n] for i, (_, n) in zip(ids, requests)]
        config = {k: getattr(cb, k) for k in ("max_requests_per_batch", "max_batch_tokens", "page_size",
                                              "num_blocks", "allow_block_sharing", "use_async_batching",
                                              "scheduler_type")}
        return {"wall_s": wall, "tokens": tokens, "init_s": init_s, "config": config, "attn_implementation": attn}

    # -------------------------------------------------------------------------------------------- static
    def run_static(self, requests: list, slots: int) -> dict:
        """Batches of ``slots`` requests in order, left-padded; each request keeps its own first n tokens."""
        import torch
        tokens, wall = [], 0.0
        for start in range(0, len(requests), slots):
            batch = requests[start:start + slots]
            width = max(len(p) for p, _ in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (p, _) in enumerate(batch):
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            longest = max(n for _, n in batch)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=_gen_config(longest))
            wall += time.perf_counter() - t0
            new = out[:, width:]
            if new.shape[1] != longest:
                raise RuntimeError(f"transformers generate returned {new.shape[1]} new tokens, asked for {longest}")
            tokens += [new[row, :n].tolist() for row, (_, n) in enumerate(batch)]
        return {"wall_s": wall, "tokens": tokens}
