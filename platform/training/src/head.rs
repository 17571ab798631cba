//! A classification head over fixed embeddings: multinomial logistic regression (softmax over
//! `W·x + b`) with an L2 penalty, trained by mini-batch Adam with early stopping on the validation
//! loss. Written here rather than taken from a library: the loop must checkpoint after every epoch (a
//! restarted job resumes where it was), report progress and stop when cancelled, which a library's
//! `fit` does not allow; the arithmetic is a few dozen lines over `f32` slices.

use std::ops::ControlFlow;

use plinth_core::training::Hyperparameters;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

/// Settings with every default filled in and every bound checked.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub epochs: u32,
    pub learning_rate: f64,
    pub batch_size: u32,
    pub l2: f64,
    pub patience: u32,
    pub seed: u64,
}

impl Settings {
    /// Fills in defaults (the L2 penalty from the training examples: `1 / n`, scikit-learn's `C = 1`).
    ///
    /// # Errors
    /// A setting out of its range, naming it.
    pub fn resolve(given: &Hyperparameters, train_examples: usize) -> Result<Self, String> {
        let settings = Self {
            epochs: given.epochs.unwrap_or(100),
            learning_rate: given.learning_rate.unwrap_or(0.01),
            batch_size: given.batch_size.unwrap_or(32),
            #[expect(clippy::cast_precision_loss, reason = "example counts are far below 2^52")]
            l2: given.l2.unwrap_or(1.0 / train_examples.max(1) as f64),
            patience: given.patience.unwrap_or(5),
            seed: given.seed.unwrap_or(0),
        };
        if !(1..=200).contains(&settings.epochs) {
            return Err("hyperparameters.epochs: 1-200".into());
        }
        if !(settings.learning_rate > 0.0 && settings.learning_rate <= 1.0) {
            return Err("hyperparameters.learning_rate: greater than 0, at most 1".into());
        }
        if !(1..=1024).contains(&settings.batch_size) {
            return Err("hyperparameters.batch_size: 1-1024".into());
        }
        if !(0.0..=10.0).contains(&settings.l2) {
            return Err("hyperparameters.l2: 0-10".into());
        }
        if !(1..=50).contains(&settings.patience) {
            return Err("hyperparameters.patience: 1-50".into());
        }
        Ok(settings)
    }

    #[must_use]
    pub fn as_hyperparameters(&self) -> Hyperparameters {
        Hyperparameters {
            epochs: Some(self.epochs),
            learning_rate: Some(self.learning_rate),
            batch_size: Some(self.batch_size),
            l2: Some(self.l2),
            patience: Some(self.patience),
            seed: Some(self.seed),
        }
    }
}

/// A trained head: `labels.len()` rows of `dim` weights, and a bias per label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Head {
    pub labels: Vec<String>,
    pub dim: usize,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

impl Head {
    fn from_params(labels: Vec<String>, dim: usize, params: &[f32]) -> Self {
        let k = labels.len();
        Self {
            weight: params[..k * dim].to_vec(),
            bias: params[k * dim..].to_vec(),
            labels,
            dim,
        }
    }

    /// Each label's probability for one embedding.
    #[must_use]
    pub fn probabilities(&self, x: &[f32]) -> Vec<f32> {
        let mut scores = vec![0.0; self.labels.len()];
        logits(&self.weight, &self.bias, self.dim, x, &mut scores);
        softmax(&mut scores);
        scores
    }

    /// The most likely label's index.
    #[must_use]
    pub fn predict(&self, x: &[f32]) -> usize {
        argmax(&self.probabilities(x))
    }
}

fn logits(weight: &[f32], bias: &[f32], dim: usize, x: &[f32], out: &mut [f32]) {
    for (k, score) in out.iter_mut().enumerate() {
        let row = &weight[k * dim..(k + 1) * dim];
        *score = bias[k] + row.iter().zip(x).map(|(w, v)| w * v).sum::<f32>();
    }
}

fn softmax(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    for s in scores.iter_mut() {
        *s /= sum;
    }
}

pub(crate) fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// Embeddings and their label indices.
#[derive(Debug, Clone, Copy)]
pub struct Examples<'a> {
    pub x: &'a [Vec<f32>],
    pub y: &'a [usize],
}

/// One epoch's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    pub epoch: u32,
    pub train_loss: f64,
    pub validation_loss: f64,
    pub validation_accuracy: f64,
}

/// Everything needed to continue training after the epoch it was taken at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub epoch: u32,
    params: Vec<f32>,
    first_moment: Vec<f32>,
    second_moment: Vec<f32>,
    steps: u64,
    best: Vec<f32>,
    best_loss: f64,
    epochs_since_best: u32,
    pub last: Option<EpochStats>,
    /// Early stopping fired, or the last epoch ran.
    pub done: bool,
}

impl Checkpoint {
    fn start(labels: usize, dim: usize) -> Self {
        let n = labels * (dim + 1);
        Self {
            epoch: 0,
            params: vec![0.0; n],
            first_moment: vec![0.0; n],
            second_moment: vec![0.0; n],
            steps: 0,
            best: vec![0.0; n],
            best_loss: f64::INFINITY,
            epochs_since_best: 0,
            last: None,
            done: false,
        }
    }

    /// The head with the best validation loss so far.
    #[must_use]
    pub fn best_head(&self, labels: &[String], dim: usize) -> Head {
        Head::from_params(labels.to_vec(), dim, &self.best)
    }

    fn fits(&self, labels: usize, dim: usize) -> bool {
        let n = labels * (dim + 1);
        [&self.params, &self.first_moment, &self.second_moment, &self.best]
            .iter()
            .all(|p| p.len() == n)
    }
}

/// Mean cross-entropy and accuracy of `params` on `data`.
fn score(params: &[f32], labels: usize, dim: usize, data: Examples<'_>) -> (f64, f64) {
    let (weight, bias) = params.split_at(labels * dim);
    let mut scores = vec![0.0; labels];
    let (mut loss, mut correct) = (0.0_f64, 0_usize);
    for (x, &y) in data.x.iter().zip(data.y) {
        logits(weight, bias, dim, x, &mut scores);
        softmax(&mut scores);
        loss -= f64::from(scores[y].max(1e-12)).ln();
        correct += usize::from(argmax(&scores) == y);
    }
    #[expect(clippy::cast_precision_loss, reason = "example counts are far below 2^52")]
    let n = data.y.len().max(1) as f64;
    #[expect(clippy::cast_precision_loss, reason = "example counts are far below 2^52")]
    (loss / n, correct as f64 / n)
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPSILON: f64 = 1e-8;
/// A validation loss must drop by this much to count as better.
const MIN_IMPROVEMENT: f64 = 1e-4;

/// Trains (or, from `resume`, goes on training) until early stopping or the last epoch, calling
/// `after_epoch` with a checkpoint after each; it stops early when that returns `Break`.
///
/// # Panics
/// When an embedding's length differs from `dim` or a label index is out of range.
pub fn train(
    settings: &Settings,
    labels: usize,
    dim: usize,
    train: Examples<'_>,
    validation: Examples<'_>,
    resume: Option<Checkpoint>,
    mut after_epoch: impl FnMut(&Checkpoint) -> ControlFlow<()>,
) -> Checkpoint {
    assert!(
        train.x.iter().chain(validation.x).all(|x| x.len() == dim),
        "embeddings of another width"
    );
    assert!(
        train.y.iter().chain(validation.y).all(|&y| y < labels),
        "label out of range"
    );
    let mut state = resume
        .filter(|c| c.fits(labels, dim))
        .unwrap_or_else(|| Checkpoint::start(labels, dim));
    let batch = settings.batch_size as usize;
    let mut order: Vec<usize> = (0..train.y.len()).collect();
    let mut gradient = vec![0.0_f32; labels * (dim + 1)];
    let mut scores = vec![0.0_f32; labels];
    while !state.done && state.epoch < settings.epochs {
        let epoch = state.epoch + 1;
        // Seeded per epoch, so a resumed run shuffles as the uninterrupted one would have.
        order.sort_unstable();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
            settings.seed ^ u64::from(epoch).rotate_left(32),
        ));
        for chunk in order.chunks(batch) {
            gradient.fill(0.0);
            let (weight, bias) = state.params.split_at(labels * dim);
            for &i in chunk {
                let x = &train.x[i];
                logits(weight, bias, dim, x, &mut scores);
                softmax(&mut scores);
                scores[train.y[i]] -= 1.0;
                for (k, &delta) in scores.iter().enumerate() {
                    let row = &mut gradient[k * dim..(k + 1) * dim];
                    for (g, v) in row.iter_mut().zip(x) {
                        *g += delta * v;
                    }
                    gradient[labels * dim + k] += delta;
                }
            }
            #[expect(clippy::cast_precision_loss, reason = "batch sizes are at most 1024")]
            let scale = 1.0 / chunk.len() as f32;
            #[expect(clippy::cast_possible_truncation, reason = "the penalty is at most 10")]
            let l2 = settings.l2 as f32;
            state.steps += 1;
            let t = i32::try_from(state.steps).unwrap_or(i32::MAX);
            let correction1 = 1.0 - BETA1.powi(t);
            let correction2 = 1.0 - BETA2.powi(t);
            for (j, g) in gradient.iter().enumerate() {
                let mut g = f64::from(g * scale);
                if j < labels * dim {
                    g += f64::from(l2 * state.params[j]);
                }
                let m = BETA1.mul_add(f64::from(state.first_moment[j]), (1.0 - BETA1) * g);
                let v = BETA2.mul_add(f64::from(state.second_moment[j]), (1.0 - BETA2) * g * g);
                #[expect(clippy::cast_possible_truncation, reason = "Adam's moments are stored in f32")]
                {
                    state.first_moment[j] = m as f32;
                    state.second_moment[j] = v as f32;
                    let step =
                        settings.learning_rate * (m / correction1) / ((v / correction2).sqrt() + EPSILON);
                    state.params[j] -= step as f32;
                }
            }
        }
        let (train_loss, _) = score(&state.params, labels, dim, train);
        let (validation_loss, validation_accuracy) = score(&state.params, labels, dim, validation);
        state.epoch = epoch;
        if validation_loss < state.best_loss - MIN_IMPROVEMENT {
            state.best_loss = validation_loss;
            state.best.clone_from(&state.params);
            state.epochs_since_best = 0;
        } else {
            state.epochs_since_best += 1;
        }
        state.last = Some(EpochStats {
            epoch,
            train_loss,
            validation_loss,
            validation_accuracy,
        });
        state.done = state.epochs_since_best >= settings.patience || epoch >= settings.epochs;
        if after_epoch(&state).is_break() {
            break;
        }
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two noisy clusters per label on the unit sphere in 8 dimensions.
    fn blobs(n: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<usize>) {
        use rand::Rng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let centres = [[1.0, 0.2, 0.0, 0.0], [0.0, 1.0, 0.3, 0.0], [0.1, 0.0, 0.0, 1.0]];
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in 0..n {
            let label = i % 3;
            let mut v: Vec<f32> = (0..8)
                .map(|d| centres[label].get(d).copied().unwrap_or(0.0) + rng.random_range(-0.35..0.35))
                .collect();
            let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
            v.iter_mut().for_each(|a| *a /= norm);
            x.push(v);
            y.push(label);
        }
        (x, y)
    }

    fn settings() -> Settings {
        Settings::resolve(
            &Hyperparameters {
                learning_rate: Some(0.05),
                ..Hyperparameters::default()
            },
            300,
        )
        .unwrap()
    }

    #[test]
    fn learns_separable_labels_and_stops_early() {
        let (x, y) = blobs(300, 1);
        let (vx, vy) = blobs(90, 2);
        let mut epochs = 0;
        let done = train(
            &settings(),
            3,
            8,
            Examples { x: &x, y: &y },
            Examples { x: &vx, y: &vy },
            None,
            |_| {
                epochs += 1;
                ControlFlow::Continue(())
            },
        );
        assert!(done.done);
        assert!(
            done.epoch < 100,
            "early stopping ended the run at epoch {}",
            done.epoch
        );
        assert_eq!(epochs, done.epoch);
        let labels: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let head = done.best_head(&labels, 8);
        let (tx, ty) = blobs(300, 3);
        let correct = tx.iter().zip(&ty).filter(|(x, y)| head.predict(x) == **y).count();
        assert!(correct >= 285, "{correct}/300 held-out points right");
        let p = head.probabilities(&tx[0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn a_resumed_run_ends_where_the_uninterrupted_one_does() {
        let (x, y) = blobs(120, 4);
        let (vx, vy) = blobs(30, 5);
        let (train_set, validation) = (Examples { x: &x, y: &y }, Examples { x: &vx, y: &vy });
        let whole = train(&settings(), 3, 8, train_set, validation, None, |_| {
            ControlFlow::Continue(())
        });
        // Interrupted after three epochs (a restart), then resumed from the checkpoint.
        let mut saved = None;
        let partial = train(&settings(), 3, 8, train_set, validation, None, |c| {
            saved = Some(c.clone());
            if c.epoch == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert_eq!(partial.epoch, 3);
        let resumed = train(&settings(), 3, 8, train_set, validation, saved, |_| {
            ControlFlow::Continue(())
        });
        assert_eq!(resumed, whole);
    }

    #[test]
    fn settings_out_of_range_are_named() {
        let bad = |h: Hyperparameters| Settings::resolve(&h, 10).unwrap_err();
        assert!(
            bad(Hyperparameters {
                epochs: Some(0),
                ..Default::default()
            })
            .contains("epochs")
        );
        assert!(
            bad(Hyperparameters {
                learning_rate: Some(f64::NAN),
                ..Default::default()
            })
            .contains("learning_rate")
        );
        assert!(
            bad(Hyperparameters {
                batch_size: Some(5000),
                ..Default::default()
            })
            .contains("batch_size")
        );
        assert!(
            bad(Hyperparameters {
                l2: Some(-1.0),
                ..Default::default()
            })
            .contains("l2")
        );
        let resolved = Settings::resolve(&Hyperparameters::default(), 200).unwrap();
        assert!((resolved.l2 - 0.005).abs() < 1e-12);
        assert_eq!(
            Settings::resolve(&resolved.as_hyperparameters(), 7).unwrap(),
            resolved
        );
    }
}
