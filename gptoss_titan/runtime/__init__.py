"""The bottom layer: errors and exit codes, the logger, process setup, launch checks, the run
lock, dtype names, every private or version-dependent torch API. Imports nothing else of ours."""
