"""Helpers the tests and the benchmarks share (not part of the installed package: the editable
install puts the checkout on ``sys.path``, so ``import testkit`` works from tests/ and bench/)."""
