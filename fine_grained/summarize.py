"""Table of the fine-grained results under a directory (one results.json per dataset) and their mean.

    python -m fine_grained.summarize output/fine_grained/my_model
The mean over the 12 paper datasets is the paper's "Fine-grained" column; it is only printed when all
12 are present (a partial mean is not comparable).
"""
import json
import os
import sys

from common.errors import MissingFileError, cli
from common.log import write_json
from fine_grained.datasets import PAPER_DATASETS


def collect(root: str) -> dict:
    """{dataset: results dict} for every <root>/<dataset>/results.json."""
    found = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "results.json")
        if os.path.isfile(path):
            with open(path) as f:
                r = json.load(f)
            found[r["dataset"]] = r
    return found


def table(results: dict) -> tuple[str, float | None]:
    order = [d for d in PAPER_DATASETS if d in results] + sorted(set(results) - set(PAPER_DATASETS))
    lines = [f"{'dataset':<12} {'metric':<24} {'test':>6}"]
    lines += [f"{d:<12} {results[d]['metric']:<24} {results[d]['test_score']:>6.1f}" for d in order]
    missing = [d for d in PAPER_DATASETS if d not in results]
    mean = None
    if not missing:
        mean = sum(results[d]["test_score"] for d in PAPER_DATASETS) / len(PAPER_DATASETS)
        lines.append(f"{'average (12)':<37} {mean:>6.1f}")
    else:
        lines.append(f"no 12-dataset average: missing {', '.join(missing)}")
    return "\n".join(lines), mean


@cli("fine_grained.summarize")
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        raise MissingFileError("usage: python -m fine_grained.summarize RESULTS_DIR (a folder holding "
                               "<dataset>/results.json); got " + (" ".join(argv) or "no argument"))
    results = collect(argv[0])
    if not results:
        raise MissingFileError(f"{argv[0]} holds no <dataset>/results.json of fine_grained.main")
    text, mean = table(results)
    print(text)
    write_json(os.path.join(argv[0], "summary.json"),
               {"scores": {d: r["test_score"] for d, r in results.items()}, "average": mean})
    return 0


if __name__ == "__main__":
    sys.exit(main())
