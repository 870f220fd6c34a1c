//! The config loader on any text: a config or a list of errors with their paths, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(errors) = switchyard::config::Config::from_yaml_str_with_env(text, &|_| None) {
        for e in errors.iter() {
            let _ = e.to_string();
        }
    }
});
