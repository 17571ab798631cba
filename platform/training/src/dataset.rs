//! Labelled text as tenants upload it: JSON Lines (`{"text": …, "label": …}` per line) or CSV with a
//! header naming `text` and `label` columns. Parsed and checked in one pass; every refusal names the
//! line it found the problem on.

use std::collections::HashMap;

use plinth_core::training::{DatasetSummary, LabelCount};
use serde::{Deserialize, Serialize};

/// One labelled text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub text: String,
    pub label: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
}

impl Format {
    /// From a file name's extension (`.jsonl`, `.ndjson`, `.json`, `.csv`) or, failing that, a media type.
    #[must_use]
    pub fn detect(file_name: Option<&str>, media_type: Option<&str>) -> Option<Self> {
        let extension = file_name
            .and_then(|name| name.rsplit_once('.'))
            .map(|(_, ext)| ext.to_ascii_lowercase());
        match extension.as_deref() {
            Some("jsonl" | "ndjson" | "json") => return Some(Self::Jsonl),
            Some("csv") => return Some(Self::Csv),
            _ => {}
        }
        match media_type.map(|m| m.split(';').next().unwrap_or("").trim().to_ascii_lowercase()) {
            Some(m) if m == "application/jsonl" || m == "application/x-ndjson" || m == "application/json" => {
                Some(Self::Jsonl)
            }
            Some(m) if m == "text/csv" => Some(Self::Csv),
            _ => None,
        }
    }

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Jsonl => "jsonl",
            Self::Csv => "csv",
        }
    }
}

/// What a dataset may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_examples: usize,
    /// Characters per text (the base model reads far fewer tokens than this anyway).
    pub max_text_chars: usize,
    pub max_labels: usize,
    /// Bytes per label.
    pub max_label_bytes: usize,
    /// Examples every label needs: enough for each split to hold some.
    pub min_per_label: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_examples: 50_000,
            max_text_chars: 10_000,
            max_labels: 100,
            max_label_bytes: 100,
            min_per_label: 10,
        }
    }
}

/// Why a dataset was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DatasetError(pub String);

fn at(line: usize, message: impl std::fmt::Display) -> DatasetError {
    DatasetError(format!("line {line}: {message}"))
}

/// Parses and checks a dataset.
///
/// # Errors
/// Text that is not UTF-8, malformed lines or rows, empty texts or labels, texts or labels past the
/// limits, too many examples or labels, a single label, or a label with too few examples.
pub fn parse(bytes: &[u8], format: Format, limits: &Limits) -> Result<Vec<Example>, DatasetError> {
    let text = std::str::from_utf8(bytes).map_err(|err| {
        let line = bytes[..err.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
        at(line, "the file is not UTF-8 text")
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let examples = match format {
        Format::Jsonl => parse_jsonl(text, limits)?,
        Format::Csv => parse_csv(text, limits)?,
    };
    check_labels(&examples, limits)?;
    Ok(examples)
}

fn check_example(line: usize, text: &str, label: &str, limits: &Limits) -> Result<Example, DatasetError> {
    let text = text.trim().to_owned();
    let label = label.trim().to_owned();
    if text.is_empty() {
        return Err(at(line, "the text is empty"));
    }
    if text
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        return Err(at(line, "the text holds control characters"));
    }
    if text.chars().count() > limits.max_text_chars {
        return Err(at(
            line,
            format!("the text is longer than {} characters", limits.max_text_chars),
        ));
    }
    if label.is_empty() {
        return Err(at(line, "the label is empty"));
    }
    if label.len() > limits.max_label_bytes || label.chars().any(char::is_control) {
        return Err(at(
            line,
            format!(
                "labels are 1-{} bytes without control characters",
                limits.max_label_bytes
            ),
        ));
    }
    Ok(Example { text, label })
}

fn push(
    examples: &mut Vec<Example>,
    example: Example,
    line: usize,
    limits: &Limits,
) -> Result<(), DatasetError> {
    if examples.len() == limits.max_examples {
        return Err(at(
            line,
            format!("a dataset holds at most {} examples", limits.max_examples),
        ));
    }
    examples.push(example);
    Ok(())
}

fn parse_jsonl(text: &str, limits: &Limits) -> Result<Vec<Example>, DatasetError> {
    #[derive(Deserialize)]
    struct Line {
        text: serde_json::Value,
        label: serde_json::Value,
    }
    let mut examples = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let parsed: Line = serde_json::from_str(raw).map_err(|err| {
            at(
                line,
                format!("expected {{\"text\": \"…\", \"label\": \"…\"}}: {err}"),
            )
        })?;
        let serde_json::Value::String(text) = parsed.text else {
            return Err(at(line, "`text` must be a string"));
        };
        let label = match parsed.label {
            serde_json::Value::String(label) => label,
            serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            _ => return Err(at(line, "`label` must be a string, an integer or a boolean")),
        };
        let example = check_example(line, &text, &label, limits)?;
        push(&mut examples, example, line, limits)?;
    }
    Ok(examples)
}

fn parse_csv(text: &str, limits: &Limits) -> Result<Vec<Example>, DatasetError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|err| at(1, format!("the header row: {err}")))?
        .clone();
    let column = |name: &str| headers.iter().position(|h| h.trim().eq_ignore_ascii_case(name));
    let (Some(text_column), Some(label_column)) = (column("text"), column("label")) else {
        return Err(at(1, "the header row must name a `text` and a `label` column"));
    };
    let mut examples = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|err| {
            let line = err
                .position()
                .map_or(0, |p| usize::try_from(p.line()).unwrap_or(usize::MAX));
            at(line, format!("malformed row: {err}"))
        })?;
        let line = record
            .position()
            .map_or(0, |p| usize::try_from(p.line()).unwrap_or(usize::MAX));
        if record.iter().all(|field| field.trim().is_empty()) {
            continue;
        }
        let field = |i: usize| record.get(i).unwrap_or_default().to_owned();
        let example = check_example(line, &field(text_column), &field(label_column), limits)?;
        push(&mut examples, example, line, limits)?;
    }
    Ok(examples)
}

fn check_labels(examples: &[Example], limits: &Limits) -> Result<(), DatasetError> {
    let summary = summarize(examples);
    if examples.is_empty() {
        return Err(DatasetError("the dataset holds no examples".into()));
    }
    if summary.labels.len() < 2 {
        return Err(DatasetError(format!(
            "every example has the label `{}`: a classifier needs at least two labels",
            summary.labels[0].label
        )));
    }
    if summary.labels.len() > limits.max_labels {
        return Err(DatasetError(format!(
            "{} labels: a dataset may have at most {}",
            summary.labels.len(),
            limits.max_labels
        )));
    }
    let sparse: Vec<String> = summary
        .labels
        .iter()
        .filter(|l| l.examples < limits.min_per_label as u64)
        .map(|l| format!("`{}` ({})", l.label, l.examples))
        .collect();
    if !sparse.is_empty() {
        return Err(DatasetError(format!(
            "each label needs at least {} examples; too few for {}",
            limits.min_per_label,
            sparse.join(", ")
        )));
    }
    Ok(())
}

/// Examples per label (in first-seen order) and text lengths.
#[must_use]
pub fn summarize(examples: &[Example]) -> DatasetSummary {
    let mut labels: Vec<LabelCount> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    let (mut min, mut max, mut total) = (u64::MAX, 0_u64, 0_u64);
    for example in examples {
        let i = *index.entry(&example.label).or_insert_with(|| {
            labels.push(LabelCount {
                label: example.label.clone(),
                examples: 0,
            });
            labels.len() - 1
        });
        labels[i].examples += 1;
        let chars = example.text.chars().count() as u64;
        min = min.min(chars);
        max = max.max(chars);
        total += chars;
    }
    let count = examples.len() as u64;
    DatasetSummary {
        examples: count,
        labels,
        min_chars: if count == 0 { 0 } else { min },
        mean_chars: total.checked_div(count).unwrap_or(0),
        max_chars: max,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(labels: &[(&str, usize)]) -> String {
        let mut out = String::new();
        for (label, n) in labels {
            for i in 0..*n {
                out.push_str(&format!(
                    "{{\"text\": \"message {i} about {label}\", \"label\": \"{label}\"}}\n"
                ));
            }
        }
        out
    }

    #[test]
    fn jsonl_and_csv_give_the_same_examples() {
        let jsonl = lines(&[("billing", 10), ("bug", 12)]);
        let from_jsonl = parse(jsonl.as_bytes(), Format::Jsonl, &Limits::default()).unwrap();
        let mut csv = String::from("label,text\n");
        for e in &from_jsonl {
            csv.push_str(&format!("{},\"{}\"\n", e.label, e.text));
        }
        let from_csv = parse(csv.as_bytes(), Format::Csv, &Limits::default()).unwrap();
        assert_eq!(from_jsonl, from_csv);
        let summary = summarize(&from_csv);
        assert_eq!(summary.examples, 22);
        assert_eq!(
            summary.labels[0],
            LabelCount {
                label: "billing".into(),
                examples: 10
            }
        );
    }

    #[test]
    fn refusals_name_the_line() {
        let limits = Limits::default();
        let mut bad = lines(&[("a", 10), ("b", 10)]);
        bad.push_str("{\"text\": \"   \", \"label\": \"a\"}\n");
        assert_eq!(
            parse(bad.as_bytes(), Format::Jsonl, &limits).unwrap_err().0,
            "line 21: the text is empty"
        );

        let one_label = lines(&[("only", 30)]);
        assert!(
            parse(one_label.as_bytes(), Format::Jsonl, &limits)
                .unwrap_err()
                .0
                .contains("at least two labels")
        );

        let sparse = lines(&[("a", 30), ("b", 3)]);
        assert!(
            parse(sparse.as_bytes(), Format::Jsonl, &limits)
                .unwrap_err()
                .0
                .contains("`b` (3)")
        );

        let mut latin1 = b"text,label\nna\xefve,a\n".to_vec();
        latin1.extend_from_slice(b"x,b\n");
        assert_eq!(
            parse(&latin1, Format::Csv, &limits).unwrap_err().0,
            "line 2: the file is not UTF-8 text"
        );

        assert!(
            parse(b"words,label\nx,a\n", Format::Csv, &limits)
                .unwrap_err()
                .0
                .contains("`text`")
        );
        assert!(
            parse(b"{\"text\": 5, \"label\": \"a\"}", Format::Jsonl, &limits)
                .unwrap_err()
                .0
                .contains("string")
        );
        assert!(
            parse(b"", Format::Jsonl, &limits)
                .unwrap_err()
                .0
                .contains("no examples")
        );

        let capped = Limits {
            max_examples: 15,
            ..limits
        };
        let many = lines(&[("a", 10), ("b", 10)]);
        assert!(
            parse(many.as_bytes(), Format::Jsonl, &capped)
                .unwrap_err()
                .0
                .starts_with("line 16:")
        );
    }

    #[test]
    fn formats_come_from_the_name_or_the_media_type() {
        assert_eq!(Format::detect(Some("tickets.CSV"), None), Some(Format::Csv));
        assert_eq!(
            Format::detect(Some("t.jsonl"), Some("text/csv")),
            Some(Format::Jsonl)
        );
        assert_eq!(
            Format::detect(None, Some("application/x-ndjson; charset=utf-8")),
            Some(Format::Jsonl)
        );
        assert_eq!(
            Format::detect(Some("data.bin"), Some("application/octet-stream")),
            None
        );
    }

    proptest::proptest! {
        /// Whatever the bytes, parsing answers (an error or examples that satisfy the limits).
        #[test]
        fn parsing_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512), csv in proptest::prelude::any::<bool>()) {
            let limits = Limits { min_per_label: 1, ..Limits::default() };
            let format = if csv { Format::Csv } else { Format::Jsonl };
            if let Ok(examples) = parse(&bytes, format, &limits) {
                proptest::prop_assert!(examples.iter().all(|e| !e.text.is_empty() && !e.label.is_empty()));
            }
        }
    }
}
