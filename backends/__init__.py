"""Framework backends of moe-router, one plugin package each (registered through entry points).

Each package keeps its framework import inside ``backend.py`` / ``layers.py``; ``plugin.py`` only
registers import strings, so loading the plugins never imports a framework.
"""
