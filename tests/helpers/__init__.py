"""Helpers that several test modules share (plain functions; fixtures live in tests/conftest.py).

checkpoint.py: the bench-flavor trainer arguments with checkpoints, full weights of a DCP step folder
training.py: the small trainer arguments most trainer tests start from
sample.py: the generation command line
equivalence.py: a run of the trainer on N processes (tests/parallel/run_job.py) and its comparison
    with one process, document-masked data, metrics readers
"""
