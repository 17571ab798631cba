//! Classifies the texts given on the command line with the built-in `sentiment` model, then prints this
//! period's usage by resource.
//!
//! ```sh
//! PLINTH_API_URL=http://127.0.0.1:8080 PLINTH_API_KEY=plk_live_... \
//!   cargo run -p plinth-sdk --example classify -- "I love this product" "this is terrible"
//! ```

use plinth_sdk::{Client, UsageGrouping, UsageQuery};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let api = std::env::var("PLINTH_API_URL").unwrap_or_else(|_| "http://127.0.0.1:8080".to_owned());
    let key = std::env::var("PLINTH_API_KEY").map_err(|_| "set PLINTH_API_KEY to an API key")?;
    let client = Client::new(&api)?.with_token(key);

    let texts: Vec<String> = std::env::args().skip(1).collect();
    let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let answer = client.classify("sentiment", &inputs).await?;
    for (text, result) in texts.iter().zip(&answer.results) {
        println!("{:<8} {:.2}  {text}", result.label, result.score);
    }

    let usage = client
        .usage(&UsageQuery {
            group_by: Some(UsageGrouping::Resource),
            ..UsageQuery::default()
        })
        .await?;
    for row in &usage.rows {
        println!("{}: {} calls", row.key, row.calls);
    }
    Ok(())
}
