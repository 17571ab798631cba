//! The smallest useful plugin, and the starting point for a new one (`plinth-cli plugin new`): greets
//! the caller. Replace `handle` with your plugin's work; the platform's interfaces are the SDK's
//! `inference`, `kv`, `config` and `log` modules.

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
