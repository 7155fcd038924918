//! Signature checks on arbitrary headers and bodies: never a panic, never a pass.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &str, &str, &[u8])| {
    let (a, b, c, body) = input;
    assert!(!dispatch::intake::svix_ok("whsec_c2VjcmV0", Some(a), Some(b), body, Some(c), 1_800_000_000)
        || c.contains("v1,"));
    let _ = dispatch::intake::sendgrid_ok(a, Some(b), body, Some(c));
    let _ = dispatch::intake::meta_ok("secret", body, Some(a));
    let _ = dispatch::intake::telegram_ok("secret", Some(a));
    let pairs = dispatch::intake::routes::serde_urlencoded_pairs(b);
    let _ = dispatch::intake::twilio_ok("token", a, &pairs, Some(c));
});
