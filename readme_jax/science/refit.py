"""Closed-form refit of the down-projections (``ablate_refit``): does ``extract.refit`` help, at which ridge,
tied or fused?

The refit (:mod:`readme_jax.extract.refit`) changes only the starting point of expert tuning, so it is
measured there, with the router out of the way: held-out perplexity of the untuned MoE extracted from the
parent run's masks, every token sent to its own domain's expert (oracle routing), without a refit and with one
per (form, ridge) of the settings. The Gram matrices come from one statistics pass over the parent's own
calibration sequences (stage 'stats' with ``extract.refit``), saved in the experiment folder.

    python -m readme_jax.science ablate_refit --run-dir runs/default

Writes ``<run>/science/ablate_refit/``: ``grams.npy`` [E, L, F, F], parts per row, ``result.json``,
``table.md`` and ``ppl.png``.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from flax import nnx

from readme_jax.atomic import atomic_file
from readme_jax.science.folder import Experiment, markdown_table
from readme_jax.science.plots import grouped_bars
from readme_jax.science.settings import EXPERIMENTS
from readme_jax.train.run import say


@dataclasses.dataclass(frozen=True)
class AblateRefitSettings:
    ridges: tuple[float, ...] = (0.01, 0.1, 1.0)     # extract.refit_ridge values tried
    forms: tuple[str, ...] = ("tied", "fused")       # train.experts forms refit (tied: rows fitted jointly)


def _grams(ex: Experiment, run, progress: bool) -> np.ndarray:
    from readme_jax.extract.stats import domain_statistics
    from readme_jax.train.stages import calibration_batches
    path = ex.path("grams.npy")
    if not path.is_file():
        say("[ablate_refit] Gram matrices of the calibration sequences")
        domains, _, grams = domain_statistics(run.dense, calibration_batches(run)[0], progress=progress, gram=True)
        if domains != list(run.masks.domains):
            raise ValueError(f"ablate_refit: statistics domains {domains} differ from the masks' "
                             f"{list(run.masks.domains)}")
        with atomic_file(path, suffix=".npy") as tmp:
            np.save(tmp, grams)
    return np.load(path, mmap_mode="r")


@EXPERIMENTS.register("ablate_refit", AblateRefitSettings)
def ablate_refit(parent, settings, *, progress: bool = True) -> dict:
    """Oracle-routed untuned held-out perplexity per domain, without and with each refit (AblateRefitSettings)."""
    from readme_jax.eval.perplexity import heldout_windows
    from readme_jax.extract.experts import readme_from_dense
    from readme_jax.extract.refit import apply_refit
    from readme_jax.science.bounds import oracle_ppl
    run = parent
    ev = run.cfg.eval
    domains = list(run.corpus.domains)
    ridges = [float(r) for r in settings.ridges]
    forms = list(settings.forms)
    if not ridges or any(not (np.isfinite(r) and r > 0) for r in ridges):
        raise ValueError(f"ablate_refit.ridges={ridges}: expected finite values > 0")
    if not forms or any(f not in ("tied", "fused") for f in forms):
        raise ValueError(f"ablate_refit.forms={forms}: expected a non-empty subset of ['tied', 'fused']")
    with Experiment(run, "ablate_refit", {"ridges": ridges, "forms": forms,
                                          "windows": [ev.seq_len, ev.max_tokens]}) as ex:
        windows = {d: heldout_windows(run.corpus, d, run.tokenizer, seq_len=ev.seq_len, max_tokens=ev.max_tokens)
                   for d in domains}

        def refit_ppl(form: str | None, ridge: float | None) -> dict[str, float]:
            model = readme_from_dense(run.dense, run.masks, run.router_config(),
                                      rngs=nnx.Rngs(run.cfg.train.seed), tied=form == "tied")
            if form is not None:
                apply_refit(model, np.asarray(run.dense.ffn.w_down[...]), _grams(ex, run, progress), run.masks,
                            ridge=ridge)
            return oracle_ppl(model.untied(), windows, ev.batch)

        rows = {"no refit": ex.part("none", lambda: refit_ppl(None, None))}
        for form in forms:
            for r in ridges:
                name = f"{form}, ridge {r:g}"
                say(f"[ablate_refit] {name}")
                rows[name] = ex.part(f"{form}_ridge{r:g}", lambda form=form, r=r: refit_ppl(form, r))
        dense = json.loads(run.eval_path("dense").read_text())["ppl"]
        body = [[name, *[ppl[d] for d in domains], float(np.exp(np.mean([np.log(ppl[d] / dense[d]["ppl"])
                                                                         for d in domains])))]
                for name, ppl in rows.items()]
        table = markdown_table(["down-projections", *[f"{d} ppl (oracle, untuned)" for d in domains],
                                "geo-mean ratio to the dense parent"], body)
        grouped_bars(rows, ex.path("ppl.png"), title="untuned MoE, oracle domain routing, by down-projection refit",
                     ylabel="perplexity", log=True)
        result = {"rows": rows, "dense": {d: dense[d]["ppl"] for d in domains}}
        ex.finish(result, table)
        return result
