//! The two views of a moving lead (DOMAIN.md §1 "Two views of a lead").
//!
//! [`FullLead`] carries personal data and never enters workflow state, effect
//! payloads or logs. [`CrewLeadView`] is built from an explicit allowlist of
//! normalized fields — never by scrubbing text — so a new field on the lead can
//! never leak into a crew message by accident.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One end of a move.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Address {
    /// Street address (PII).
    #[serde(default)]
    pub street: Option<String>,
    /// City / locality (safe).
    #[serde(default)]
    pub locality: Option<String>,
    /// Floor number (safe).
    #[serde(default)]
    pub floor: Option<i32>,
    /// Whether there is an elevator (safe).
    #[serde(default)]
    pub elevator: Option<bool>,
}

/// The client (PII).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Client {
    /// Full name.
    #[serde(default)]
    pub name: Option<String>,
    /// Phone number.
    #[serde(default)]
    pub phone: Option<String>,
}

/// Estimated price range in whole shekels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceRange {
    /// Lower bound.
    pub min: u32,
    /// Upper bound.
    pub max: u32,
}

/// The complete lead as Lead Core finalized it. Personal data lives here only.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct FullLead {
    /// The lead id; when present it must equal the workflow key.
    #[serde(default)]
    pub id: Option<Uuid>,
    /// Client identity (PII).
    #[serde(default)]
    pub client: Client,
    /// Origin.
    #[serde(default)]
    pub from: Address,
    /// Destination.
    #[serde(default)]
    pub to: Address,
    /// Move date, ISO `YYYY-MM-DD`.
    #[serde(default)]
    pub date: Option<chrono::NaiveDate>,
    /// Time window label, e.g. `Morning`.
    #[serde(default)]
    pub time_window: Option<String>,
    /// Volume category, e.g. `1BR`.
    #[serde(default)]
    pub volume: Option<String>,
    /// Items and extras, normalized labels.
    #[serde(default)]
    pub extras: Vec<String>,
    /// Estimated price range.
    #[serde(default)]
    pub estimate: Option<PriceRange>,
    /// Free text from the client (PII, never shown to crews).
    #[serde(default)]
    pub notes: Option<String>,
    /// Photo/video links (PII, never shown to crews).
    #[serde(default)]
    pub media: Vec<String>,
}

/// The crew-safe view: only allowlisted, normalized fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CrewLeadView {
    /// First 8 hex digits of the lead id.
    pub short_id: String,
    /// Origin locality.
    pub from_locality: Option<String>,
    /// Destination locality.
    pub to_locality: Option<String>,
    /// Move date.
    pub date: Option<chrono::NaiveDate>,
    /// Time window label.
    pub time_window: Option<String>,
    /// Volume category.
    pub volume: Option<String>,
    /// Floors at origin and destination.
    pub floors: (Option<i32>, Option<i32>),
    /// Elevator at origin and destination.
    pub elevators: (Option<bool>, Option<bool>),
    /// Items/extras summary.
    pub extras: Vec<String>,
    /// Estimated price range.
    pub estimate: Option<PriceRange>,
}

/// The short lead id shown to crews: the first 8 hex digits of the UUID.
pub fn short_id(lead_id: Uuid) -> String {
    lead_id.simple().to_string()[..8].to_string()
}

/// Keep a label only if it is a short, plain label: crews must never receive a
/// phone number, link or sentence smuggled into a normalized field.
fn label(s: &Option<String>) -> Option<String> {
    s.as_deref().and_then(|v| {
        let v = v.trim();
        let plain = !v.is_empty()
            && v.chars().count() <= 40
            && !v.contains("://")
            && !v.contains('@')
            && v.chars().filter(|c| c.is_ascii_digit()).count() < 5;
        plain.then(|| v.to_string())
    })
}

impl CrewLeadView {
    /// Build the crew view from the allowlist.
    pub fn from_lead(lead_id: Uuid, lead: &FullLead) -> Self {
        CrewLeadView {
            short_id: short_id(lead_id),
            from_locality: label(&lead.from.locality),
            to_locality: label(&lead.to.locality),
            date: lead.date,
            time_window: label(&lead.time_window),
            volume: label(&lead.volume),
            floors: (lead.from.floor, lead.to.floor),
            elevators: (lead.from.elevator, lead.to.elevator),
            extras: lead
                .extras
                .iter()
                .filter_map(|e| label(&Some(e.clone())))
                .collect(),
            estimate: lead.estimate,
        }
    }

    /// The copy-paste-ready crew message (DOMAIN.md format).
    pub fn render(&self) -> String {
        let dash = || "—".to_string();
        let mut out = format!("FOR CREW (copy to group)\nJob #{}\n", self.short_id);
        out.push_str(&format!(
            "Route: {} → {}\n",
            self.from_locality.clone().unwrap_or_else(dash),
            self.to_locality.clone().unwrap_or_else(dash)
        ));
        if let Some(date) = self.date {
            let window = self
                .time_window
                .as_ref()
                .map(|w| format!(" ({w})"))
                .unwrap_or_default();
            out.push_str(&format!("Date: {}{}\n", date.format("%-d %b"), window));
        }
        if let Some(v) = &self.volume {
            out.push_str(&format!("Volume: {v}\n"));
        }
        if self.floors.0.is_some() || self.floors.1.is_some() {
            let f = |x: Option<i32>| x.map(|n| n.to_string()).unwrap_or_else(dash);
            let elevator = match self.elevators {
                (Some(false), Some(false)) => " (No elevator)",
                (Some(true), Some(true)) => " (Elevator)",
                _ => "",
            };
            out.push_str(&format!(
                "Floors: {} → {}{}\n",
                f(self.floors.0),
                f(self.floors.1),
                elevator
            ));
        }
        if !self.extras.is_empty() {
            out.push_str(&format!("Extras: {}\n", self.extras.join(", ")));
        }
        if let Some(e) = self.estimate {
            out.push_str(&format!("Estimate: ₪{}–₪{}\n", e.min, e.max));
        }
        out.trim_end().to_string()
    }
}

impl FullLead {
    /// The private message for the executor after release.
    pub fn render_full(&self, lead_id: Uuid) -> String {
        let opt = |s: &Option<String>| s.clone().unwrap_or_default();
        let mut out = format!("Job #{} — client details\n", short_id(lead_id));
        out.push_str(&format!("Client: {}\n", opt(&self.client.name)));
        out.push_str(&format!("Phone: {}\n", opt(&self.client.phone)));
        out.push_str(&format!(
            "From: {}, {}\n",
            opt(&self.from.street),
            opt(&self.from.locality)
        ));
        out.push_str(&format!(
            "To: {}, {}\n",
            opt(&self.to.street),
            opt(&self.to.locality)
        ));
        if let Some(n) = &self.notes {
            out.push_str(&format!("Notes: {n}\n"));
        }
        out.trim_end().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lead() -> FullLead {
        serde_json::from_value(serde_json::json!({
            "client": {"name": "Canary Name", "phone": "+972501234567"},
            "from": {"street": "Canary Street 5", "locality": "Haifa", "floor": 3, "elevator": false},
            "to": {"street": "Other St 1", "locality": "Kiryat Ata", "floor": 2, "elevator": false},
            "date": "2026-02-23", "time_window": "Morning", "volume": "1BR",
            "extras": ["Fridge", "Washing machine"],
            "estimate": {"min": 850, "max": 950},
            "notes": "call me at 0501234567", "media": ["https://example.com/p.jpg"]
        }))
        .unwrap()
    }

    #[test]
    fn crew_message_matches_the_domain_example() {
        let id = Uuid::parse_str("0952ef82-0000-4000-8000-000000000000").unwrap();
        let text = CrewLeadView::from_lead(id, &lead()).render();
        assert_eq!(
            text,
            "FOR CREW (copy to group)\nJob #0952ef82\nRoute: Haifa → Kiryat Ata\nDate: 23 Feb (Morning)\nVolume: 1BR\nFloors: 3 → 2 (No elevator)\nExtras: Fridge, Washing machine\nEstimate: ₪850–₪950"
        );
    }

    #[test]
    fn crew_view_never_carries_personal_fields() {
        let mut l = lead();
        l.volume = Some("call +972501234567".into());
        l.extras.push("see https://x.y".into());
        let text = CrewLeadView::from_lead(Uuid::nil(), &l).render();
        for canary in ["Canary", "972501234567", "Street", "call me", "https://"] {
            assert!(!text.contains(canary), "{canary} leaked into: {text}");
        }
    }
}

impl FullLead {
    /// Parse a lead strictly, as it arrives at the edge: a field the model does
    /// not know is an error (`lead.client.nickname is not a known field`).
    /// Stored leads are read leniently, so a field added later never breaks a
    /// workflow already running.
    pub fn parse_strict(value: &serde_json::Value) -> Result<FullLead, String> {
        let lead: FullLead = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
        let known = serde_json::to_value(&lead).map_err(|e| e.to_string())?;
        match unknown_field(value, &known, "lead") {
            Some(path) => Err(format!("`{path}` is not a known field")),
            None => Ok(lead),
        }
    }
}

/// The first path in `given` whose key `known` (the model re-serialized) lacks.
fn unknown_field(given: &serde_json::Value, known: &serde_json::Value, at: &str) -> Option<String> {
    use serde_json::Value;
    match (given, known) {
        (Value::Object(g), Value::Object(k)) => g.iter().find_map(|(name, v)| match k.get(name) {
            None => Some(format!("{at}.{name}")),
            Some(kv) => unknown_field(v, kv, &format!("{at}.{name}")),
        }),
        (Value::Array(g), Value::Array(k)) => g
            .iter()
            .zip(k)
            .enumerate()
            .find_map(|(i, (gv, kv))| unknown_field(gv, kv, &format!("{at}[{i}]"))),
        _ => None,
    }
}
