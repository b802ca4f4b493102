"""tools.benchmark_logreg: a bad flag is one line and exit 2, before the features are built."""
from tools import benchmark_logreg


def test_a_non_finite_tolerance_is_one_line_exit_2(capsys):
    assert benchmark_logreg.main(["--tol", "nan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tools.benchmark_logreg: error: --tol must be a finite number, got nan"], err
