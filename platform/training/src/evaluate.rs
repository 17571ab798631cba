//! Scores a head on held-out examples: accuracy, macro-F1, per-label precision and recall, and the
//! confusion matrix.

use plinth_core::training::{Evaluation, LabelMetrics};

use crate::head::{Examples, Head};

#[expect(clippy::cast_precision_loss, reason = "example counts are far below 2^52")]
fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// The head's predictions on `data` against its labels.
#[must_use]
pub fn evaluate(head: &Head, data: Examples<'_>) -> Evaluation {
    let k = head.labels.len();
    let mut confusion = vec![vec![0_u64; k]; k];
    for (x, &y) in data.x.iter().zip(data.y) {
        confusion[y][head.predict(x)] += 1;
    }
    from_confusion(&head.labels, confusion)
}

/// The metrics of a confusion matrix (`confusion[truth][prediction]`).
#[must_use]
pub fn from_confusion(labels: &[String], confusion: Vec<Vec<u64>>) -> Evaluation {
    let total: u64 = confusion.iter().flatten().sum();
    let correct: u64 = (0..labels.len()).map(|i| confusion[i][i]).sum();
    let metrics: Vec<LabelMetrics> = labels
        .iter()
        .enumerate()
        .map(|(i, label)| {
            let support: u64 = confusion[i].iter().sum();
            let predicted: u64 = confusion.iter().map(|row| row[i]).sum();
            let (precision, recall) = (ratio(confusion[i][i], predicted), ratio(confusion[i][i], support));
            let f1 = if precision + recall > 0.0 {
                2.0 * precision * recall / (precision + recall)
            } else {
                0.0
            };
            LabelMetrics {
                label: label.clone(),
                precision,
                recall,
                f1,
                support,
            }
        })
        .collect();
    #[expect(clippy::cast_precision_loss, reason = "at most a hundred labels")]
    let macro_f1 = metrics.iter().map(|m| m.f1).sum::<f64>() / metrics.len().max(1) as f64;
    Evaluation {
        examples: total,
        accuracy: ratio(correct, total),
        macro_f1,
        labels: metrics,
        confusion,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_follow_the_confusion_matrix() {
        let labels: Vec<String> = ["spam", "ham"].map(String::from).to_vec();
        // 8 spam: 6 caught, 2 missed; 12 ham: 1 flagged as spam.
        let e = from_confusion(&labels, vec![vec![6, 2], vec![1, 11]]);
        assert_eq!(e.examples, 20);
        assert!((e.accuracy - 17.0 / 20.0).abs() < 1e-12);
        let spam = &e.labels[0];
        assert!((spam.precision - 6.0 / 7.0).abs() < 1e-12);
        assert!((spam.recall - 0.75).abs() < 1e-12);
        assert_eq!(spam.support, 8);
        let f1 = |p: f64, r: f64| 2.0 * p * r / (p + r);
        let expected = (f1(6.0 / 7.0, 0.75) + f1(11.0 / 13.0, 11.0 / 12.0)) / 2.0;
        assert!((e.macro_f1 - expected).abs() < 1e-12);
        // A label never predicted has precision 0, not NaN.
        let never = from_confusion(&labels, vec![vec![0, 3], vec![0, 5]]);
        assert_eq!(never.labels[0].precision, 0.0);
        assert_eq!(never.labels[0].f1, 0.0);
    }
}
