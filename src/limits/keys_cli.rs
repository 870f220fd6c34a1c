//! `switchyard keys new` (SC-1): a fresh client key, and the config entry that admits it by its
//! SHA-256 digest, so the key itself need not be written anywhere the relay reads.

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Print a fresh key (shown once) and its `keys[]` entry with `key_sha256`.
    New {
        /// The entry's `id` (names the key in logs, usage and limits).
        #[arg(long, default_value = "client")]
        id: String,
    },
}

pub fn run(args: &KeysArgs) -> ExitCode {
    match &args.command {
        KeysCommand::New { id } => {
            let (key, entry) = new_key(id);
            println!("key (shown once, give it to the client): {key}");
            println!("config entry for keys[]:");
            println!("{entry}");
            ExitCode::SUCCESS
        }
    }
}

/// A key of 32 random bytes (`sy-` + 64 hex digits) and its YAML entry.
pub fn new_key(id: &str) -> (String, String) {
    let key = format!("sy-{}", hex::encode(rand::random::<[u8; 32]>()));
    let digest = hex::encode(crate::config::sha256(&key));
    let entry = format!("  - id: {id}\n    key_sha256: \"{digest}\"");
    (key, entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sc1_a_new_key_is_admitted_by_its_entry_and_unique() {
        let (key, entry) = new_key("ci");
        let (other, _) = new_key("ci");
        assert_ne!(key, other);
        let cfg = crate::config::Config::from_yaml_str(&format!("keys:\n{entry}\n"))
            .expect("entry loads");
        assert_eq!(cfg.find_key(&key).map(|k| k.id.as_str()), Some("ci"));
        assert!(cfg.find_key(&other).is_none());
        assert!(!entry.contains(&key), "the entry holds the digest only");
    }
}
