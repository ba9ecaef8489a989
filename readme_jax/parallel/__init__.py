"""Meshes, sharding rules and expert-parallel dispatch (jax.shard_map)."""
