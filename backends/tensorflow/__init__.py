"""The tensorflow backend plugin of moe-router."""
