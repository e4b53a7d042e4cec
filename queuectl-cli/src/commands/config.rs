//! `config show|get|set`: the settings stored with the queue.

use std::io::Write;

use queuectl_core::Storage;

use crate::args::ConfigCommand;
use crate::error::Result;
use crate::render;

/// Runs one `config` subcommand.
pub fn run(store: &dyn Storage, command: ConfigCommand, out: &mut dyn Write) -> Result {
    match command {
        ConfigCommand::Show(flag) => {
            let config = store.config()?;
            if flag.json {
                render::print_json(out, &config)
            } else {
                Ok(out.write_all(render::config(&config).as_bytes())?)
            }
        }
        ConfigCommand::Get { key, json } => {
            let config = store.config()?;
            let value = config.get(&key)?;
            if json {
                // The value as the settings' JSON form has it (a number).
                let typed = serde_json::to_value(&config)
                    .ok()
                    .and_then(|all| all.get(&key).cloned())
                    .unwrap_or(serde_json::Value::String(value));
                render::print_json(out, &serde_json::json!({ "key": key, "value": typed }))
            } else {
                writeln!(out, "{value}")?;
                Ok(())
            }
        }
        ConfigCommand::Set { key, value } => {
            let config = store.update_config(&mut |c| c.set(&key, &value))?;
            say!("{key} = {}", config.get(&key)?);
            Ok(())
        }
    }
}
