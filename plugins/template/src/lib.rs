//! The smallest useful plugin, and the starting point for a new one: greets the caller.
//! Copy this folder, rename the package, and replace `handle`.

use plinth_plugin::{Error, Plugin, Value, json};

struct Hello;

impl Plugin for Hello {
    fn handle(request: Value) -> Result<Value, Error> {
        let name = request["name"]
            .as_str()
            .ok_or_else(|| Error::invalid("`name` (a string) is required"))?;
        Ok(json!({ "greeting": format!("Hello, {name}!") }))
    }
}

plinth_plugin::register!(Hello);
