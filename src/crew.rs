//! What crews and drivers read is checked twice.
//!
//! A crew post is built from closed vocabularies and strict shapes
//! ([`CrewLeadView::checked`]), so personal data has no field to ride in. On
//! top of that, the whole rendered text passes the anti-poaching detector
//! ([`crate::scan`]) — once when the work is accepted (a hit refuses the
//! start with `422 crew_unsafe_field`, naming the field; nothing is scrubbed)
//! and again in the worker, right before it is sent (a hit fails the effect
//! permanently; ops see it dead-lettered, nothing reaches the chat). The same
//! holds for route dispatches to drivers and for the claim notices.

use serde_json::Value;
use uuid::Uuid;
use workflows::lead::{CrewLeadView, FullLead};
use workflows::ParseError;

use crate::scan::{self, FindingKind};

/// Why a crew- or driver-visible text may not be sent, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` reads as contact details ({what}); crews and drivers never receive them")]
pub struct Refused {
    /// The field, as the caller named it.
    pub field: String,
    /// What the detector saw (phone, email, url, handle, keyword).
    pub what: &'static str,
}

fn kind_name(k: &FindingKind) -> &'static str {
    match k {
        FindingKind::Phone => "a phone number",
        FindingKind::Email => "an e-mail address",
        FindingKind::Url => "a link",
        FindingKind::Handle => "a social handle",
        FindingKind::Keyword => "an off-platform contact word",
    }
}

/// `text` as the detector should read it, one char for one char (so spans
/// still point into `text`): each character NFKC-folded when it folds to one
/// character (full-width letters and digits, mathematical and superscript
/// digits), and every decimal digit of another script made ASCII
/// (Arabic-Indic, Persian, Devanagari, …).
pub fn fold(text: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    text.chars()
        .map(|c| {
            if c.is_ascii() {
                return c;
            }
            let mut folded = std::iter::once(c).nfkc();
            let c = match (folded.next(), folded.next()) {
                (Some(one), None) => one,
                _ => c,
            };
            ascii_digit(c).unwrap_or(c)
        })
        .collect()
}

/// The ASCII digit for a decimal digit of another script.
fn ascii_digit(c: char) -> Option<char> {
    // The zero of each common block of ten decimal digits.
    const ZEROS: &[u32] = &[
        0x0660, 0x06F0, 0x07C0, 0x0966, 0x09E6, 0x0A66, 0x0AE6, 0x0B66, 0x0BE6, 0x0C66, 0x0CE6,
        0x0D66, 0x0DE6, 0x0E50, 0x0ED0, 0x0F20, 0x1040, 0x1090, 0x17E0, 0x1810, 0x1946, 0x19D0,
        0x1A80, 0x1A90, 0x1B50, 0x1BB0, 0x1C40, 0x1C50, 0xA620, 0xA8D0, 0xA900, 0xA9D0, 0xA9F0,
        0xAA50, 0xABF0, 0xFF10,
    ];
    let n = c as u32;
    ZEROS
        .iter()
        .find(|z| (**z..*z + 10).contains(&n))
        .and_then(|z| char::from_digit(n - z, 10))
}

/// Scan `text` (folded first, see [`fold`]); `field_at` names the field a
/// finding's first character (char index) belongs to. `allow_handles`:
/// `@name` handles are ours (the claimer's username in a claim notice).
pub fn check(
    text: &str,
    allow_handles: bool,
    field_at: impl Fn(usize) -> String,
) -> Result<(), Refused> {
    let Ok(found) = scan::scan(&fold(text)) else {
        // Fail closed: a text the detector cannot decide is not sent.
        return Err(Refused {
            field: field_at(0),
            what: "text the detector could not read",
        });
    };
    match found
        .findings
        .iter()
        .find(|f| !(allow_handles && f.kind == FindingKind::Handle))
    {
        Some(f) => Err(Refused {
            field: field_at(f.start),
            what: kind_name(&f.kind),
        }),
        None => Ok(()),
    }
}

/// A route's driver-visible fields (`reference`, `date`, `text`), each under
/// the one text rule and then the detector; errors name the field.
pub fn check_route(route: &Value) -> Result<(), ParseError> {
    use workflows::text::{check_field, TextKind};
    let fields = [
        ("reference", TextKind::Line, 100),
        ("date", TextKind::Line, 100),
        ("text", TextKind::Multiline, 3500),
    ];
    for (name, kind, max) in fields {
        let Some(v) = route.get(name).and_then(Value::as_str) else {
            continue;
        };
        let field = format!("route.{name}");
        if name == "date" && v.trim().is_empty() {
            continue;
        }
        check_field(&field, v.trim(), kind, max).map_err(ParseError::InvalidPayload)?;
        check(v, false, |_| field.clone()).map_err(|e| ParseError::CrewUnsafe(e.to_string()))?;
    }
    Ok(())
}

/// The rendered crew post of a lead, checked: closed lists and shapes first,
/// then the detector over the whole text (a number split across fields is
/// caught here). Errors name the field.
///
/// With `lists` false (in the worker, right before sending) the tenant's
/// closed lists are not enforced again — they were when the lead arrived, and
/// a list narrowed since must not strand a job already posted — but every
/// shape rule and the detector still are.
pub fn crew_post(
    lead_id: Uuid,
    lead: &FullLead,
    config: &Value,
    lists: bool,
) -> Result<String, String> {
    let view =
        CrewLeadView::checked_with(lead_id, lead, config, lists).map_err(|e| e.to_string())?;
    let text = view.render();
    check(&text, false, |at| {
        CrewLeadView::field_at(&text, at).to_string()
    })
    .map_err(|e| e.to_string())?;
    Ok(text)
}

/// The engine's start guard: a lead that would reach a crew (dispatch, or a
/// lead finalization with a crew fallback or crew dispatch) must render to a
/// crew post the detector passes.
pub fn start_guard(kind: &str, key: &str, input: &Value, config: &Value) -> Result<(), ParseError> {
    if kind == workflows::route_dispatch::RouteDispatch::KIND {
        return check_route(&input["route"]);
    }
    let crew_bound = match kind {
        workflows::dispatch::Dispatch::KIND => true,
        workflows::lead_finalization::LeadFinalization::KIND => {
            let flag = |p: &str, d: bool| config.pointer(p).and_then(Value::as_bool).unwrap_or(d);
            flag("/dispatch/operator/send_crew_fallback", true)
                || flag("/dispatch/crew/enabled", false)
        }
        _ => false,
    };
    if !crew_bound {
        return Ok(());
    }
    // The workflow's own start parsed and checked the lead already.
    let lead = FullLead::parse_strict(&input["lead"]).map_err(ParseError::InvalidPayload)?;
    let lead_id = Uuid::parse_str(key).unwrap_or_default();
    crew_post(lead_id, &lead, config, true).map_err(ParseError::CrewUnsafe)?;
    Ok(())
}

use workflows::Workflow as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_and_letters_of_every_form_are_read_as_ascii_in_place() {
        assert_eq!(fold("٠٥٠ ۰۵۰ ०५० 𝟎𝟓𝟎 ０５０"), "050 050 050 050 050");
        assert_eq!(fold("ｄａｎａ＠ｇｍａｉｌ．ｃｏｍ"), "dana@gmail.com");
        assert_eq!(fold("חיפה → קריית אתא"), "חיפה → קריית אתא");
        for text in ["call ٠٥٠١٢٣٤٥٦٧", "ｗｈａｔｓａｐｐ me", "𝟎𝟓𝟎𝟏𝟐𝟑𝟒𝟓𝟔𝟕"]
        {
            assert!(check(text, false, |_| "x".into()).is_err(), "{text}");
        }
    }

    #[test]
    fn a_hit_in_a_place_name_names_the_end_it_is_in() {
        let mut l = lead(&[]);
        l.to.locality = Some("Instagram".into());
        let e = crew_post(Uuid::nil(), &l, &Value::Null, true).unwrap_err();
        assert!(e.contains("`lead.to.locality`"), "{e}");
        assert!(workflows::text::redact(&e).contains("`lead.to.locality`"));
    }

    fn lead(extras: &[&str]) -> FullLead {
        serde_json::from_value(serde_json::json!({
            "client": {"name": "Dana Canary", "phone": "+15550100199"},
            "from": {"locality": "Haifa", "floor": 3, "elevator": false},
            "to": {"locality": "Kiryat Ata", "floor": 2, "elevator": false},
            "date": "2026-02-23", "time_window": "Morning", "volume": "1BR",
            "extras": extras, "estimate": {"min": 850, "max": 950}
        }))
        .unwrap()
    }

    #[test]
    fn the_domain_example_passes_the_detector() {
        let id = Uuid::parse_str("0952ef82-0000-4000-8000-000000000000").unwrap();
        let text = crew_post(
            id,
            &lead(&["Fridge", "Washing machine"]),
            &Value::Null,
            true,
        )
        .unwrap();
        assert!(text.contains("Extras: Fridge, Washing machine"));
    }

    #[test]
    fn an_all_digit_short_id_is_not_a_phone() {
        for id in [
            "55501001-0000-4000-8000-000000000000",
            "05550100-0000-4000-8000-000000000000",
        ] {
            let id = Uuid::parse_str(id).unwrap();
            assert!(
                crew_post(id, &lead(&[]), &Value::Null, true).is_ok(),
                "{id}"
            );
        }
    }

    #[test]
    fn a_number_split_across_tenant_extras_is_refused() {
        // A tenant whose own list holds digit-only items cannot make a phone out of them.
        let cfg = serde_json::json!({"dispatch": {"crew": {"extras": ["+1 555", "0100", "199"]}}});
        let e = crew_post(Uuid::nil(), &lead(&["+1 555", "0100", "199"]), &cfg, true).unwrap_err();
        assert!(e.contains("`lead.extras["), "{e}");
        assert!(!e.contains("555"), "{e}");
    }
}
