//! Loading a model's `tokenizer.json` within bounds.
//!
//! A tenant's tokenizer runs on a serving thread, inside its model's run but outside what ONNX Runtime
//! can terminate, and its file says how much work a text costs. Reading the file is itself work the
//! file chooses, so it happens in stages: the raw JSON is bounded first (no string long enough to make
//! the library's structures deep), then the tokenizers library reads it without its added tokens
//! (adding one normalizes it with the file's own normalizers), the vocabulary's ids are checked (the
//! library writes a vocabulary back by walking every id up to the largest), and the tokenizer is
//! written back in the library's own form (every part tagged with its type, whatever the upload's
//! spelling). That form is checked for what would make a text of at most `MAX_TEXT_BYTES` take seconds
//! or gigabytes: steps that multiply a text's length one after another, words split by trying every
//! piece of every length, long strings copied into every token, regular expressions (only published
//! ones are taken), random (dropout) merges, templates that repeat the text or add more tokens than
//! the model reads. Only then are the added tokens added. Published tokenizers (BERT's, SentencePiece's, byte-level
//! BPE's) stay inside every bound.

use std::path::Path;

use serde_json::Value;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::InferenceError;
use crate::engine::MAX_TEXT_BYTES;

/// Most steps in a `Sequence` of normalizers, pre-tokenizers or post-processors.
const MAX_SEQUENCE_STEPS: usize = 32;
/// How many times longer normalizing and pre-tokenizing may make a text, at worst, in bytes (and so
/// in the tokens a model splits it into). Published: BERT's 3x, byte-level BPE's 4x, Llama 2's 12x,
/// T5's and XLM-R's 66x (SentencePiece's NFKC map, one character of 3 bytes becoming 33, then "▁"
/// for spaces and before each piece).
const MAX_GROWTH: usize = 72;
/// How many times longer pre-tokenizing alone may make a text (published: byte-level 4x, "▁" 6x).
const MAX_PRE_TOKENIZER_GROWTH: usize = 8;
/// Most pre-tokenizer steps: each goes over every piece of the text (published: one to three).
const MAX_PRE_TOKENIZER_STEPS: usize = 4;
/// Longest piece of a Unigram (SentencePiece) vocabulary, in characters: at every character of a
/// text, tokenizing looks up each piece starting there, so the work grows with the longest piece.
/// SentencePiece's trainer keeps pieces to 16 characters by default.
const MAX_UNIGRAM_PIECE_CHARS: usize = 32;
/// Longest string anywhere in the file but a SentencePiece map, checked before the library reads it:
/// it builds a Unigram piece into a trie a level per character, and frees it recursively.
const MAX_RAW_STRING_BYTES: usize = 4096;
/// Longest SentencePiece character map, in base64 (published ones are about 320 KB).
const MAX_CHARSMAP_BASE64_BYTES: usize = 1 << 20;
/// Most objects and lists (steps, their patterns and sequences) among the normalizers and
/// pre-tokenizers, however nested, in the file and once read.
const MAX_STEP_OBJECTS: usize = 64;
/// Most regular expressions in a file: each compiles to up to megabytes as the file is read.
const MAX_PATTERNS: usize = 8;
/// Longest token of a vocabulary, or added token.
const MAX_TOKEN_BYTES: usize = 1024;
/// Longest unknown token, or special token of a post-processor: copied into every token it stands for.
const MAX_COPIED_TOKEN_BYTES: usize = 64;
/// Longest prefix (BERT's "##") or suffix (BPE's "</w>") of word pieces: it is copied for every piece
/// tried, and with byte fallback becomes tokens of its own.
const MAX_AFFIX_BYTES: usize = 8;
/// Added tokens are matched in every text by one automaton.
const MAX_ADDED_TOKENS: usize = 16_384;
const MAX_ADDED_TOKEN_BYTES: usize = 1 << 20;
/// Longest literal pattern (of a `Split` or a `Replace`): the library matches it as a regular
/// expression, which slows to seconds a pass over a long text past about 3,000 bytes. Published
/// tokenizers use a character or two (" ", "▁", "\n").
const MAX_LITERAL_PATTERN_BYTES: usize = 64;
/// Most items in any list of a post-processor (template pieces, a special token's ids).
const MAX_TEMPLATE_ITEMS: usize = 64;
/// Longest word a WordPiece tokenizer splits into pieces (longer ones are one unknown token), as in
/// BERT's own: splitting tries every piece of a word, so the work grows with the cube of its length,
/// and an uploaded `tokenizer.json` could set a limit that makes one text take minutes.
const MAX_WORDPIECE_CHARS: usize = 100;
/// The regular expressions a tokenizer may use (in a `Split` pre-tokenizer or a `Replace` normalizer),
/// with the fewest bytes a match of each spans: published ones, timed on texts crafted against them
/// (runs of spaces, newlines, tabs, quotes, digits, punctuation, letters), where they stay linear.
/// Any other is refused. With a lookahead, an expression runs on a backtracking engine, where a
/// crafted one takes time quadratic in the text or worse (`a+b|\s+(?!\S)`: 32 KiB of "a" took 19 s to
/// split in a debug build); without, finding every match still can (`a*b|a` scans to the end of a
/// run of "a" for each one: 2 s for 32 KiB). Literal `String` patterns are always linear.
const PUBLISHED_PATTERNS: [(&str, usize); 4] = [
    // GPT-2's pre-tokenizer.
    (
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
        1,
    ),
    // Llama 3's.
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        1,
    ),
    // Qwen2's.
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        1,
    ),
    // T5's and XLM-R's normalizer: runs of spaces become one.
    (r" {2,}", 2),
];

/// A model's tokenizer, with how much longer it may make a text, at worst, before splitting it into
/// tokens (its normalizers' and pre-tokenizers' growth, as checked at load).
#[derive(Clone)]
pub(crate) struct TextTokenizer {
    tokenizer: Tokenizer,
    growth: Growth,
}

impl TextTokenizer {
    /// A tokenizer whose growth is not known: every text is measured.
    #[cfg(test)]
    pub(crate) fn unbounded(tokenizer: Tokenizer) -> Self {
        Self {
            tokenizer,
            growth: Growth::times(usize::MAX),
        }
    }

    /// Whether a text of `bytes` may become longer than `most` before it is split into tokens.
    pub(crate) fn may_make_longer_than(&self, bytes: usize, most: usize) -> bool {
        self.growth.of(bytes) > most
    }
}

impl std::ops::Deref for TextTokenizer {
    type Target = Tokenizer;

    fn deref(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

impl std::ops::DerefMut for TextTokenizer {
    fn deref_mut(&mut self) -> &mut Tokenizer {
        &mut self.tokenizer
    }
}

/// Reads a model's tokenizer, checks its bounds, and sets it to pad each run to its longest text and
/// to cut texts at `max_tokens`.
///
/// # Errors
/// `InvalidModel` with the reason, for a file that is unreadable or out of bounds.
pub(crate) fn load(path: &Path, max_tokens: usize) -> Result<TextTokenizer, InferenceError> {
    let invalid = |reason: String| InferenceError::InvalidModel(format!("tokenizer.json: {reason}"));
    let bytes = std::fs::read(path).map_err(|err| invalid(format!("cannot be read: {err}")))?;
    let mut raw: Value =
        serde_json::from_slice(&bytes).map_err(|err| invalid(format!("is not JSON: {err}")))?;
    drop(bytes);
    check_raw(&raw).map_err(invalid)?;
    let added = raw
        .as_object_mut()
        .and_then(|parts| parts.remove("added_tokens"))
        .unwrap_or(Value::Null);
    let added: Vec<tokenizers::AddedToken> = if added.is_null() {
        Vec::new()
    } else {
        serde_json::from_value(added).map_err(|err| invalid(format!("added_tokens: {err}")))?
    };
    check_added_tokens(&added).map_err(invalid)?;
    // The library panics on some malformed parts (a SentencePiece map that is not UTF-8).
    let mut tokenizer = std::panic::catch_unwind(|| serde_json::from_value::<Tokenizer>(raw))
        .map_err(|_| invalid("cannot be read".into()))?
        .map_err(|err| invalid(format!("is not usable: {err}")))?;
    check_vocabulary_ids(&tokenizer).map_err(invalid)?;
    let read =
        serde_json::to_value(&tokenizer).map_err(|err| invalid(format!("cannot be written back: {err}")))?;
    let Bounds { normalizing, growth } = check_bounds(&read).map_err(invalid)?;
    // Added tokens marked `normalized` are matched as the normalizers make them.
    let normalized: usize = added
        .iter()
        .filter(|token| token.normalized)
        .map(|token| normalizing.of(token.content.len()))
        .fold(0, usize::saturating_add);
    if normalized > MAX_ADDED_TOKEN_BYTES {
        return Err(invalid(format!(
            "its normalizers can make its added tokens {normalized} bytes; at most {MAX_ADDED_TOKEN_BYTES}"
        )));
    }
    tokenizer
        .add_tokens(added)
        .map_err(|err| invalid(format!("added_tokens: {err}")))?;
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
    Ok(TextTokenizer { tokenizer, growth })
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

/// What the library builds as it reads the file, bounded before it does: no string long enough to
/// make its structures deep, vocabulary tokens as long as the later checks allow, few steps and
/// regular expressions.
fn check_raw(raw: &Value) -> Result<(), String> {
    check_raw_strings(raw)?;
    match &raw["model"]["vocab"] {
        Value::Array(pieces) => check_unigram_pieces(pieces)?,
        Value::Object(tokens) => tokens
            .keys()
            .try_for_each(|token| token_string(token, "a token", MAX_TOKEN_BYTES))?,
        _ => {}
    }
    let steps = objects(&raw["normalizer"]) + objects(&raw["pre_tokenizer"]);
    if steps > MAX_STEP_OBJECTS {
        return Err(format!(
            "{steps} normalizer and pre-tokenizer steps and patterns; at most {MAX_STEP_OBJECTS}"
        ));
    }
    let patterns = regular_expressions(raw);
    if patterns > MAX_PATTERNS {
        return Err(format!("{patterns} regular expressions; at most {MAX_PATTERNS}"));
    }
    Ok(())
}

/// The objects and lists in `value`, however nested (the library also reads a step written as a list).
fn objects(value: &Value) -> usize {
    match value {
        Value::Object(fields) => 1 + fields.values().map(objects).sum::<usize>(),
        Value::Array(items) => 1 + items.iter().map(objects).sum::<usize>(),
        _ => 0,
    }
}

/// The steps in a part as the library writes it back (objects with a type, but sequences), however
/// nested.
fn typed_steps(value: &Value) -> usize {
    match value {
        Value::Object(fields) => {
            let step = fields
                .get("type")
                .and_then(Value::as_str)
                .is_some_and(|kind| kind != "Sequence");
            usize::from(step) + fields.values().map(typed_steps).sum::<usize>()
        }
        Value::Array(items) => items.iter().map(typed_steps).sum(),
        _ => 0,
    }
}

/// The regular expressions (`{"Regex": …}`) in `value`, however nested.
fn regular_expressions(value: &Value) -> usize {
    match value {
        Value::Object(fields) => {
            usize::from(fields.get("Regex").is_some_and(Value::is_string))
                + fields.values().map(regular_expressions).sum::<usize>()
        }
        Value::Array(items) => items.iter().map(regular_expressions).sum(),
        _ => 0,
    }
}

/// Unigram pieces (`[piece, score]`) of at most `MAX_UNIGRAM_PIECE_CHARS`.
fn check_unigram_pieces(pieces: &[Value]) -> Result<(), String> {
    let longest = pieces
        .iter()
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

/// No string (or key) in the raw file longer than `MAX_RAW_STRING_BYTES`, but a SentencePiece map
/// (`MAX_CHARSMAP_BASE64_BYTES`).
fn check_raw_strings(value: &Value) -> Result<(), String> {
    let too_long = |text: &str| {
        Err(format!(
            "a string of {} bytes; at most {MAX_RAW_STRING_BYTES}",
            text.len()
        ))
    };
    match value {
        Value::String(text) if text.len() > MAX_RAW_STRING_BYTES => too_long(text),
        Value::Array(items) => items.iter().try_for_each(check_raw_strings),
        Value::Object(fields) => fields.iter().try_for_each(|(key, value)| {
            if key.len() > MAX_RAW_STRING_BYTES {
                too_long(key)
            } else if key == "precompiled_charsmap" {
                match value {
                    Value::String(map) if map.len() > MAX_CHARSMAP_BASE64_BYTES => Err(format!(
                        "a precompiled_charsmap of {} bytes; at most {MAX_CHARSMAP_BASE64_BYTES}",
                        map.len()
                    )),
                    _ => Ok(()),
                }
            } else {
                check_raw_strings(value)
            }
        }),
        _ => Ok(()),
    }
}

fn check_added_tokens(added: &[tokenizers::AddedToken]) -> Result<(), String> {
    let bytes: usize = added.iter().map(|token| token.content.len()).sum();
    if added.len() > MAX_ADDED_TOKENS || bytes > MAX_ADDED_TOKEN_BYTES {
        return Err(format!(
            "{} added tokens of {bytes} bytes; at most {MAX_ADDED_TOKENS} of {MAX_ADDED_TOKEN_BYTES} bytes",
            added.len()
        ));
    }
    for token in added {
        token_string(&token.content, "an added token", MAX_TOKEN_BYTES)?;
        // The library stretches a match over the whitespace beside it and looks for the next match one
        // character on: a token that starts or ends with whitespace matches again inside the stretch,
        // and a run of spaces becomes pieces quadratic in its length (an abort, for 32 KiB of spaces).
        let edged = |c: Option<char>| c.is_some_and(char::is_whitespace);
        if (token.lstrip || token.rstrip)
            && (edged(token.content.chars().next()) || edged(token.content.chars().next_back()))
        {
            return Err(format!(
                "the added token {:?} strips whitespace beside it but starts or ends with whitespace",
                token.content
            ));
        }
    }
    Ok(())
}

/// Every id of the vocabulary below its size, once: the library writes a vocabulary back by walking
/// every id up to the largest.
fn check_vocabulary_ids(tokenizer: &Tokenizer) -> Result<(), String> {
    use tokenizers::Model as _;
    let vocabulary = tokenizer.get_model().get_vocab();
    let mut seen = vec![false; vocabulary.len()];
    for id in vocabulary.into_values() {
        match seen.get_mut(id as usize) {
            Some(seen) if !*seen => *seen = true,
            _ => {
                return Err(format!(
                    "the vocabulary's ids must be 0 to {} once each",
                    seen.len().saturating_sub(1)
                ));
            }
        }
    }
    Ok(())
}

/// How much longer a tokenizer may make a text: by its normalizers, and before splitting it into tokens.
struct Bounds {
    normalizing: Growth,
    growth: Growth,
}

/// Everything in a tokenizer, as the library writes it, that sets how much work a text costs.
fn check_bounds(tokenizer: &Value) -> Result<Bounds, String> {
    for part in ["normalizer", "pre_tokenizer", "post_processor"] {
        check_steps(&tokenizer[part])?;
    }
    let steps = objects(&tokenizer["normalizer"]) + objects(&tokenizer["pre_tokenizer"]);
    if steps > MAX_STEP_OBJECTS {
        return Err(format!(
            "{steps} normalizer and pre-tokenizer steps and patterns; at most {MAX_STEP_OBJECTS}"
        ));
    }
    let pre_tokenizer_steps = typed_steps(&tokenizer["pre_tokenizer"]);
    if pre_tokenizer_steps > MAX_PRE_TOKENIZER_STEPS {
        return Err(format!(
            "{pre_tokenizer_steps} pre-tokenizer steps; at most {MAX_PRE_TOKENIZER_STEPS}"
        ));
    }
    let normalizing = normalizer_growth(&tokenizer["normalizer"])?;
    let pre_tokenizing = pre_tokenizer_growth(&tokenizer["pre_tokenizer"])?;
    if pre_tokenizing.of(MAX_TEXT_BYTES) > MAX_PRE_TOKENIZER_GROWTH * MAX_TEXT_BYTES {
        return Err(format!(
            "its pre-tokenizers can make a text of {MAX_TEXT_BYTES} bytes {} bytes long; at most {MAX_PRE_TOKENIZER_GROWTH} times",
            pre_tokenizing.of(MAX_TEXT_BYTES)
        ));
    }
    let growth = normalizing.then(pre_tokenizing);
    if growth.of(MAX_TEXT_BYTES) > MAX_GROWTH * MAX_TEXT_BYTES {
        return Err(format!(
            "its normalizers and pre-tokenizers can make a text of {MAX_TEXT_BYTES} bytes {} bytes long; at most {MAX_GROWTH} times",
            growth.of(MAX_TEXT_BYTES)
        ));
    }
    check_model(&tokenizer["model"])?;
    check_post_processor(&tokenizer["post_processor"])?;
    Ok(Bounds { normalizing, growth })
}

/// A token-like string of at most `most` bytes.
fn token_string(text: &str, what: &str, most: usize) -> Result<(), String> {
    if text.len() > most {
        return Err(format!("{what} of {} bytes; at most {most}", text.len()));
    }
    Ok(())
}

fn check_model(model: &Value) -> Result<(), String> {
    let kind = model["type"].as_str().unwrap_or_default();
    // Vocabularies: a map of token to id (BPE, WordPiece, WordLevel), or a list of [piece, score].
    match &model["vocab"] {
        Value::Object(vocab) => vocab
            .keys()
            .try_for_each(|token| token_string(token, "a token", MAX_TOKEN_BYTES))?,
        Value::Array(pieces) => check_unigram_pieces(pieces)?,
        _ => {}
    }
    if let Some(unknown) = model["unk_token"].as_str() {
        token_string(unknown, "the unknown token", MAX_COPIED_TOKEN_BYTES)?;
    }
    let mut affixed = false;
    for affix in ["continuing_subword_prefix", "end_of_word_suffix"] {
        if let Some(affix) = model[affix].as_str() {
            if affix.len() > MAX_AFFIX_BYTES {
                return Err(format!(
                    "a word piece prefix or suffix of {} bytes; at most {MAX_AFFIX_BYTES}",
                    affix.len()
                ));
            }
            affixed |= !affix.is_empty();
        }
    }
    if kind == "BPE" {
        if model["dropout"].as_f64().is_some_and(|dropout| dropout > 0.0) {
            return Err(
                "BPE dropout makes every tokenization different (it is for training); set it to null".into(),
            );
        }
        if affixed && model["byte_fallback"].as_bool() == Some(true) {
            return Err("byte fallback with a word piece prefix or suffix makes tokens of the prefix's bytes for every character".into());
        }
    }
    Ok(())
}

/// A template names the text once (`$A`); its lists are short.
fn check_post_processor(processor: &Value) -> Result<(), String> {
    match processor {
        Value::Object(fields) => {
            if fields.get("type").and_then(Value::as_str) == Some("TemplateProcessing") {
                let texts = fields["single"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|piece| piece.get("Sequence").is_some())
                    .count();
                if texts != 1 {
                    return Err(format!(
                        "a template for single texts names the text {texts} times; once"
                    ));
                }
            }
            fields.values().try_for_each(check_post_processor)
        }
        Value::Array(items) if items.len() > MAX_TEMPLATE_ITEMS => Err(format!(
            "a post-processor list of {} items; at most {MAX_TEMPLATE_ITEMS}",
            items.len()
        )),
        Value::Array(items) => items.iter().try_for_each(check_post_processor),
        Value::String(text) => token_string(text, "a special token", MAX_COPIED_TOKEN_BYTES),
        _ => Ok(()),
    }
}

/// Sequences short enough, only published regular expressions, and short literal patterns.
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
            if let Some(Value::String(literal)) = fields.get("String")
                && literal.len() > MAX_LITERAL_PATTERN_BYTES
            {
                return Err(format!(
                    "a literal pattern of {} bytes; at most {MAX_LITERAL_PATTERN_BYTES}",
                    literal.len()
                ));
            }
            fields.values().try_for_each(check_steps)
        }
        Value::Array(items) => items.iter().try_for_each(check_steps),
        _ => Ok(()),
    }
}

/// The fewest bytes a match of `pattern` spans, for a published pattern (`PUBLISHED_PATTERNS`).
fn shortest_match(pattern: &str) -> Result<usize, String> {
    PUBLISHED_PATTERNS
        .iter()
        .find(|(published, _)| *published == pattern)
        .map(|(_, shortest)| *shortest)
        .ok_or_else(|| {
            format!(
                "the regular expression `{pattern}` is not one of the published patterns taken (GPT-2's, Llama 3's, Qwen2's pre-tokenizers, SentencePiece's ` {{2,}}`): a regular expression can take time quadratic in a text or worse; use a String pattern"
            )
        })
}

/// At worst, a step makes a text of `n` bytes `factor * n + extra` bytes long.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Growth {
    factor: usize,
    extra: usize,
}

impl Growth {
    const NONE: Self = Self { factor: 1, extra: 0 };

    fn times(factor: usize) -> Self {
        Self { factor, extra: 0 }
    }

    /// Adds `bytes` once per piece of text: the text between added tokens is normalized piece by
    /// piece, and a piece is at least a byte.
    fn per_piece(bytes: usize) -> Self {
        Self {
            factor: 1 + bytes,
            extra: bytes,
        }
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

/// The steps of a `Sequence`, one after another.
fn sequence_growth(steps: &Value, growth: fn(&Value) -> Result<Growth, String>) -> Result<Growth, String> {
    steps
        .as_array()
        .into_iter()
        .flatten()
        .try_fold(Growth::NONE, |total, step| Ok(total.then(growth(step)?)))
}

/// How much a normalizer (a step or a `Sequence` of them) may lengthen a text, in UTF-8 bytes.
fn normalizer_growth(step: &Value) -> Result<Growth, String> {
    if step.is_null() {
        return Ok(Growth::NONE);
    }
    let text = |field: &str| step[field].as_str().unwrap_or_default();
    Ok(match step["type"].as_str().unwrap_or_default() {
        "Sequence" => sequence_growth(&step["normalizers"], normalizer_growth)?,
        "Strip" | "StripAccents" | "Nmt" => Growth::NONE,
        // Lowercase letters take at most 1.5x the bytes of capitals ('İ' → "i̇").
        "Lowercase" | "ByteLevel" => Growth::times(2),
        // Unicode's bounds in UTF-8 bytes (UAX #15); BERT's normalizer also puts spaces around CJK
        // characters (3 bytes → 5) and splits Hangul syllables (3 bytes → 9).
        "BertNormalizer" | "NFC" | "NFD" => Growth::times(3),
        "NFKC" | "NFKD" => Growth::times(11),
        "Prepend" => Growth::per_piece(text("prepend").len()),
        "Replace" => {
            let content = text("content").len();
            let shortest = match (&step["pattern"]["String"], &step["pattern"]["Regex"]) {
                (Value::String(literal), _) => literal.len(),
                (_, Value::String(regex)) => shortest_match(regex)?,
                _ => 0,
            };
            if shortest == 0 {
                // Matching nothing, the content goes between every two characters.
                Growth::per_piece(content)
            } else {
                Growth::times(content.div_ceil(shortest).max(1))
            }
        }
        "Precompiled" => Growth::times(precompiled_growth(text("precompiled_charsmap"))?),
        other => return Err(format!("unknown normalizer `{other}`")),
    })
}

/// How much a pre-tokenizer (a step or a `Sequence` of them) may lengthen a text, in UTF-8 bytes.
fn pre_tokenizer_growth(step: &Value) -> Result<Growth, String> {
    if step.is_null() {
        return Ok(Growth::NONE);
    }
    Ok(match step["type"].as_str().unwrap_or_default() {
        "Sequence" => sequence_growth(&step["pretokenizers"], pre_tokenizer_growth)?,
        // Every byte becomes a character of one or two bytes, after a space before each piece.
        "ByteLevel" if step["add_prefix_space"].as_bool() == Some(true) => {
            Growth::per_piece(1).then(Growth::times(2))
        }
        "ByteLevel" => Growth::times(2),
        // Spaces become the replacement, and it may go before every piece.
        "Metaspace" => {
            let replacement = step["replacement"].as_str().unwrap_or_default().len().max(1);
            Growth {
                factor: 2 * replacement,
                extra: replacement,
            }
        }
        "FixedLength" if step["length"].as_u64() == Some(0) => {
            return Err("a FixedLength pre-tokenizer of length 0".into());
        }
        "BertPreTokenizer" | "CharDelimiterSplit" | "Whitespace" | "Split" | "Punctuation"
        | "WhitespaceSplit" | "Digits" | "UnicodeScripts" | "FixedLength" => Growth::NONE,
        other => return Err(format!("unknown pre-tokenizer `{other}`")),
    })
}

/// How much SentencePiece's precompiled character map may lengthen a text: the most bytes of
/// replacement per byte of what it replaces. The map (base64) is a little-endian u32 giving the trie's
/// size in bytes, the trie (a darts-clone double array of u32 units), then the replacements, each
/// ended by a NUL. The library looks up at most 5 bytes at a time (a grapheme of under 6 bytes, or one
/// character), replacing the whole of them with the replacement of the shortest key that starts them;
/// every lookup it can make is checked to stay inside the trie and to end in a replacement.
fn precompiled_growth(charsmap: &str) -> Result<usize, String> {
    use base64::Engine as _;
    const LOOKUP_BYTES: usize = 5;
    let unreadable = |why: &str| format!("precompiled_charsmap: {why}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(charsmap)
        .map_err(|err| unreadable(&format!("not base64: {err}")))?;
    let size = bytes.get(..4).ok_or_else(|| unreadable("empty"))?;
    let size = u32::from_le_bytes([size[0], size[1], size[2], size[3]]) as usize / 4;
    let units: Vec<usize> = bytes
        .get(4..4 + size * 4)
        .ok_or_else(|| unreadable("shorter than its trie"))?
        .chunks_exact(4)
        .map(|unit| u32::from_le_bytes([unit[0], unit[1], unit[2], unit[3]]) as usize)
        .collect();
    let replacements = &bytes[4 + size * 4..];
    let has_leaf = |unit: usize| (unit >> 8) & 1 == 1;
    let label = |unit: usize| unit & ((1 << 31) | 0xFF);
    let offset = |unit: usize| (unit >> 10) << ((unit & (1 << 9)) >> 6);
    // Longer replacements would be refused anyway: the scan for one's end stops there.
    let longest = LOOKUP_BYTES * MAX_GROWTH;
    let replacement = |value: usize| -> Result<usize, String> {
        let rest = replacements
            .get(value..)
            .ok_or_else(|| unreadable("a replacement outside the map"))?;
        let end = match rest.iter().take(longest + 1).position(|&b| b == 0) {
            Some(end) => end,
            None if rest.len() <= longest => rest.len(),
            None => return Err(unreadable(&format!("a replacement of more than {longest} bytes"))),
        };
        std::str::from_utf8(&rest[..end]).map_err(|_| unreadable("a replacement that is not UTF-8"))?;
        Ok(end)
    };
    let root = *units.first().ok_or_else(|| unreadable("an empty trie"))?;
    // (position after following the key's bytes, the key's length): every lookup's path, breadth first.
    let mut paths = vec![(offset(root), 0usize)];
    let mut growth = 1;
    let mut visited = 0usize;
    while let Some((position, depth)) = paths.pop() {
        if depth == LOOKUP_BYTES {
            continue;
        }
        for byte in 1..=255usize {
            let child = position ^ byte;
            let unit = *units
                .get(child)
                .ok_or_else(|| unreadable("a lookup outside the trie"))?;
            if label(unit) != byte {
                continue;
            }
            // A trie's lookups reach each unit once.
            visited += 1;
            if visited > units.len() {
                return Err(unreadable("not a trie"));
            }
            let next = child ^ offset(unit);
            if has_leaf(unit) {
                let value = *units
                    .get(next)
                    .ok_or_else(|| unreadable("a lookup outside the trie"))?;
                growth = growth.max(replacement(value & ((1 << 31) - 1))?.div_ceil(depth + 1));
            }
            paths.push((next, depth + 1));
        }
    }
    Ok(growth)
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

    fn load_json(json: &Value) -> Result<TextTokenizer, InferenceError> {
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

    /// A Unigram tokenizer as T5's and XLM-R's are published, from `tests/fixtures/make_models.py`
    /// (`scripts/test.sh` builds it).
    fn sentencepiece() -> Value {
        let cache = std::env::var_os("PLINTH_CACHE_DIR").map_or_else(
            || PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/plinth"),
            PathBuf::from,
        );
        let path = cache.join("test-models/sentencepiece-tokenizer.json");
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|err| panic!("{}: {err} (scripts/test.sh builds it)", path.display()));
        serde_json::from_slice(&bytes).unwrap()
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
        // Nothing BERT's tokenizer makes of a text needs measuring: at most 3 times as long.
        assert_eq!(bert.growth, Growth::times(3));
        assert!(!bert.may_make_longer_than(MAX_TEXT_BYTES, 4 * MAX_TEXT_BYTES));
        assert_eq!(bert.encode("Hello world", true).unwrap().len(), 4);
        // Byte-level BPE as GPT-2, Llama 3 and Qwen2 split text, with a lookahead (Qwen2's after NFC).
        let mut split = built_in();
        split["normalizer"] = json!({ "type": "NFC" });
        for (pattern, _) in &PUBLISHED_PATTERNS[..3] {
            split["pre_tokenizer"] = json!({ "type": "Sequence", "pretokenizers": [
                { "type": "Split", "behavior": "Isolated", "invert": false, "pattern": { "Regex": pattern } },
                { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false }
            ]});
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
        // SentencePiece's NFKC map (T5's, XLM-R's): at most 11 times longer ("ﷺ", 3 bytes, becomes 33).
        let t5 = sentencepiece();
        let charsmap = t5["normalizer"]["normalizers"][0]["precompiled_charsmap"]
            .as_str()
            .unwrap();
        assert_eq!(precompiled_growth(charsmap), Ok(11));
        let t5 = load_json(&t5).expect("SentencePiece's tokenizer");
        assert!(t5.encode("Shares rose ﷺ", false).unwrap().len() > 3);
    }

    #[test]
    fn what_a_tokenizer_copies_into_every_token_is_short() {
        let mut json = built_in();
        json["model"]["unk_token"] = json!("x".repeat(65));
        assert!(refusal(&json).contains("the unknown token of 65 bytes"));
        let mut json = built_in();
        json["model"]["vocab"]["x".repeat(1025)] = json!(30_522);
        assert!(refusal(&json).contains("a token of 1025 bytes"));
        let mut json = built_in();
        json["model"]["continuing_subword_prefix"] = json!("#".repeat(MAX_AFFIX_BYTES + 1));
        assert!(refusal(&json).contains("prefix or suffix of 9 bytes"));
        let mut json = built_in();
        json["post_processor"]["special_tokens"]["[CLS]"]["tokens"] = json!(["x".repeat(65)]);
        assert!(refusal(&json).contains("a special token of 65 bytes"));
        let mut json = built_in();
        json["added_tokens"][0]["content"] = json!("x".repeat(1025));
        assert!(refusal(&json).contains("an added token of 1025 bytes"));
        // Stretched over the whitespace beside it, a token of whitespace would match inside the stretch.
        for (content, side) in [(" ", "rstrip"), ("\t<x>", "lstrip"), ("<x> ", "rstrip")] {
            let mut json = built_in();
            json["added_tokens"][0]["content"] = json!(content);
            json["added_tokens"][0][side] = json!(true);
            assert!(
                refusal(&json).contains("strips whitespace beside it"),
                "{content:?}"
            );
        }
        let mut json = built_in();
        json["added_tokens"][0]["content"] = json!("<mask>");
        json["added_tokens"][0]["lstrip"] = json!(true);
        load_json(&json).expect("RoBERTa's <mask>");
        // Byte fallback makes a token of every byte of a piece, prefix included.
        let bpe = |prefix: Value| {
            json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
                "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
                "model": { "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": prefix,
                           "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": true,
                           "vocab": { "a": 0, "<0x23>": 1 }, "merges": [] }
            })
        };
        load_json(&bpe(Value::Null)).expect("byte fallback alone");
        assert!(refusal(&bpe(json!("##"))).contains("byte fallback with a word piece prefix"));
    }

    #[test]
    fn a_template_names_the_text_once() {
        let mut json = built_in();
        let text = json!({ "Sequence": { "id": "A", "type_id": 0 } });
        json["post_processor"]["single"] = json!([text, text, text]);
        assert!(refusal(&json).contains("names the text 3 times"));
    }

    #[test]
    fn pre_tokenizers_that_multiply_a_texts_length_are_refused() {
        // Each byte-level step turns every byte into a character of up to 2 bytes.
        let byte_level = json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false });
        let mut json = built_in();
        json["pre_tokenizer"] = json!({ "type": "Sequence", "pretokenizers": vec![byte_level.clone(); 16] });
        assert!(refusal(&json).contains("16 pre-tokenizer steps; at most 4"));
        json["pre_tokenizer"] = json!({ "type": "Sequence", "pretokenizers": vec![byte_level.clone(); 4] });
        assert!(refusal(&json).contains("its pre-tokenizers can make a text"));
        json["pre_tokenizer"] = json!({ "type": "Sequence", "pretokenizers": vec![byte_level; 3] });
        load_json(&json).expect("8x");
        json["pre_tokenizer"] = json!({ "type": "FixedLength", "length": 0 });
        assert!(refusal(&json).contains("FixedLength pre-tokenizer of length 0"));
    }

    #[test]
    fn the_bounds_hold_however_the_upload_spells_a_part() {
        // The library also reads a type written as a one-key map, and a model with no type at all;
        // the bounds are checked on what it read.
        let double = json!({ "type": "Replace", "pattern": { "String": "a" }, "content": "aa" });
        let mut json = built_in();
        json["normalizer"] = json!({ "type": { "Sequence": null }, "normalizers": vec![double; 10] });
        assert!(refusal(&json).contains("pre-tokenizers can make a text"));
        let mut json = unigram(&["a".repeat(1000)], &Value::Null);
        json["model"].as_object_mut().unwrap().remove("type");
        assert!(refusal(&json).contains("a Unigram piece of 1000 characters"));
    }

    #[test]
    fn reading_the_file_does_no_unbounded_work_before_its_checks() {
        // A piece of 50,000 characters is a trie 50,000 levels deep, freed recursively: a thread's
        // stack overflows, and the process with it.
        let reason = refusal(&unigram(&["a".repeat(50_000)], &Value::Null));
        assert!(reason.contains("a string of 50000 bytes"), "{reason}");
        // Adding a token normalizes it with the file's normalizers: 2^28 copies of "a" unchecked.
        let double = json!({ "type": "Replace", "pattern": { "String": "a" }, "content": "aa" });
        let mut json = built_in();
        json["normalizer"] = json!({ "type": "Sequence", "normalizers": vec![double; 28] });
        json["added_tokens"] = json!([{ "id": 30_522, "content": "a", "single_word": false, "lstrip": false,
                                        "rstrip": false, "normalized": true, "special": false }]);
        let started = Instant::now();
        assert!(refusal(&json).contains("can make a text"));
        assert!(started.elapsed().as_secs() < 5, "{:?}", started.elapsed());
        // Writing a vocabulary back walks every id up to the largest (and wraps past 2^32 - 1).
        let mut json = built_in();
        json["model"]["vocab"]["zzz"] = json!(u32::MAX);
        assert!(refusal(&json).contains("the vocabulary's ids"));
        let mut json = built_in();
        json["model"]["vocab"]["zzz"] = json!(0);
        assert!(refusal(&json).contains("the vocabulary's ids"));
        // The added tokens are added once the rest is checked, as the file has them.
        let bert = load_json(&built_in()).unwrap();
        assert_eq!(
            bert.encode("[CLS] hi [SEP]", false).unwrap().get_ids(),
            [101, 7632, 102]
        );
    }

    #[test]
    fn what_reading_builds_is_bounded_before_it_is_built() {
        // Each `\w{200}` compiles to megabytes: sixteen Sequences of sixteen would hold gigabytes.
        let split = json!({ "type": "Split", "behavior": "Isolated", "invert": false,
                            "pattern": { "Regex": "\\w{200}" } });
        let nested = json!({ "type": "Sequence", "pretokenizers": vec![split.clone(); 16] });
        let mut json = built_in();
        json["pre_tokenizer"] = json!({ "type": "Sequence", "pretokenizers": vec![nested; 16] });
        assert!(refusal(&json).contains("steps and patterns; at most 64"));
        json["pre_tokenizer"] = json!({ "type": "Sequence", "pretokenizers": vec![split; 9] });
        assert!(refusal(&json).contains("9 regular expressions; at most 8"));
        // The library also reads steps written as lists: they count too.
        let mut json = built_in();
        json["normalizer"] = json!([vec![json!(["Nmt"]); 70]]);
        assert!(refusal(&json).contains("steps and patterns; at most 64"));
        // Unigram pieces are bounded before the library builds its trie of them.
        let reason = refusal(&unigram(&["a".repeat(4000)], &Value::Null));
        assert!(reason.contains("a Unigram piece of 4000 characters"), "{reason}");
        // Added tokens matched as the normalizers make them: 16x of 1 MiB.
        let mut json = built_in();
        json["normalizer"] =
            json!({ "type": "Replace", "pattern": { "String": "a" }, "content": "a".repeat(16) });
        json["added_tokens"] = (0..MAX_ADDED_TOKEN_BYTES / 64)
            .map(|n| {
                json!({ "id": 30_522 + n, "content": format!("{n:a>64}"), "single_word": false,
                             "lstrip": false, "rstrip": false, "normalized": true, "special": false })
            })
            .collect();
        assert!(refusal(&json).contains("its normalizers can make its added tokens"));
        // A SentencePiece map far beyond a published one's size.
        let mut json = sentencepiece();
        json["normalizer"]["normalizers"][0]["precompiled_charsmap"] = json!("A".repeat(2 << 20));
        assert!(refusal(&json).contains("a precompiled_charsmap of"));
    }

    #[test]
    fn malformed_sentencepiece_maps_are_refused() {
        use base64::Engine as _;
        let map = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let mut json = sentencepiece();
        // An empty trie (the first lookup would index it), and replacements that are not UTF-8 (the
        // library panics reading them).
        // A trie of one key, "a", whose replacement runs on without an end: the scan for its end
        // stops at the longest replacement the growth bound allows.
        let mut units = vec![0u32; 2048];
        units[usize::from(b'a')] = (1 << 10) | (1 << 8) | u32::from(b'a');
        let mut unending = u32::try_from(units.len() * 4).unwrap().to_le_bytes().to_vec();
        unending.extend(units.iter().flat_map(|unit| unit.to_le_bytes()));
        unending.extend([b'x'; 100_000]);
        for (charsmap, why) in [
            (map(&[0, 0, 0, 0, b'x']), "an empty trie"),
            (map(&[0, 0, 0, 0, 0xff]), "cannot be read"),
            (map(&unending), "a replacement of more than 360 bytes"),
        ] {
            json["normalizer"]["normalizers"][0]["precompiled_charsmap"] = json!(charsmap);
            let reason = refusal(&json);
            assert!(reason.contains(why), "{reason}");
        }
    }

    #[test]
    fn a_template_adding_more_tokens_than_the_model_reads_is_refused() {
        // Truncation leaves room for the added tokens by subtracting them: more than the model reads
        // would wrap around, and every text would be read whole.
        let mut json = built_in();
        json["post_processor"]["special_tokens"]["[CLS]"] =
            json!({ "id": "[CLS]", "ids": vec![101; 40], "tokens": vec!["[CLS]"; 40] });
        let cls = json!({ "SpecialToken": { "id": "[CLS]", "type_id": 0 } });
        json["post_processor"]["single"] = json!([cls, cls, { "Sequence": { "id": "A", "type_id": 0 } }]);
        let reason = refusal(&json);
        assert!(reason.contains("adds 80 tokens"), "{reason}");
    }

    #[test]
    fn normalizers_that_multiply_a_texts_length_are_refused() {
        // Each step doubles every "a": 20 of them would make 32 KiB into 32 GiB.
        let double = json!({ "type": "Replace", "pattern": { "String": "a" }, "content": "aa" });
        let mut json = built_in();
        json["normalizer"] = json!({ "type": "Sequence", "normalizers": vec![double.clone(); 20] });
        let reason = refusal(&json);
        assert!(reason.contains("pre-tokenizers can make a text"), "{reason}");
        // An empty pattern matches between every two characters, and puts its content there.
        json["normalizer"] =
            json!({ "type": "Replace", "pattern": { "String": "" }, "content": "y".repeat(100) });
        let reason = refusal(&json);
        assert!(reason.contains("pre-tokenizers can make a text"), "{reason}");
        // Four doublings (16x) are within bounds, and a long sequence of steps is refused as such.
        json["normalizer"] = json!({ "type": "Sequence", "normalizers": vec![double.clone(); 4] });
        load_json(&json).expect("16x");
        json["normalizer"] =
            json!({ "type": "Sequence", "normalizers": vec![json!({ "type": "Lowercase" }); 33] });
        let reason = refusal(&json);
        assert!(reason.contains("a Sequence of 33 normalizers"), "{reason}");
    }

    #[test]
    fn only_published_regular_expressions_are_taken() {
        let mut json = built_in();
        for pattern in [
            r"(a+)+\1",
            r"(?=a)b",
            r"a+b|\s+(?!\S)",
            r"(?>a+)b",
            r"a*b|a",
            r"\s+",
        ] {
            json["pre_tokenizer"] = json!({
                "type": "Split", "behavior": "Isolated", "invert": false, "pattern": { "Regex": pattern }
            });
            let reason = refusal(&json);
            assert!(
                reason.contains("not one of the published patterns"),
                "{pattern}: {reason}"
            );
        }
        json["pre_tokenizer"] = json!({
            "type": "Split", "behavior": "Isolated", "invert": false, "pattern": { "String": "a" }
        });
        load_json(&json).expect("a literal pattern");
        // A long literal is matched as a regular expression too, slowly: 4 KiB took seconds a text.
        json["normalizer"] =
            json!({ "type": "Replace", "pattern": { "String": "a".repeat(4095) + "b" }, "content": "" });
        assert!(refusal(&json).contains("a literal pattern of 4096 bytes; at most 64"));
        assert_eq!(shortest_match(" {2,}"), Ok(2));
    }

    #[test]
    fn long_unigram_pieces_are_refused_and_short_ones_stay_fast() {
        // Pieces "a", "aa", … of every length make each character of "aaa…" start a match of each.
        let pieces: Vec<String> = (1..=2000).map(|n| "a".repeat(n)).collect();
        let reason = refusal(&unigram(&pieces, &Value::Null));
        assert!(reason.contains("a Unigram piece of 2000 characters"), "{reason}");
        let pieces: Vec<String> = (1..=MAX_UNIGRAM_PIECE_CHARS).map(|n| "a".repeat(n)).collect();
        let tokenizer = load_json(&unigram(&pieces, &Value::Null)).expect("pieces of 32");
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
        // Byte-level pre-tokenizing with a space before each piece: "a" becomes "Ġa" (3 bytes).
        let byte_level =
            json!({ "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true });
        assert_eq!(
            pre_tokenizer_growth(&byte_level),
            Ok(Growth { factor: 4, extra: 2 })
        );
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
