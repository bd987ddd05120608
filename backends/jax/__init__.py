"""The jax backend plugin of moe-router."""
