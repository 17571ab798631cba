//! A customer-service assistant. Given a customer's message, it finds the best answer in the tenant's
//! FAQ by meaning (sentence embeddings, cosine similarity) and decides whether a human should take
//! over: when the customer is upset (negative sentiment above a threshold) or no answer fits well.
//!
//! Settings: `faq` (a list of `{question, answer}`, required), `min_similarity` (default 0.45),
//! `escalate_negative_above` (default 0.6). The FAQ's embeddings are computed once and kept in the
//! installation's key-value store until the FAQ changes.

use plinth_plugin::{Error, Plugin, Value, config, inference, json, kv, log};
use serde::{Deserialize, Serialize};

const EMBEDDER: &str = "minilm-embed";
const SENTIMENT: &str = "sentiment";
const CACHE_KEY: &str = "faq-embeddings";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    question: String,
    answer: String,
}

/// The FAQ's question embeddings, with the questions they were computed from.
#[derive(Debug, Serialize, Deserialize)]
struct Cached {
    questions: Vec<String>,
    vectors: Vec<Vec<f32>>,
}

fn faq_vectors(faq: &[Entry]) -> Result<Vec<Vec<f32>>, Error> {
    let questions: Vec<String> = faq.iter().map(|e| e.question.clone()).collect();
    if let Some(cached) = kv::get_json::<Cached>(CACHE_KEY)?
        && cached.questions == questions
    {
        return Ok(cached.vectors);
    }
    log::info(&format!("embedding {} FAQ questions", questions.len()));
    let texts: Vec<&str> = questions.iter().map(String::as_str).collect();
    let vectors = inference::embed(EMBEDDER, &texts)?;
    kv::set_json(CACHE_KEY, &Cached {
        questions,
        vectors: vectors.clone(),
    })?;
    Ok(vectors)
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let denominator = norm(a) * norm(b);
    if denominator == 0.0 { 0.0 } else { dot / denominator }
}

struct CustomerService;

impl Plugin for CustomerService {
    fn handle(request: Value) -> Result<Value, Error> {
        let message = request["message"]
            .as_str()
            .filter(|m| !m.trim().is_empty())
            .ok_or_else(|| Error::invalid("`message` (a non-empty string) is required"))?;
        let faq: Vec<Entry> = config::get("faq")?
            .filter(|faq: &Vec<Entry>| !faq.is_empty())
            .ok_or_else(|| Error::failed("the installation has no `faq` setting"))?;
        let min_similarity: f32 = config::get("min_similarity")?.unwrap_or(0.45);
        let escalate_above: f32 = config::get("escalate_negative_above")?.unwrap_or(0.6);

        let vectors = faq_vectors(&faq)?;
        let asked = inference::embed(EMBEDDER, &[message])?
            .pop()
            .ok_or_else(|| Error::failed("the embedding model returned nothing"))?;
        let (best, similarity) = vectors
            .iter()
            .map(|v| cosine(&asked, v))
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .ok_or_else(|| Error::failed("the FAQ is empty"))?;

        let mood = inference::classify(SENTIMENT, &[message])?
            .pop()
            .ok_or_else(|| Error::failed("the sentiment model returned nothing"))?;
        let negative = mood
            .scores
            .iter()
            .find(|s| s.label == "negative")
            .map_or(0.0, |s| s.score);

        let matched = similarity >= min_similarity;
        let reason = if negative > escalate_above {
            Some("the customer seems upset")
        } else if !matched {
            Some("no FAQ answer fits the question")
        } else {
            None
        };
        Ok(json!({
            "answer": matched.then(|| faq[best].answer.clone()),
            "matched_question": faq[best].question,
            "similarity": similarity,
            "sentiment": { "label": mood.label, "negative": negative },
            "escalate": reason.is_some(),
            "reason": reason,
        }))
    }
}

plinth_plugin::register!(CustomerService);
