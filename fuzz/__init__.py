"""Coverage-guided fuzzing of the decoders of peer and user input (atheris).

``python -m fuzz list`` names the targets, ``python -m fuzz all`` runs them all; the targets
themselves are plain functions in :mod:`fuzz.targets`, also run by the test suite.
This package imports nothing at import time, so that the fuzzer can instrument
``difs_p2p`` when it is first imported.
"""
