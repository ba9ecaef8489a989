"""Checks of a run's config against its environment, before any stage runs or ``config.yaml`` is written.

    preflight(cfg)          # ConfigError naming the key, its value and what is expected
    mesh = train_mesh(cfg)  # the training mesh, its size checked against the batches (the trainer's)

What :func:`readme_jax.config.load_config` cannot know from the config alone: whether ``model.source`` exists
(and, when its config.json is readable, its FFN width and context for the keep-ratio and sequence-length
checks), which domains the corpus has (synthetic, default, ``corpus.from_dir``'s folders or ``corpus.dir``'s
manifest) against ``corpus.domains`` / ``extract.num_experts``, and how many devices the ``mesh`` sizes get.
"""

from __future__ import annotations

import json
from pathlib import Path

from readme_jax.config import Config
from readme_jax.config.checks import check_domain_names, check_keep_ratio, check_seq_lens
from readme_jax.errors import ConfigError

NAMED_SOURCES = ("smollm2", "random-tiny")


def _source_config(source: str) -> dict | None:
    """config.json of a model directory (HF or ours), when there is one to read; else None."""
    path = Path(source)
    cfg_path = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if path.suffix == ".gguf" or not cfg_path.is_file():
        return None
    try:
        data = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return None                       # load_pretrained reports it, naming the file
    return data if isinstance(data, dict) else None


def check_model_source(cfg: Config) -> None:
    """model.source names a model or an existing path; with a readable config.json its FFN width and
    context are checked against extract.keep_ratio and the sequence lengths."""
    src = cfg.model.source
    if src in NAMED_SOURCES:
        return
    if not Path(src).exists():
        raise ConfigError(f"model.source={src!r}: no such file or directory (expected 'smollm2', 'random-tiny', "
                          "an HF directory, a .gguf file or a readme_jax checkpoint)")
    hf = _source_config(src)
    if hf is not None:
        ffn = hf.get("intermediate_size")
        ctx = hf.get("max_position_embeddings")
        check_keep_ratio(cfg.extract.keep_ratio, ffn if isinstance(ffn, int) else None)
        check_seq_lens(cfg, ctx if isinstance(ctx, int) else None)


def corpus_domains(cfg: Config) -> tuple[list[str], str]:
    """(the domains the configured corpus has, where they come from)."""
    c = cfg.corpus
    if c.synthetic:
        from readme_jax.train.synthetic import DOMAINS
        return list(DOMAINS), "the synthetic corpus"
    if c.from_dir:
        from readme_jax.data.sources import user_domains
        from readme_jax.errors import CorpusError
        try:
            return user_domains(c.from_dir), f"corpus.from_dir={c.from_dir}"
        except CorpusError as e:
            raise ConfigError(f"corpus.from_dir: {e}") from None
    if c.dir:
        from readme_jax.data.corpus import load_corpus
        from readme_jax.errors import CorpusError
        try:
            return load_corpus(c.dir).domains, f"corpus.dir={c.dir}"
        except (CorpusError, ValueError) as e:
            raise ConfigError(f"corpus.dir: {e}") from None
    from readme_jax.data.sources import DEFAULT_DOMAINS
    return list(DEFAULT_DOMAINS), "the default corpus"


def train_mesh(cfg: Config):
    """The (data, fsdp, expert) mesh of ``cfg.mesh``, each micro-batch's rows divisible by its devices."""
    from readme_jax.parallel.mesh import batch_size_of, make_mesh
    try:
        mesh = make_mesh(cfg.mesh)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    m = batch_size_of(mesh)
    t = cfg.train
    for name in ("router_batch", "expert_batch"):
        micro = getattr(t, name) // t.grad_accum
        if micro % m:
            raise ConfigError(f"train.{name}={getattr(t, name)} / train.grad_accum={t.grad_accum} = {micro} rows "
                              f"per micro-batch is not divisible by the {m} devices of the mesh "
                              f"{dict(mesh.shape)} (mesh.*)")
    return mesh


def preflight(cfg: Config) -> None:
    """Every check of ``cfg`` that needs the environment (see the module docstring)."""
    check_model_source(cfg)
    domains, where = corpus_domains(cfg)
    check_domain_names(cfg, domains, where)
    check_expert_axis(len(cfg.corpus.domains or domains), train_mesh(cfg), cfg)


def check_expert_axis(num_experts: int, mesh, cfg: Config) -> None:
    """The experts (one per domain) can be laid out on mesh.expert (parallel/expert_parallel.slot_layout)."""
    from readme_jax.parallel.expert_parallel import slot_layout
    try:
        slot_layout(num_experts, mesh.shape["expert"])
    except ValueError as e:
        raise ConfigError(f"mesh.expert={cfg.mesh.expert}: {e}") from None
