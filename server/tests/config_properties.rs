//! Property tests of the agent's configuration parser: the shipped
//! `deploy/rootletd.toml` with a few edits parses and validates, or fails
//! naming `file:line:column` inside it (a syntax or type error) or the
//! dotted path of each invalid field; never panics.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is the test failing"
)]

#[path = "../../bundle/tests/common/mutate.rs"]
mod mutate;

use std::path::Path;

use proptest::prelude::*;
use rootlet_server::config::{Config, ConfigError};

const SHIPPED: &str = include_str!("../../deploy/rootletd.toml");

#[test]
fn the_shipped_config_parses() {
    Config::parse(SHIPPED, Path::new("rootletd.toml")).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(768))]

    #[test]
    fn mutated_configs_fail_precisely(text in mutate::mutated_text(SHIPPED)) {
        match Config::parse(&text, Path::new("rootletd.toml")) {
            Ok(config) => match config.validate() {
                Ok(()) => {
                    let _ = config.warnings();
                    let _ = config.summary();
                }
                Err(ConfigError::Invalid(problems)) => {
                    prop_assert!(!problems.is_empty());
                    for p in &problems {
                        prop_assert!(!p.field.is_empty() && !p.message.is_empty(), "{p:?}");
                    }
                }
                Err(e) => prop_assert!(false, "validate gave {e}"),
            },
            Err(e @ ConfigError::Parse { .. }) => {
                mutate::located(&e.to_string(), "rootletd.toml", &text)?;
            }
            Err(e) => prop_assert!(false, "parse gave {e}"),
        }
    }
}
