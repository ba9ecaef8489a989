"""Calibration size and mask stability (``ablate_calib``): how many calibration sequences the masks need.

For each size n of ``ablate_calib.calib_seqs`` (sequences of extract.calib_seq_len per domain, the first n of
each domain's train split, as stage 'stats' takes them), the statistics of the two disjoint halves (first and
second n / 2) are computed separately; their token-weighted mean is the size-n statistic. Reported per n:

* stability: the Jaccard overlap |A & B| / |A | B| of the domain masks cut from the two halves (mean over
  domains and layers; 1 = the halves agree on every kept channel);
* agreement with the parent's masks (the run's own extract.calib_seqs);
* quality with the router out of the way: held-out perplexity of the untuned MoE extracted by the size-n masks,
  every token sent to its own domain's expert (oracle routing; no tuning, so differences are the masks' alone).

    python -m readme_jax.science ablate_calib --run-dir runs/default
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from readme_jax.science.folder import Experiment, markdown_table
from readme_jax.science.plots import grouped_bars
from readme_jax.science.settings import EXPERIMENTS
from readme_jax.train.run import say
from readme_jax.errors import PipelineError


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Jaccard overlap of boolean masks along the last axis: <bool>[..., F] x2 -> float[...]."""
    inter = np.logical_and(a, b).sum(-1)
    union = np.logical_or(a, b).sum(-1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _half_scores(run, n: int, half: int, progress: bool) -> np.ndarray:
    from readme_jax.data.pipeline import PackedSequence, domain_tokens, num_sequences
    from readme_jax.extract.stats import domain_scores
    e = run.cfg.extract
    lo, hi = (0, n // 2) if half == 0 else (n // 2, n)
    batches = {}
    for d in run.corpus.domains:
        tokens = domain_tokens(run.corpus, d, "train", run.tokenizer)
        if num_sequences(len(tokens), e.calib_seq_len) < n:
            raise PipelineError(f"ablate_calib: domain {d!r} has fewer than {n} train sequences of {e.calib_seq_len}")
        pack = PackedSequence(tokens, e.calib_seq_len, run.tokenizer.bos_id)
        seqs = [pack(i) for i in range(lo, hi)]
        batches[d] = [{k: np.stack([s[k] for s in seqs[i:i + e.calib_batch]]) for k in ("input_ids", "loss_mask")}
                      for i in range(0, len(seqs), e.calib_batch)]
    return domain_scores(run.dense, batches, progress=progress)[1]


@dataclasses.dataclass(frozen=True)
class AblateCalibSettings:
    calib_seqs: tuple[int, ...] = (16, 64)     # calibration sequences per domain; each is split in two halves


@EXPERIMENTS.register("ablate_calib", AblateCalibSettings)
def ablate_calib(parent, settings, *, progress: bool = True) -> dict:
    from readme_jax.eval.perplexity import heldout_windows
    from readme_jax.extract.experts import readme_from_dense
    from readme_jax.extract.masks import build_masks
    from readme_jax.science.bounds import oracle_ppl
    run = parent
    ev, keep = run.cfg.eval, run.cfg.extract.keep_ratio
    domains = list(run.corpus.domains)
    sizes = [int(n) for n in settings.calib_seqs]
    if any(n < 2 or n % 2 for n in sizes):
        raise ValueError(f"ablate_calib.calib_seqs={sizes}: each must be an even number >= 2 (two halves)")
    with Experiment(run, "ablate_calib", {"calib_seqs": sizes}) as ex:
        windows = {d: heldout_windows(run.corpus, d, run.tokenizer, seq_len=ev.seq_len, max_tokens=ev.max_tokens)
                   for d in domains}
        parent_masks = run.masks.domain
        res = {}
        for n in sizes:
            def measure(n=n):
                halves = [np.asarray(ex.part(f"scores_n{n}_half{h}",
                                             lambda h=h: _half_scores(run, n, h, progress).tolist()))
                          for h in (0, 1)]
                mA, mB = (build_masks(s, keep, domains=domains).domain for s in halves)
                masks = build_masks((halves[0] + halves[1]) / 2, keep, domains=domains)
                model = readme_from_dense(run.dense, masks, run.router_config(), rngs=nnx.Rngs(run.cfg.train.seed))
                ppl = oracle_ppl(model, windows, ev.batch)
                return {"stability_jaccard": float(jaccard(mA, mB).mean()),
                        "stability_per_domain": jaccard(mA, mB).mean(-1).tolist(),
                        "jaccard_vs_parent_masks": float(jaccard(masks.domain, parent_masks).mean()),
                        "oracle_ppl_untuned": ppl}
            say(f"[ablate_calib] {n} sequences per domain")
            res[n] = ex.part(f"n{n}", measure)
        rows = [[f"{n} x {run.cfg.extract.calib_seq_len}", res[n]["stability_jaccard"], res[n]["jaccard_vs_parent_masks"],
                 *[res[n]["oracle_ppl_untuned"][d] for d in domains]] for n in sizes]
        table = markdown_table(["calibration per domain", "mask stability (Jaccard of halves)",
                                f"Jaccard vs the run's masks ({run.cfg.extract.calib_seqs})",
                                *[f"{d} ppl (oracle, untuned)" for d in domains]], rows)
        grouped_bars({f"n={n}": res[n]["oracle_ppl_untuned"] for n in sizes}, ex.path("ppl.png"),
                     title="untuned MoE, oracle domain routing, by calibration size", ylabel="perplexity", log=True)
        result = {"sizes": {str(n): res[n] for n in sizes}}
        ex.finish(result, table)
        return result
