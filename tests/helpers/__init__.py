"""Helpers shared by the test files, imported as a package: ``from helpers.models import tiny_llama``.

(``tests/`` is on ``sys.path`` through pytest's rootdir conftest, so no test inserts paths.)
"""
