"""tools.benchmark --data (tools/benchmark_data.py): its float flags are checked like every entry point's
(a non-finite value is one line, exit 2, before any work), called directly or through tools.benchmark."""
import pytest

from tools import benchmark, benchmark_data


@pytest.mark.parametrize("entry", [benchmark_data.main, benchmark.main])
@pytest.mark.parametrize("flag,value", [("--mfu", "nan"), ("--step-img-per-s", "inf")])
def test_a_non_finite_float_flag_is_one_line_exit_2(entry, flag, value, tmp_path, capsys):
    made = tmp_path / "images"
    assert entry(["--data", f"make:{made}", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"tools.benchmark --data: error: {flag} must be a finite number, got {value}"]
    assert not made.exists()  # refused before any work


def test_a_folder_without_jpegs_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no images here")
    assert benchmark_data.main(["--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no JPEGs under" in err[0] and "make:" in err[0], err
