//! Sentiment monitoring for a topic (a ticker, a brand): scores each incoming text (news headlines,
//! posts) with the sentiment model, keeps a rolling window of recent scores per topic, and raises an
//! alert when the share of negative texts in the window crosses a threshold.
//!
//! Settings: `window` (texts kept per topic, default 50), `negative_share_alert` (default 0.4),
//! `min_samples` (texts needed before alerting, default 5).

use plinth_plugin::{Error, Plugin, Value, config, inference, json, kv};
use serde::{Deserialize, Serialize};

const SENTIMENT: &str = "sentiment";
const MAX_TEXTS: usize = 64;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Window {
    /// The most recent labels, oldest first.
    labels: Vec<String>,
}

fn share(labels: &[String], label: &str) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    labels.iter().filter(|l| *l == label).count() as f64 / labels.len() as f64
}

struct SentimentMonitor;

impl Plugin for SentimentMonitor {
    fn handle(request: Value) -> Result<Value, Error> {
        let topic = request["topic"]
            .as_str()
            .filter(|t| !t.is_empty() && t.len() <= 64)
            .ok_or_else(|| Error::invalid("`topic` (1-64 characters) is required"))?;
        let texts: Vec<&str> = request["texts"]
            .as_array()
            .map(|texts| texts.iter().filter_map(Value::as_str).collect())
            .filter(|texts: &Vec<&str>| !texts.is_empty() && texts.len() <= MAX_TEXTS)
            .ok_or_else(|| Error::invalid(format!("`texts` (1-{MAX_TEXTS} strings) is required")))?;
        let window_size: usize = config::get("window")?.unwrap_or(50).clamp(1, 1_000);
        let threshold: f64 = config::get("negative_share_alert")?.unwrap_or(0.4);
        let min_samples: usize = config::get("min_samples")?.unwrap_or(5);

        let scored = inference::classify(SENTIMENT, &texts)?;
        let key = format!("window:{topic}");
        let mut window: Window = kv::get_json(&key)?.unwrap_or_default();
        window.labels.extend(scored.iter().map(|c| c.label.clone()));
        let excess = window.labels.len().saturating_sub(window_size);
        window.labels.drain(..excess);
        kv::set_json(&key, &window)?;

        let negative_share = share(&window.labels, "negative");
        let alert = (window.labels.len() >= min_samples && negative_share >= threshold).then(|| {
            json!({
                "topic": topic,
                "negative_share": negative_share,
                "threshold": threshold,
                "message": format!(
                    "{:.0}% of the last {} texts about {topic} are negative",
                    negative_share * 100.0,
                    window.labels.len()
                ),
            })
        });
        Ok(json!({
            "topic": topic,
            "scored": texts.iter().zip(&scored).map(|(text, c)| json!({
                "text": text, "label": c.label, "score": c.score,
            })).collect::<Vec<_>>(),
            "window": {
                "size": window.labels.len(),
                "negative_share": negative_share,
                "positive_share": share(&window.labels, "positive"),
            },
            "alert": alert,
        }))
    }
}

plinth_plugin::register!(SentimentMonitor);
