//! Where a request's time went, for its `Server-Timing` answer: stages (a model's queue, its run, the
//! usage ledger…) record how long they took into the request being served, if it collects them.
//! Recorded on the request's own task: work it hands to other tasks is timed by what awaits it.

use std::cell::RefCell;
use std::time::{Duration, Instant};

/// A stage's name and how long it took.
pub type Stage = (&'static str, Duration);

tokio::task_local! {
    static STAGES: RefCell<Vec<Stage>>;
}

/// Runs `request`, collecting the stages timed while it runs.
pub async fn collect<F: Future>(request: F) -> (F::Output, Vec<Stage>) {
    STAGES
        .scope(RefCell::new(Vec::new()), async move {
            let output = request.await;
            let stages = STAGES.with(RefCell::take);
            (output, stages)
        })
        .await
}

/// Records that `stage` took `took`, for the request being served (nothing outside [`collect`]).
pub fn record(stage: &'static str, took: Duration) {
    let _ = STAGES.try_with(|stages| stages.borrow_mut().push((stage, took)));
}

/// Runs `work`, recording how long it took as `stage`.
pub async fn time<F: Future>(stage: &'static str, work: F) -> F::Output {
    let started = Instant::now();
    let output = work.await;
    record(stage, started.elapsed());
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stages_are_collected_for_the_request_that_records_them() {
        let (answer, stages) = collect(async {
            record("queue", Duration::from_millis(2));
            time("run", async { 42 }).await
        })
        .await;
        assert_eq!(answer, 42);
        let names: Vec<&str> = stages.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, ["queue", "run"]);
        assert_eq!(stages[0].1, Duration::from_millis(2));
        // Outside a request, recording does nothing (and does not fail).
        record("queue", Duration::from_millis(1));
        assert!(collect(async {}).await.1.is_empty());
    }
}
