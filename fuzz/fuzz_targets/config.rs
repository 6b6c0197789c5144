//! The config parser and validator (`jitgate::config::Config`).
//!
//! Input: any bytes; UTF-8 ones are a config file's text. Secrets are not resolved
//! (`parse_without_secrets`), so an input naming `password_file = "/dev/zero"` reads
//! nothing. Checked: no panic in TOML parsing, validation, or formatting the result or the
//! error; an error message is never empty; for text that names no secret source
//! (`_env`/`_file`, no escapes), resolving secrets gives the same verdict.
#![no_main]

use std::path::Path;

use jitgate::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    let parsed = Config::parse_without_secrets(text, path);
    match &parsed {
        Ok(config) => {
            let _ = format!("{config:?}");
        }
        Err(e) => assert!(!e.to_string().is_empty(), "empty error message"),
    }
    // A backslash could spell a key name with an escape.
    if !text.contains("_env") && !text.contains("_file") && !text.contains('\\') {
        let resolved = Config::parse(text, path);
        assert_eq!(
            resolved.as_ref().map(|_| ()).map_err(ToString::to_string),
            parsed.as_ref().map(|_| ()).map_err(ToString::to_string),
            "resolving secrets changed the verdict"
        );
    }
});
