//! Every webhook parser on arbitrary bytes: never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    for provider in ["telegram", "whatsapp", "twilio"] {
        let _ = dispatch::intake::read_event(provider, &value);
    }
    for provider in ["resend", "sendgrid"] {
        let _ = dispatch::intake::read_delivery_event(provider, &value);
    }
    if let Some(events) = value.as_array() {
        for e in events {
            let _ = dispatch::intake::read_delivery_event("sendgrid", e);
        }
    }
});
