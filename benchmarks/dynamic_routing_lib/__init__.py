"""Helpers of ``benchmarks/dynamic_routing.py`` (issue 12): data, model, training, analysis and
the generated report. Imported by the script (its folder is on ``sys.path``) and by
``tests/test_dynamic_routing_smoke.py``."""
