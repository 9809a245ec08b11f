"""Tests of bench.py's command line: --variants names step variants by key and needs the step row.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_bench.py
"""
import pytest



def test_bench_variants_flag_rejects_unknown_keys_and_other_rows(capsys):
    """bench.py --variants picks step variants by key: a typo lists the valid keys, and the flag
    means nothing without the step row (both refused before anything is measured)."""
    import bench
    with pytest.raises(SystemExit):
        bench.main(["--variants", "step_paper_abb"])
    err = capsys.readouterr().err
    assert "unknown --variants ['step_paper_abb']" in err and "step_paper_posln_ab" in err
    with pytest.raises(SystemExit):
        bench.main(["--rows", "data", "--variants", "step_paper_ab"])
    assert "add step to --rows" in capsys.readouterr().err
