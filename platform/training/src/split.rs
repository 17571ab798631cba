//! Stratified three-way split: each label's examples are shuffled (seeded) and divided, so every split
//! holds every label in about the dataset's proportions.

use rand::SeedableRng;
use rand::seq::SliceRandom;

/// Share of each label held out for the final evaluation.
pub const TEST_FRACTION: f64 = 0.2;
/// Share of the rest held out for early stopping.
pub const VALIDATION_FRACTION: f64 = 0.15;

/// Indices into the dataset.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Split {
    pub train: Vec<usize>,
    pub validation: Vec<usize>,
    pub test: Vec<usize>,
}

/// How many of `n` go to a held-out share: at least one when there are three or more, so each split
/// sees the label.
fn held_out(n: usize, fraction: f64) -> usize {
    if n < 3 {
        return 0;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "counts far below 2^52"
    )]
    let share = (n as f64 * fraction).round() as usize;
    share.clamp(1, n - 2)
}

/// Splits examples by their label index (`labels[i]` < `label_count`).
#[must_use]
pub fn stratified(labels: &[usize], label_count: usize, seed: u64) -> Split {
    let mut by_label = vec![Vec::new(); label_count];
    for (i, &label) in labels.iter().enumerate() {
        by_label[label].push(i);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut split = Split::default();
    for mut members in by_label {
        members.shuffle(&mut rng);
        let test = held_out(members.len(), TEST_FRACTION);
        let validation = held_out(members.len() - test, VALIDATION_FRACTION);
        split.test.extend_from_slice(&members[..test]);
        split
            .validation
            .extend_from_slice(&members[test..test + validation]);
        split.train.extend_from_slice(&members[test + validation..]);
    }
    split
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_is_in_every_split_and_nothing_is_in_two() {
        let labels: Vec<usize> = (0..10).map(|_| 0).chain((0..90).map(|_| 1)).collect();
        let split = stratified(&labels, 2, 7);
        for part in [&split.train, &split.validation, &split.test] {
            assert!(part.iter().any(|&i| labels[i] == 0) && part.iter().any(|&i| labels[i] == 1));
        }
        let mut all: Vec<usize> = [&split.train, &split.validation, &split.test]
            .into_iter()
            .flatten()
            .copied()
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(split.test.len(), 2 + 18);
        // Seeded: the same split again.
        assert_eq!(split, stratified(&labels, 2, 7));
        assert_ne!(split, stratified(&labels, 2, 8));
    }
}
