"""Regenerate the bundled Fashion-MNIST sample (run once by maintainers; output is committed).

Takes a balanced, seeded sample of 1,200 train and 200 test images per class from the full dataset
(e.g. Debian's /usr/share/datasets/fashion-mnist) and writes it in the original IDX .gz format.
"""

import argparse
from pathlib import Path

import numpy as np

from onp.data.idx import FASHION_MNIST, IDX_FILES, SAMPLE_DIR, _find_idx_dir, read_idx, write_idx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--train-per-class", type=int, default=1200)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    files = _find_idx_dir([Path(args.src)])
    rng = np.random.default_rng(args.seed)
    out = SAMPLE_DIR / FASHION_MNIST.name
    out.mkdir(parents=True, exist_ok=True)
    for prefix, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        x, y = read_idx(files[f"{prefix}_images"]), read_idx(files[f"{prefix}_labels"])
        idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(10)]))
        write_idx(out / (IDX_FILES[f"{prefix}_images"] + ".gz"), x[idx])
        write_idx(out / (IDX_FILES[f"{prefix}_labels"] + ".gz"), y[idx])
        print(prefix, len(idx))


if __name__ == "__main__":
    main()
