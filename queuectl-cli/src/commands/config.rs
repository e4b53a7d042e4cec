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
        ConfigCommand::Get { key } => {
            let value = store.config()?.get(&key)?;
            writeln!(out, "{value}")?;
            Ok(())
        }
        ConfigCommand::Set { key, value } => {
            let config = store.update_config(&mut |c| c.set(&key, &value))?;
            say!("{key} = {}", config.get(&key)?);
            Ok(())
        }
    }
}
