"""Optimizer of the alternating rounds: AdamW, cosine within a round, lr x decay per round.

    tx = make_optimizer(peak_lr=round_lr(5e-4, 0.8, r), steps=100, weight_decay=0.01, grad_clip=1.0)

The train steps build the optimizer once per phase kind with ``peak_lr=1`` and multiply its updates by
the round's peak lr, a traced scalar: AdamW's update is ``-lr(t) * (adam(g) + wd * w)``, linear in the peak,
so this is exactly AdamW at that peak while one compiled step serves every round (decoupled weight decay
scales with the lr, as in ``optax.adamw``).

No warmup (the paper's Table 2): step 0 of round r runs at ``base_lr * decay**r`` and the cosine reaches 0
after ``steps`` updates. Gradient accumulation is done by the train steps themselves (micro-batches are
scanned inside one jitted step and their gradients averaged), so one optimizer update = one step and the
schedule counts updates, never micro-batches.
"""

from __future__ import annotations

import optax


def round_lr(base_lr: float, decay: float, round_index: int) -> float:
    """Peak learning rate of round ``round_index`` (0-based): ``base_lr * decay ** round_index``."""
    return float(base_lr) * float(decay) ** int(round_index)


def schedule(peak_lr: float, steps: int) -> optax.Schedule:
    """Cosine from ``peak_lr`` at update 0 to 0 at update ``steps`` (no warmup)."""
    return optax.cosine_decay_schedule(init_value=peak_lr, decay_steps=max(int(steps), 1), alpha=0.0)


def make_optimizer(peak_lr: float, steps: int, *, weight_decay: float = 0.01,
                   grad_clip: float | None = None) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay ``weight_decay``) on :func:`schedule`, optional global-norm clipping."""
    tx = optax.adamw(schedule(peak_lr, steps), b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
    if grad_clip is not None:
        tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
    return tx
