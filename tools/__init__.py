"""Scripts beside the method: the released-checkpoint converter and the released-design reference encoder
(python tools/convert_released.py --help). A package so that bench.py and the tests import them as tools.X."""
