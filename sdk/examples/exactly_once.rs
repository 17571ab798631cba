//! Sends a billed call that may be sent again (a worker that crashed after sending it, a retried
//! job) under the application's own `Idempotency-Key`: however often it is sent within the server's
//! window, it runs once, is billed once, and every sender gets the first answer.
//!
//! ```sh
//! PLINTH_API_KEY=plk_live_... cargo run -p plinth-sdk --example exactly_once -- ticket-4711 "Where is my parcel?"
//! ```

use plinth_sdk::Client;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let api = std::env::var("PLINTH_API_URL").unwrap_or_else(|_| "http://127.0.0.1:8080".to_owned());
    let key = std::env::var("PLINTH_API_KEY").map_err(|_| "set PLINTH_API_KEY to an API key")?;
    let mut args = std::env::args().skip(1);
    let (Some(job), Some(text)) = (args.next(), args.next()) else {
        return Err("usage: exactly_once <job id> <text>".into());
    };
    let client = Client::new(&api)?.with_token(key);

    // The job's own id names the call: a second run of the same job is answered from the first.
    let keyed = client.idempotent(format!("classify:{job}"));
    let first = keyed.classify("sentiment", &[&text]).await?;
    let again = keyed.classify("sentiment", &[&text]).await?;
    assert_eq!(first, again);
    println!(
        "{} ({:.2}), billed once",
        first.results[0].label, first.results[0].score
    );
    Ok(())
}
