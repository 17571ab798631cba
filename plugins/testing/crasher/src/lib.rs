//! A plugin that overflows its stack on every request, the empty one included: the publishing smoke
//! run must see a crash, not a refusal.

use plinth_plugin::{Error, Plugin, Value, json};

#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 16]);
    frame[(depth % 16) as usize] + recurse(depth + 1)
}

struct Crasher;

impl Plugin for Crasher {
    fn handle(_request: Value) -> Result<Value, Error> {
        Ok(json!(recurse(0)))
    }
}

plinth_plugin::register!(Crasher);
