"""The scikit-learn reference for `cargo bench -p plinth-tests --bench training`.

Reads `train_x.npy` [n, dim] f32, `train_y.npy` [n] i64, `test_x.npy`, `test_y.npy` from DIR (the
embeddings and labels the benchmark trained and scored Plinth's head on), fits
`LogisticRegression(max_iter=1000)` (C=1, lbfgs, multinomial) on the training split only, scores it on
the test split, and prints one JSON line: accuracy, macro_f1, fit_seconds, iterations.

Usage: python sklearn_reference.py DIR (needs numpy and scikit-learn: scripts/bench-setup.sh)
"""

import json
import os
import sys
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score


def main():
    directory = sys.argv[1]
    load = lambda name: np.load(os.path.join(directory, name))
    train_x, train_y, test_x, test_y = (load(f) for f in ("train_x.npy", "train_y.npy", "test_x.npy", "test_y.npy"))
    model = LogisticRegression(max_iter=1000)
    started = time.perf_counter()
    model.fit(train_x, train_y)
    fit_seconds = time.perf_counter() - started
    predicted = model.predict(test_x)
    print(json.dumps({
        "accuracy": float(accuracy_score(test_y, predicted)),
        "macro_f1": float(f1_score(test_y, predicted, average="macro")),
        "fit_seconds": fit_seconds,
        "iterations": int(np.max(model.n_iter_)),
    }))


if __name__ == "__main__":
    main()
