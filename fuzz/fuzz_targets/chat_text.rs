//! Chat commands, deep-link tokens and form bodies from arbitrary text.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = dispatch::intake::parse_command(text);
    let _ = dispatch::intake::addressed_bot(text);
    if let Some(token) = dispatch::intake::start_token(text) {
        assert!(token.len() <= 64);
    }
    let _ = dispatch::intake::routes::serde_urlencoded_pairs(text);
});
