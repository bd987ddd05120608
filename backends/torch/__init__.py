"""The torch backend plugin of moe-router."""
