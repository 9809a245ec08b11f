"""The thorough tests, one file a module: OMP_NUM_THREADS=1 python -m pytest -q tests/"""
