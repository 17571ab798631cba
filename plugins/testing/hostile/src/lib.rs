//! A deliberately badly behaved plugin for the host's containment tests. `{"do": "<mode>"}` picks the
//! misbehaviour; `{"do": "echo"}` behaves, so the same component proves the host still serves.

use plinth_plugin::{Error, Plugin, Value, config, inference, json, kv, log};

#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    // Enough frame per level that the optimiser cannot turn this into a loop.
    let frame = std::hint::black_box([depth; 16]);
    frame[(depth % 16) as usize] + recurse(depth + 1)
}

struct Hostile;

impl Plugin for Hostile {
    fn handle(request: Value) -> Result<Value, Error> {
        match request["do"].as_str().unwrap_or_default() {
            "echo" => Ok(request),
            // What the installation's secret `key` holds, as this installation sees it.
            "secret" => Ok(json!({ "secret": config::secret(request["key"].as_str().unwrap_or_default()) })),
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            // Compute that ends: counts to `n`.
            "count" => {
                let until = request["n"].as_u64().unwrap_or_default();
                let mut n: u64 = 0;
                while n < until {
                    n = std::hint::black_box(n + 1);
                }
                Ok(json!({ "counted": n }))
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "recurse" => Ok(json!(recurse(0))),
            "sleep" => {
                // Waits in the host (a WASI clock subscription and poll), not in guest code.
                std::thread::sleep(std::time::Duration::from_secs(60));
                Ok(json!("woke up"))
            }
            // Waits in the host again and again, for a little under a tick each time.
            "naps" => loop {
                std::thread::sleep(std::time::Duration::from_millis(9));
            },
            "big-output" => Ok(Value::String("x".repeat(8 << 20))),
            "panic" => panic!("the plugin gave up"),
            // A failure with a trail: what its invocation record must keep.
            "log-then-fail" => {
                log::warn("about to fail on purpose");
                // Text meant for a terminal or a page, not for the record's reader to run.
                log::info("\u{1b}]0;pwned\u{7}<script>alert(1)</script>");
                Err(Error::failed("gave up on purpose"))
            }
            "log-flood" => {
                for i in 0..100_000 {
                    log::info(&format!("line {i}: {}", "y".repeat(100)));
                }
                Ok(json!("logged"))
            }
            "kv-flood" => {
                for i in 0..100_000 {
                    kv::set(&format!("key-{i}"), &[0; 1024])?;
                }
                Ok(json!("flooded"))
            }
            "kv-huge-value" => {
                kv::set("huge", &vec![0; 1 << 20])?;
                Ok(json!("stored"))
            }
            "model" => {
                let model = request["model"].as_str().unwrap_or("sentiment");
                let result = inference::classify(model, &["is this allowed?"])?;
                Ok(json!(result[0].label))
            }
            "remember-then-fail" => {
                // What it remembers from the last invocation, a model's verdict, and a failure that
                // depends on both: reproduced only if a replay answers these host calls as they were.
                let key = if cfg!(feature = "edited") { "previous" } else { "last" };
                let previous = kv::get(key)?
                    .map(|value| String::from_utf8_lossy(&value).into_owned())
                    .unwrap_or_else(|| "nothing".to_owned());
                let text = request["text"].as_str().unwrap_or_default();
                let verdict = inference::classify("sentiment", &[text])?;
                kv::set("last", verdict[0].label.as_bytes())?;
                log::warn(&format!("saw {} after {previous}", verdict[0].label));
                Err(Error::failed(format!(
                    "gave up on a {} text after {previous}",
                    verdict[0].label
                )))
            }
            "kv-calls" => {
                for _ in 0..1_000 {
                    kv::get("missing")?;
                }
                Ok(json!("read"))
            }
            "kv-list-wildcards" => {
                kv::set("a%b", b"1")?;
                kv::set("axb", b"2")?;
                kv::set("a_c", b"3")?;
                kv::set("ABC", b"4")?;
                Ok(json!({
                    "percent": kv::list("a%")?,
                    "underscore": kv::list("a_")?,
                    "lower": kv::list("a")?,
                }))
            }
            // A request to a model far past what a plugin may send, parsed or not.
            "huge-model-request" => {
                let data = vec![0; 600_000];
                let request = json!({ "inputs": [{ "name": "x", "datatype": "INT64", "shape": [1, 600_000], "data": data }] });
                Ok(inference::infer("sentiment", &request)?)
            }
            // Its own error, long: cut before it reaches the caller (2 MiB), or refused on its way
            // out of the guest (8 MiB).
            "long-error" => Err(Error::invalid("e".repeat(2 << 20))),
            "huge-error" => Err(Error::invalid("e".repeat(8 << 20))),
            // One model call of `n` texts.
            "model-batch" => {
                let n = usize::try_from(request["n"].as_u64().unwrap_or(1)).unwrap_or(1);
                let texts = vec!["again"; n];
                Ok(json!(inference::classify("sentiment", &texts)?.len()))
            }
            "many-calls" => {
                for _ in 0..100 {
                    inference::classify("sentiment", &["again"])?;
                }
                Ok(json!("called"))
            }
            other => Err(Error::invalid(format!("unknown mode `{other}`"))),
        }
    }
}

plinth_plugin::register!(Hostile);
