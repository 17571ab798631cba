//! Loading a model's `tokenizer.json` within bounds.
//!
//! A tenant's tokenizer runs on a serving thread, inside its model's run but outside what ONNX Runtime
//! can terminate, and its file says how much work a text costs. Before the tokenizers library reads it,
//! the file is checked for what would make a text of at most `MAX_TEXT_BYTES` take seconds or
//! gigabytes: words split by trying every piece of every length, normalizers that multiply a text's
//! length step after step, regular expressions that backtrack, random (dropout) merges, templates that
//! add more tokens than the model reads. Published tokenizers (BERT's, SentencePiece's, byte-level
//! BPE's) stay well inside every bound.

use std::path::Path;

use serde_json::Value;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::InferenceError;
use crate::engine::MAX_TEXT_BYTES;

/// Most steps in a `Sequence` of normalizers, pre-tokenizers or post-processors.
const MAX_SEQUENCE_STEPS: usize = 32;
/// Longest piece of a Unigram (SentencePiece) vocabulary, in characters: at every character of a
/// text, tokenizing looks up each piece starting there, so the work grows with the longest piece.
/// SentencePiece's trainer keeps pieces to 16 characters by default.
const MAX_UNIGRAM_PIECE_CHARS: usize = 64;
/// Added tokens are matched in every text by one automaton, built at load.
const MAX_ADDED_TOKENS: usize = 16_384;
const MAX_ADDED_TOKEN_BYTES: usize = 1 << 20;
/// Longest regular expression (of a `Split` pre-tokenizer or a `Replace` normalizer).
const MAX_PATTERN_BYTES: usize = 4096;
/// Longest a text may become after normalizing, at worst (BERT's normalizer: 3x).
const MAX_NORMALIZED_BYTES: usize = 64 * MAX_TEXT_BYTES;
/// Longest word a WordPiece tokenizer splits into pieces (longer ones are one unknown token), as in
/// BERT's own: splitting tries every piece of a word, so the work grows with the cube of its length,
/// and an uploaded `tokenizer.json` could set a limit that makes one text take minutes.
const MAX_WORDPIECE_CHARS: usize = 100;
/// Regular expressions of published pre-tokenizers that look ahead (GPT-2's, Llama 3's, Qwen2's):
/// a lookahead makes the whole expression run on a backtracking engine, where a crafted one can take
/// time quadratic in the text (`a+b|\s+(?!\S)`: 32 KiB of "a" took 19 s to split in a debug build).
/// These were timed on texts crafted against them (runs of spaces, newlines, quotes, digits,
/// punctuation) and stay linear. Any other must be a regular expression of the linear-time `regex`
/// crate.
const PUBLISHED_LOOKAHEAD_PATTERNS: [&str; 3] = [
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
];

/// Reads a model's tokenizer, checks its bounds, and sets it to pad each run to its longest text and
/// to cut texts at `max_tokens`.
///
/// # Errors
/// `InvalidModel` with the reason, for a file that is unreadable or out of bounds.
pub(crate) fn load(path: &Path, max_tokens: usize) -> Result<Tokenizer, InferenceError> {
    let invalid = |reason: String| InferenceError::InvalidModel(format!("tokenizer.json: {reason}"));
    let bytes = std::fs::read(path).map_err(|err| invalid(format!("cannot be read: {err}")))?;
    let json: Value = serde_json::from_slice(&bytes).map_err(|err| invalid(format!("is not JSON: {err}")))?;
    check_bounds(&json).map_err(invalid)?;
    let mut tokenizer =
        Tokenizer::from_bytes(&bytes).map_err(|err| invalid(format!("is not usable: {err}")))?;
    // Checked before truncation is set: the library subtracts these from the length without checking.
    let added = tokenizer.get_post_processor().map_or(0, |processor| {
        tokenizers::PostProcessor::added_tokens(processor, false)
    });
    if added > max_tokens / 2 {
        return Err(invalid(format!(
            "its post-processor adds {added} tokens to each text; the model reads {max_tokens}, and at most half may be added"
        )));
    }
    // Pad to the longest text in each batch, not to a fixed length: short texts stay cheap.
    tokenizer.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        ..PaddingParams::default()
    }));
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_tokens,
            ..TruncationParams::default()
        }))
        .map_err(|err| invalid(format!("truncation: {err}")))?;
    bound_word_splitting(&mut tokenizer);
    Ok(tokenizer)
}

/// Caps a WordPiece model's `max_input_chars_per_word` at `MAX_WORDPIECE_CHARS`.
fn bound_word_splitting(tokenizer: &mut Tokenizer) {
    if let tokenizers::ModelWrapper::WordPiece(model) = tokenizer.get_model()
        && model.max_input_chars_per_word > MAX_WORDPIECE_CHARS
    {
        let mut bounded = model.clone();
        bounded.max_input_chars_per_word = MAX_WORDPIECE_CHARS;
        tokenizer.with_model(bounded);
    }
}

/// Everything in a `tokenizer.json` that sets how much work a text costs, within its bound.
fn check_bounds(json: &Value) -> Result<(), String> {
    for part in ["normalizer", "pre_tokenizer", "post_processor"] {
        check_steps(&json[part])?;
    }
    let growth = normalizer_growth(&json["normalizer"])?;
    if growth.of(MAX_TEXT_BYTES) > MAX_NORMALIZED_BYTES {
        return Err(format!(
            "its normalizers can make a text of {MAX_TEXT_BYTES} bytes {} bytes long; at most {MAX_NORMALIZED_BYTES}",
            growth.of(MAX_TEXT_BYTES)
        ));
    }
    if let Some(added) = json["added_tokens"].as_array() {
        let bytes: usize = added
            .iter()
            .map(|token| token["content"].as_str().map_or(0, str::len))
            .sum();
        if added.len() > MAX_ADDED_TOKENS || bytes > MAX_ADDED_TOKEN_BYTES {
            return Err(format!(
                "{} added tokens of {bytes} bytes; at most {MAX_ADDED_TOKENS} of {MAX_ADDED_TOKEN_BYTES} bytes",
                added.len()
            ));
        }
    }
    let model = &json["model"];
    match model["type"].as_str() {
        Some("BPE") if model["dropout"].as_f64().is_some_and(|dropout| dropout > 0.0) => {
            Err("BPE dropout makes every tokenization different (it is for training); set it to null".into())
        }
        Some("Unigram") => {
            let longest = model["vocab"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|entry| entry[0].as_str())
                .map(|piece| piece.chars().count())
                .max()
                .unwrap_or(0);
            if longest > MAX_UNIGRAM_PIECE_CHARS {
                return Err(format!(
                    "a Unigram piece of {longest} characters; at most {MAX_UNIGRAM_PIECE_CHARS}"
                ));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Sequences short enough, and every regular expression in `part` linear.
fn check_steps(part: &Value) -> Result<(), String> {
    match part {
        Value::Object(fields) => {
            if fields.get("type").and_then(Value::as_str) == Some("Sequence") {
                for (name, steps) in fields {
                    if let Value::Array(steps) = steps
                        && steps.len() > MAX_SEQUENCE_STEPS
                    {
                        return Err(format!(
                            "a Sequence of {} {name}; at most {MAX_SEQUENCE_STEPS}",
                            steps.len()
                        ));
                    }
                }
            }
            if let Some(Value::String(pattern)) = fields.get("Regex") {
                shortest_match(pattern)?;
            }
            fields.values().try_for_each(check_steps)
        }
        Value::Array(items) => items.iter().try_for_each(check_steps),
        _ => Ok(()),
    }
}

/// The fewest bytes a match of `pattern` spans, once it is known to run in linear time: a regular
/// expression of the `regex` crate (no lookaround, no backreferences), or a published one.
fn shortest_match(pattern: &str) -> Result<usize, String> {
    if PUBLISHED_LOOKAHEAD_PATTERNS.contains(&pattern) {
        return Ok(1);
    }
    if pattern.len() > MAX_PATTERN_BYTES {
        return Err(format!(
            "a regular expression of {} bytes; at most {MAX_PATTERN_BYTES}",
            pattern.len()
        ));
    }
    let hir = regex_syntax::Parser::new().parse(pattern).map_err(|err| {
        format!(
            "the regular expression `{pattern}` is not one that matches in linear time (no lookaround or backreferences, or one of the published tokenizers'): {err}"
        )
    })?;
    Ok(hir.properties().minimum_len().unwrap_or(0))
}

/// At worst, normalizing a text of `n` bytes makes it `factor * n + extra` bytes long.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Growth {
    factor: usize,
    extra: usize,
}

impl Growth {
    const NONE: Self = Self { factor: 1, extra: 0 };

    fn times(factor: usize) -> Self {
        Self { factor, extra: 0 }
    }

    fn then(self, next: Self) -> Self {
        Self {
            factor: self.factor.saturating_mul(next.factor),
            extra: self.extra.saturating_mul(next.factor).saturating_add(next.extra),
        }
    }

    fn of(self, bytes: usize) -> usize {
        self.factor.saturating_mul(bytes).saturating_add(self.extra)
    }
}

/// How much a normalizer (a step or a `Sequence` of them) may lengthen a text, in UTF-8 bytes. Text
/// between added tokens is normalized piece by piece, so what a step adds once per text (`Prepend`, or
/// a pattern that matches nothing) is counted once per byte.
fn normalizer_growth(step: &Value) -> Result<Growth, String> {
    let Some(kind) = step["type"].as_str() else {
        return Ok(Growth::NONE);
    };
    let text = |field: &str| step[field].as_str().unwrap_or_default();
    Ok(match kind {
        "Sequence" => {
            let steps = step["normalizers"].as_array().into_iter().flatten();
            steps
                .map(normalizer_growth)
                .try_fold(Growth::NONE, |growth, next| Ok::<_, String>(growth.then(next?)))?
        }
        "Strip" | "StripAccents" | "Nmt" => Growth::NONE,
        // Lowercase letters take at most 1.5x the bytes of capitals ('İ' → "i̇"); BERT's normalizer also
        // puts spaces around CJK characters (3 bytes → 5).
        "Lowercase" | "ByteLevel" => Growth::times(2),
        "BertNormalizer" => Growth::times(3),
        // Unicode's bound for any normalization form: 18 code points from one.
        "NFC" | "NFD" | "NFKC" | "NFKD" => Growth::times(18),
        "Prepend" => {
            let prepend = text("prepend").len();
            Growth {
                factor: 1 + prepend,
                extra: prepend,
            }
        }
        "Replace" => {
            let content = text("content").len();
            let shortest = match &step["pattern"] {
                Value::Object(pattern) => match (pattern.get("String"), pattern.get("Regex")) {
                    (Some(Value::String(literal)), _) => literal.len(),
                    (_, Some(Value::String(regex))) => shortest_match(regex)?,
                    _ => 0,
                },
                _ => 0,
            };
            if shortest == 0 {
                // Matching nothing, the content goes between every two characters.
                Growth {
                    factor: 1 + content,
                    extra: content,
                }
            } else {
                Growth::times(content.div_ceil(shortest).max(1))
            }
        }
        "Precompiled" => Growth::times(longest_precompiled_replacement(text("precompiled_charsmap"))?.max(1)),
        other => return Err(format!("unknown normalizer `{other}`")),
    })
}

/// The longest replacement in a SentencePiece character map (base64 of: the trie's length in bytes as
/// a little-endian u32, the trie, then the replacements, each ended by a NUL).
fn longest_precompiled_replacement(charsmap: &str) -> Result<usize, String> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(charsmap)
        .map_err(|err| format!("precompiled_charsmap is not base64: {err}"))?;
    let unreadable = || "precompiled_charsmap cannot be read".to_owned();
    let trie = bytes.get(..4).ok_or_else(unreadable)?;
    let trie = u32::from_le_bytes([trie[0], trie[1], trie[2], trie[3]]) as usize / 4 * 4;
    let replacements = bytes.get(4 + trie..).ok_or_else(unreadable)?;
    Ok(replacements
        .split(|&b| b == 0)
        .map(<[u8]>::len)
        .max()
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Instant;

    use serde_json::json;

    use super::*;

    const MAX_TOKENS: usize = 128;

    /// The built-in models' tokenizer (BERT's, as published), from where `scripts/setup.sh` put it.
    fn built_in() -> Value {
        let models = std::env::var_os("PLINTH_MODELS_DIR").map_or_else(
            || PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/plinth/models"),
            PathBuf::from,
        );
        let bytes =
            std::fs::read(models.join("tokenizer.json")).expect("scripts/setup.sh fetches the models");
        serde_json::from_slice(&bytes).unwrap()
    }

    fn load_json(json: &Value) -> Result<Tokenizer, InferenceError> {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), serde_json::to_vec(json).unwrap()).unwrap();
        load(file.path(), MAX_TOKENS)
    }

    fn refusal(json: &Value) -> String {
        match load_json(json) {
            Err(InferenceError::InvalidModel(reason)) => reason,
            Err(other) => panic!("refused for the wrong reason: {other}"),
            Ok(_) => panic!("loaded"),
        }
    }

    /// A SentencePiece-style (Unigram) tokenizer of the given pieces.
    fn unigram(pieces: &[String], normalizer: &Value) -> Value {
        let mut vocab = vec![json!(["<unk>", 0.0])];
        vocab.extend(pieces.iter().map(|piece| json!([piece, -1.0])));
        json!({
            "version": "1.0",
            "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": normalizer,
            "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": { "type": "Unigram", "unk_id": 0, "vocab": vocab, "byte_fallback": false }
        })
    }

    #[test]
    fn published_tokenizers_load() {
        let bert = load_json(&built_in()).expect("BERT's tokenizer");
        assert_eq!(bert.encode("Hello world", true).unwrap().len(), 4);
        // Byte-level BPE as GPT-2, Llama 3 and Qwen2 split text, with a lookahead.
        let mut split = built_in();
        for pattern in PUBLISHED_LOOKAHEAD_PATTERNS {
            split["pre_tokenizer"] = json!({
                "type": "Split", "behavior": "Isolated", "invert": false, "pattern": { "Regex": pattern }
            });
            load_json(&split).expect(pattern);
        }
        // Llama 2's normalizer: a prefix, and spaces as "▁".
        let pieces: Vec<String> = ["▁hello", "▁world"].map(str::to_owned).to_vec();
        let llama = unigram(
            &pieces,
            &json!({ "type": "Sequence", "normalizers": [
                { "type": "Prepend", "prepend": "▁" },
                { "type": "Replace", "pattern": { "String": " " }, "content": "▁" }
            ]}),
        );
        let llama = load_json(&llama).expect("Llama 2's normalizer");
        assert_eq!(
            llama.encode("hello world", false).unwrap().get_tokens(),
            ["▁hello", "▁world"]
        );
    }

    #[test]
    fn a_template_adding_more_tokens_than_the_model_reads_is_refused() {
        // Truncation leaves room for the added tokens by subtracting them: more than the model reads
        // would wrap around, and every text would be read whole.
        let mut json = built_in();
        let cls = json!({ "SpecialToken": { "id": "[CLS]", "type_id": 0 } });
        let mut single = vec![cls; 200];
        single.push(json!({ "Sequence": { "id": "A", "type_id": 0 } }));
        json["post_processor"]["single"] = Value::Array(single);
        let reason = refusal(&json);
        assert!(reason.contains("adds 200 tokens"), "{reason}");
    }

    #[test]
    fn normalizers_that_multiply_a_texts_length_are_refused() {
        // Each step doubles every "a": 32 of them would make 32 KiB into 128 TiB.
        let double = json!({ "type": "Replace", "pattern": { "String": "a" }, "content": "aa" });
        let mut json = built_in();
        json["normalizer"] = json!({ "type": "Sequence", "normalizers": vec![double.clone(); 32] });
        let reason = refusal(&json);
        assert!(reason.contains("normalizers can make a text"), "{reason}");
        // A pattern that matches nothing puts its content between every two characters.
        json["normalizer"] =
            json!({ "type": "Replace", "pattern": { "Regex": "x*" }, "content": "y".repeat(100) });
        let reason = refusal(&json);
        assert!(reason.contains("normalizers can make a text"), "{reason}");
        // Six doublings (64x) are within bounds, and a long sequence of steps is refused as such.
        json["normalizer"] = json!({ "type": "Sequence", "normalizers": vec![double.clone(); 6] });
        load_json(&json).expect("64x");
        json["normalizer"] =
            json!({ "type": "Sequence", "normalizers": vec![json!({ "type": "Lowercase" }); 33] });
        let reason = refusal(&json);
        assert!(reason.contains("a Sequence of 33 normalizers"), "{reason}");
    }

    #[test]
    fn regular_expressions_must_match_in_linear_time() {
        let mut json = built_in();
        for pattern in [r"(a+)+\1", r"(?=a)b", r"a+b|\s+(?!\S)", r"(?>a+)b"] {
            json["pre_tokenizer"] = json!({
                "type": "Split", "behavior": "Isolated", "invert": false, "pattern": { "Regex": pattern }
            });
            let reason = refusal(&json);
            assert!(reason.contains("regular expression"), "{pattern}: {reason}");
        }
        json["pre_tokenizer"] = json!({ "type": "Sequence", "pretokenizers": [
            { "type": "WhitespaceSplit" },
            { "type": "Split", "behavior": "Isolated", "invert": false, "pattern": { "Regex": "a".repeat(5000) } }
        ]});
        let reason = refusal(&json);
        assert!(reason.contains("5000 bytes"), "{reason}");
        assert_eq!(shortest_match(r"ab|abc").unwrap(), 2);
        assert_eq!(shortest_match(r"x*").unwrap(), 0);
    }

    #[test]
    fn long_unigram_pieces_are_refused_and_short_ones_stay_fast() {
        // Pieces "a", "aa", … of every length make each character of "aaa…" start a match of each.
        let pieces: Vec<String> = (1..=2000).map(|n| "a".repeat(n)).collect();
        let reason = refusal(&unigram(&pieces, &Value::Null));
        assert!(reason.contains("a Unigram piece of 2000 characters"), "{reason}");
        let pieces: Vec<String> = (1..=MAX_UNIGRAM_PIECE_CHARS).map(|n| "a".repeat(n)).collect();
        let tokenizer = load_json(&unigram(&pieces, &Value::Null)).expect("pieces of 64");
        let started = Instant::now();
        tokenizer.encode("a".repeat(MAX_TEXT_BYTES), false).unwrap();
        // Timed by hand in a debug build: 8 KiB of "a" took 0.15 s to tokenize with pieces of up to 64
        // characters, 25 s with pieces of up to 2,000.
        assert!(started.elapsed().as_secs() < 5, "{:?}", started.elapsed());
    }

    #[test]
    fn bpe_dropout_and_too_many_added_tokens_are_refused() {
        let mut json = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": { "type": "BPE", "dropout": 0.9, "unk_token": null, "continuing_subword_prefix": null,
                       "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                       "vocab": { "a": 0, "b": 1, "ab": 2 }, "merges": [["a", "b"]] }
        });
        let reason = refusal(&json);
        assert!(reason.contains("dropout"), "{reason}");
        json["model"]["dropout"] = Value::Null;
        load_json(&json).expect("no dropout");
        json["added_tokens"] = (0..20_000)
            .map(|id| {
                json!({ "id": id + 3, "content": format!("<t{id}>"), "single_word": false,
                              "lstrip": false, "rstrip": false, "normalized": false, "special": true })
            })
            .collect();
        let reason = refusal(&json);
        assert!(reason.contains("20000 added tokens"), "{reason}");
    }

    #[test]
    fn growth_composes_step_after_step() {
        let twice = Growth::times(2);
        let prefix = Growth { factor: 4, extra: 3 };
        assert_eq!(twice.then(prefix), Growth { factor: 8, extra: 3 });
        assert_eq!(prefix.then(twice), Growth { factor: 8, extra: 6 });
        assert_eq!(Growth::times(usize::MAX).then(twice).of(10), usize::MAX);
    }

    #[test]
    fn an_uploaded_tokenizer_cannot_make_splitting_a_word_unbounded() {
        let vocab =
            [("[UNK]", 0), ("q", 1), ("##x", 2), ("##q", 3)].map(|(piece, id)| (piece.to_owned(), id));
        let model = tokenizers::models::wordpiece::WordPiece::builder()
            .vocab(vocab)
            .max_input_chars_per_word(1_000_000)
            .build()
            .unwrap();
        let mut tokenizer = Tokenizer::new(model);
        bound_word_splitting(&mut tokenizer);
        let word = "qx".repeat(60);
        let tokens = tokenizer.encode(word.as_str(), false).unwrap();
        assert_eq!(
            tokens.get_tokens(),
            ["[UNK]"],
            "a word of 120 characters is not split"
        );
        let word = "qx".repeat(50);
        let tokens = tokenizer.encode(word.as_str(), false).unwrap();
        assert_eq!(tokens.len(), 100, "one of 100 still is");
    }
}
