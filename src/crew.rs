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

/// Scan `text`; `field_at` names the field a finding's first character
/// (char index) belongs to. `allow_handles`: `@name` handles are ours (the
/// claimer's Telegram username in a claim notice).
pub fn check(
    text: &str,
    allow_handles: bool,
    field_at: impl Fn(usize) -> String,
) -> Result<(), Refused> {
    let Ok(found) = scan::scan(text) else {
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

/// The rendered crew post of a lead, checked: closed lists and shapes first,
/// then the detector over the whole text (a number split across fields is
/// caught here). Errors name the field.
pub fn crew_post(lead_id: Uuid, lead: &FullLead, config: &Value) -> Result<String, String> {
    let view = CrewLeadView::checked(lead_id, lead, config).map_err(|e| e.to_string())?;
    let text = view.render();
    check(&text, false, |at| {
        let line = text.chars().take(at + 1).filter(|c| *c == '\n').count();
        let line = text.lines().nth(line).unwrap_or("");
        CrewLeadView::field_of_line(line).to_string()
    })
    .map_err(|e| e.to_string())?;
    Ok(text)
}

/// The engine's start guard: a lead that would reach a crew (dispatch, or a
/// lead finalization with a crew fallback or crew dispatch) must render to a
/// crew post the detector passes.
pub fn start_guard(kind: &str, key: &str, input: &Value, config: &Value) -> Result<(), ParseError> {
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
    crew_post(lead_id, &lead, config).map_err(ParseError::CrewUnsafe)?;
    Ok(())
}

use workflows::Workflow as _;

#[cfg(test)]
mod tests {
    use super::*;

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
        let text = crew_post(id, &lead(&["Fridge", "Washing machine"]), &Value::Null).unwrap();
        assert!(text.contains("Extras: Fridge, Washing machine"));
    }

    #[test]
    fn an_all_digit_short_id_is_not_a_phone() {
        for id in [
            "55501001-0000-4000-8000-000000000000",
            "05550100-0000-4000-8000-000000000000",
        ] {
            let id = Uuid::parse_str(id).unwrap();
            assert!(crew_post(id, &lead(&[]), &Value::Null).is_ok(), "{id}");
        }
    }

    #[test]
    fn a_number_split_across_tenant_extras_is_refused() {
        // A tenant whose own list holds digit-only items cannot make a phone out of them.
        let cfg = serde_json::json!({"dispatch": {"crew": {"extras": ["+1 555", "0100", "199"]}}});
        let e = crew_post(Uuid::nil(), &lead(&["+1 555", "0100", "199"]), &cfg).unwrap_err();
        assert!(e.contains("`lead.extras["), "{e}");
        assert!(!e.contains("555"), "{e}");
    }
}
