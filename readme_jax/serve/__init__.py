"""Serving: a continuous-batching engine with router lookahead, schedulers, an expert cache, and an
OpenAI-compatible HTTP server (``python -m readme_jax.serve``). See docs/architecture.md, "Serving"."""
