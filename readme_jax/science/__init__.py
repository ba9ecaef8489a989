"""The paper's claims measured side by side on one finished default run (``python -m readme_jax.science``).

Every experiment reuses the parent run folder (its dense parent, corpus splits, masks, router pool, seeds and
token budgets) and writes ``<run>/science/<experiment>/`` (:mod:`readme_jax.science.folder`): a settings
record, resumable parts, ``result.json``, ``table.md`` and PNGs. Budgets: :mod:`readme_jax.science.settings`.

Experiments (each registered in ``EXPERIMENTS`` by one decorator, with its settings dataclass):

    dense_baseline  the equal-size dense model (FFN pruned to one expert's width, tuned the same)   (Table 5)
    layerwise       a layer-wise-router MoE on the same experts + its routing redundancy            (sec. 2.2)
    bounds          oracle / target / random routing vs the router; routing locality
    mc              multiple-choice accuracy with paired tests (built-in task, MMLU-format folders)
    ablate_lr       expert learning rate and domain mixture
    ablate_quality  the embedding tuned too (the paper's) and distillation mixed in, on the parent's schedule
    ablate_budget   more expert steps on the parent's schedule
    ablate_split    router steps vs expert steps at equal wall time
    ablate_calib    calibration size and mask stability
    ablate_refit    closed-form down-projection refit (ridge, tied / fused) at the start of tuning
    ablate_pool     router pool size
    curve           held-out perplexity at every kept checkpoint against the main job's wall clock
    evaluate        the evaluation suite (readme_jax.eval.suite): perplexity with paired CIs, MC, cloze
"""

# Importing a module registers its experiments (science/settings.py EXPERIMENTS); this order is the order of
# ``python -m readme_jax.science all`` (mc scores the baselines the first two leave).
from readme_jax.science.dense_baseline import dense_baseline  # noqa: I001
from readme_jax.science.layerwise import layerwise
from readme_jax.science.bounds import bounds
from readme_jax.science.mc import mc
from readme_jax.science.ablations import ablate_budget, ablate_lr, ablate_quality, ablate_split
from readme_jax.science.calib import ablate_calib
from readme_jax.science.refit import ablate_refit
from readme_jax.science.pool import ablate_pool
from readme_jax.science.evaluate import evaluate
from readme_jax.science.curve import curve
from readme_jax.science.settings import EXPERIMENTS

__all__ = ["EXPERIMENTS", *EXPERIMENTS.names()]
