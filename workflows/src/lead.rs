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

/// Volume categories a tenant accepts when it sets no `dispatch.crew.volumes`.
pub const DEFAULT_VOLUMES: &[&str] = &[
    "Few items",
    "Studio",
    "1BR",
    "2BR",
    "3BR",
    "4BR",
    "5BR+",
    "House",
    "Office",
    "Storage unit",
];

/// Extras a tenant accepts when it sets no `dispatch.crew.extras`.
pub const DEFAULT_EXTRAS: &[&str] = &[
    "Fridge",
    "Washing machine",
    "Dryer",
    "Dishwasher",
    "Oven",
    "Piano",
    "Sofa",
    "Bed",
    "Wardrobe",
    "Table",
    "Chairs",
    "TV",
    "Boxes",
    "Packing",
    "Disassembly",
    "Assembly",
    "Crane",
    "Storage",
    "Safe",
    "Aquarium",
    "Bicycle",
    "Plants",
    "Mirror",
    "Artwork",
];

/// Time windows a tenant accepts when it sets no `dispatch.crew.time_windows`.
pub const DEFAULT_TIME_WINDOWS: &[&str] = &[
    "Morning",
    "Noon",
    "Afternoon",
    "Evening",
    "All day",
    "Flexible",
];

/// Longest locality name (characters).
pub const MAX_LOCALITY_CHARS: usize = 60;
/// Digits all labels of one job may hold together (`3BR`, `2 ACs`).
pub const MAX_LABEL_DIGITS: usize = 4;
/// Most extras on one job.
pub const MAX_EXTRAS: usize = 20;
/// Floors a job may name (basement levels to a tall tower).
pub const FLOORS: std::ops::RangeInclusive<i32> = -5..=120;
/// Largest estimate, in whole shekels.
pub const MAX_ESTIMATE: u32 = 1_000_000;

/// A crew-visible field that may not be shown to a crew, and why. It names
/// the field, never its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsafeField {
    /// The field's path in the start input, e.g. `lead.extras[2]`.
    pub field: String,
    /// Why, in words that carry none of the value.
    pub reason: &'static str,
}

impl std::fmt::Display for UnsafeField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` {}", self.field, self.reason)
    }
}

/// Unicode-normalize (NFKC: full-width and other compatibility digits become
/// ASCII digits) and trim; every check runs on this form.
pub fn normalize(s: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    s.nfkc().collect::<String>().trim().to_string()
}

/// The tenant's closed list at `pointer`, or `default`.
fn vocabulary(config: &serde_json::Value, pointer: &str, default: &[&str]) -> Vec<String> {
    match config
        .pointer(pointer)
        .and_then(serde_json::Value::as_array)
    {
        Some(list) => list
            .iter()
            .filter_map(serde_json::Value::as_str)
            .map(normalize)
            .collect(),
        None => default.iter().map(|s| s.to_string()).collect(),
    }
}

/// The list's own spelling of `value`, compared after normalization, ignoring
/// case. With `enforce` false a value off the list passes as normalized (the
/// list was enforced when the lead arrived).
fn from_vocabulary(
    value: &str,
    list: &[String],
    enforce: bool,
    field: String,
    reason: &'static str,
) -> Result<String, UnsafeField> {
    let v = normalize(value);
    let lower = v.to_lowercase();
    match list.iter().find(|entry| entry.to_lowercase() == lower) {
        Some(entry) => Ok(entry.clone()),
        None if !enforce && v.chars().count() <= 40 => Ok(v),
        None => Err(UnsafeField { field, reason }),
    }
}

/// A time window in the strict shape `HH:MM-HH:MM` (or with `–`), normalized.
fn time_range(value: &str) -> Option<String> {
    let v = normalize(value).replace('–', "-").replace(' ', "");
    let (a, b) = v.split_once('-')?;
    let hhmm = |t: &str| {
        let (h, m) = t.split_once(':')?;
        let (h, m) = (h.parse::<u8>().ok()?, m.parse::<u8>().ok()?);
        (h < 24 && m < 60 && t.len() == 5).then(|| format!("{h:02}:{m:02}"))
    };
    Some(format!("{}–{}", hhmm(a)?, hhmm(b)?))
}

/// A blank optional text is an absent one.
fn present(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.trim().is_empty())
}

/// Whole words of a text, lower-cased, after normalization.
fn words(s: &str) -> Vec<String> {
    normalize(s)
        .to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.chars().count() >= 2)
        .map(str::to_string)
        .collect()
}

/// A place name: letters (any script), spaces and `-'’.()`, at least one
/// letter, no digit, length-bounded; never a word of the client's name; from
/// the tenant's `dispatch.crew.localities` when it keeps one.
fn locality(
    value: &Option<String>,
    field: &str,
    lead: &FullLead,
    config: &serde_json::Value,
    enforce: bool,
) -> Result<Option<String>, UnsafeField> {
    let Some(raw) = present(value) else {
        return Ok(None);
    };
    let v = normalize(raw);
    let fail = |reason| UnsafeField {
        field: field.to_string(),
        reason,
    };
    if v.chars().count() > MAX_LOCALITY_CHARS {
        return Err(fail("is longer than a place name"));
    }
    let shape = v.chars().any(char::is_alphabetic)
        && v.chars().all(|c| {
            (c.is_alphabetic() && !c.is_numeric())
                || c == ' '
                || "-'’.()".contains(c)
                || is_combining_mark(c)
        });
    if !shape {
        return Err(fail(
            "must be a place name: letters, spaces and - ' . ( ) only",
        ));
    }
    // The client's name, whole, or a place made only of words of it ("Kfar
    // Yona" for a client named Yona is a real town; "Yona Cohen" is not).
    let name = lead.client.name.as_deref().map(words).unwrap_or_default();
    let place = words(&v);
    let whole_name = !name.is_empty() && place.windows(name.len()).any(|w| w == name.as_slice());
    if whole_name || (!place.is_empty() && place.iter().all(|w| name.contains(w))) {
        return Err(fail("carries the client's name"));
    }
    if config.pointer("/dispatch/crew/localities").is_some() {
        let list = vocabulary(config, "/dispatch/crew/localities", &[]);
        return from_vocabulary(
            &v,
            &list,
            enforce,
            field.to_string(),
            "is not one of the tenant's localities",
        )
        .map(Some);
    }
    Ok(Some(v))
}

/// Combining marks (Hebrew points, Arabic harakat, accents written apart).
fn is_combining_mark(c: char) -> bool {
    matches!(c as u32, 0x0300..=0x036F | 0x0591..=0x05C7 | 0x0610..=0x061A | 0x064B..=0x065F | 0x0670 | 0x06D6..=0x06ED)
}

impl CrewLeadView {
    /// Build the crew view from the allowlist, every field checked: volume,
    /// extras and time window from the tenant's closed lists (their own
    /// spelling is what crews see), localities as place names, numbers in
    /// range. The first field that fails is named; nothing is scrubbed.
    pub fn checked(
        lead_id: Uuid,
        lead: &FullLead,
        config: &serde_json::Value,
    ) -> Result<Self, UnsafeField> {
        Self::checked_with(lead_id, lead, config, true)
    }

    /// [`CrewLeadView::checked`], the tenant's closed lists enforced or not
    /// (`lists`); every shape rule holds either way.
    pub fn checked_with(
        lead_id: Uuid,
        lead: &FullLead,
        config: &serde_json::Value,
        lists: bool,
    ) -> Result<Self, UnsafeField> {
        let volumes = vocabulary(config, "/dispatch/crew/volumes", DEFAULT_VOLUMES);
        let extras_list = vocabulary(config, "/dispatch/crew/extras", DEFAULT_EXTRAS);
        let windows = vocabulary(config, "/dispatch/crew/time_windows", DEFAULT_TIME_WINDOWS);
        let volume = present(&lead.volume)
            .map(|v| {
                from_vocabulary(
                    v,
                    &volumes,
                    lists,
                    "lead.volume".into(),
                    "is not one of the tenant's volume categories",
                )
            })
            .transpose()?;
        let time_window = present(&lead.time_window)
            .map(|v| {
                time_range(v).map(Ok).unwrap_or_else(|| {
                    from_vocabulary(
                        v,
                        &windows,
                        lists,
                        "lead.time_window".into(),
                        "is neither one of the tenant's time windows nor HH:MM-HH:MM",
                    )
                })
            })
            .transpose()?;
        if lead.extras.len() > MAX_EXTRAS {
            return Err(UnsafeField {
                field: "lead.extras".into(),
                reason: "has more items than a job carries",
            });
        }
        let extras = lead
            .extras
            .iter()
            .enumerate()
            .map(|(i, e)| {
                from_vocabulary(
                    e,
                    &extras_list,
                    lists,
                    format!("lead.extras[{i}]"),
                    "is not one of the tenant's extras",
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Labels are words; a number dictated across several of them (a tenant
        // list with digit items, "+1 555", "0100", "199") is not a label.
        let mut digits = 0;
        let labels = volume.iter().map(|v| ("lead.volume".to_string(), v)).chain(
            extras
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("lead.extras[{i}]"), v)),
        );
        for (field, label) in labels {
            digits += label.chars().filter(char::is_ascii_digit).count();
            if digits > MAX_LABEL_DIGITS {
                return Err(UnsafeField {
                    field,
                    reason: "brings the labels' digits past what a label holds",
                });
            }
        }
        for (field, floor) in [
            ("lead.from.floor", lead.from.floor),
            ("lead.to.floor", lead.to.floor),
        ] {
            if floor.is_some_and(|f| !FLOORS.contains(&f)) {
                return Err(UnsafeField {
                    field: field.into(),
                    reason: "is not a floor between -5 and 120",
                });
            }
        }
        if let Some(e) = lead.estimate {
            if e.min > e.max || e.max > MAX_ESTIMATE {
                return Err(UnsafeField {
                    field: "lead.estimate".into(),
                    reason: "must have min <= max <= 1000000",
                });
            }
        }
        Ok(CrewLeadView {
            short_id: short_id(lead_id),
            from_locality: locality(
                &lead.from.locality,
                "lead.from.locality",
                lead,
                config,
                lists,
            )?,
            to_locality: locality(&lead.to.locality, "lead.to.locality", lead, config, lists)?,
            date: lead.date,
            time_window,
            volume,
            floors: (lead.from.floor, lead.to.floor),
            elevators: (lead.from.elevator, lead.to.elevator),
            extras,
            estimate: lead.estimate,
        })
    }

    /// The crew field shown at char `at` of a text [`CrewLeadView::render`]
    /// made (a detector finding's start).
    pub fn field_at(text: &str, at: usize) -> &'static str {
        let before: String = text.chars().take(at).collect();
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line = text[line_start..].lines().next().unwrap_or("");
        let column = &before[line_start..];
        match line.split(':').next().unwrap_or("") {
            "Route" if column.contains('→') => "lead.to.locality",
            "Route" => "lead.from.locality",
            "Date" => "lead.time_window",
            "Volume" => "lead.volume",
            "Floors" if column.contains('→') => "lead.to.floor",
            "Floors" => "lead.from.floor",
            "Extras" => "lead.extras",
            "Estimate" => "lead.estimate",
            _ => "key",
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

    fn crew(l: &FullLead) -> Result<CrewLeadView, UnsafeField> {
        CrewLeadView::checked(Uuid::nil(), l, &serde_json::json!({}))
    }

    #[test]
    fn crew_message_matches_the_domain_example() {
        let id = Uuid::parse_str("0952ef82-0000-4000-8000-000000000000").unwrap();
        let text = CrewLeadView::checked(id, &lead(), &serde_json::json!({}))
            .unwrap()
            .render();
        assert_eq!(
            text,
            "FOR CREW (copy to group)\nJob #0952ef82\nRoute: Haifa → Kiryat Ata\nDate: 23 Feb (Morning)\nVolume: 1BR\nFloors: 3 → 2 (No elevator)\nExtras: Fridge, Washing machine\nEstimate: ₪850–₪950"
        );
    }

    #[test]
    fn crew_fields_come_from_closed_lists_whatever_the_digits() {
        let field = |l: &FullLead| crew(l).unwrap_err().field;
        let mut l = lead();
        l.volume = Some("０５５５-０１００-１９９".into());
        assert_eq!(field(&l), "lead.volume");
        let mut l = lead();
        l.volume = Some("٠٥٥٥٠١٠٠١٩٩".into());
        assert_eq!(field(&l), "lead.volume");
        let mut l = lead();
        l.extras = vec!["+1 555".into(), "0100".into(), "199".into()];
        assert_eq!(field(&l), "lead.extras[0]");
        let mut l = lead();
        l.time_window = Some("call 0501234567".into());
        assert_eq!(field(&l), "lead.time_window");
    }

    #[test]
    fn a_locality_is_a_place_name_never_the_clients_name() {
        let mut l = lead();
        l.to.locality = Some("Canary Name".into());
        let e = crew(&l).unwrap_err();
        assert_eq!(e.field, "lead.to.locality");
        assert!(!e.to_string().contains("Canary"), "{e}");
        for bad in [
            "Haifa ０５５５０１００",
            "x@y.z",
            "https://t.me/x",
            "Haifa 5",
        ] {
            let mut l = lead();
            l.from.locality = Some(bad.into());
            assert_eq!(crew(&l).unwrap_err().field, "lead.from.locality", "{bad}");
        }
        for good in [
            "Tel Aviv-Yafo",
            "Kiryat Ata",
            "חיפה",
            "Ma'alot-Tarshiha",
            "Rishon LeZion",
        ] {
            let mut l = lead();
            l.from.locality = Some(good.into());
            assert!(crew(&l).is_ok(), "{good}");
        }
    }

    #[test]
    fn tenant_lists_replace_the_defaults_and_keep_their_spelling() {
        let cfg = serde_json::json!({"dispatch": {"crew": {
            "volumes": ["דירת 3 חדרים"], "extras": ["Fridge", "Washing machine"],
            "localities": ["Haifa", "Kiryat Ata"]
        }}});
        let mut l = lead();
        l.volume = Some("דירת 3 חדרים".into());
        l.extras = vec!["fridge".into()];
        let v = CrewLeadView::checked(Uuid::nil(), &l, &cfg).unwrap();
        assert_eq!(v.extras, vec!["Fridge".to_string()]);
        l.from.locality = Some("Nazareth".into());
        assert_eq!(
            CrewLeadView::checked(Uuid::nil(), &l, &cfg)
                .unwrap_err()
                .field,
            "lead.from.locality"
        );
    }

    #[test]
    fn blank_optional_fields_are_absent_and_time_ranges_have_a_strict_shape() {
        let mut l = lead();
        l.notes = Some(String::new());
        l.from.street = Some("  ".into());
        l.to.locality = Some(String::new());
        assert!(l.check_text().is_ok());
        let v = crew(&l).unwrap();
        assert_eq!(v.to_locality, None);
        l.time_window = Some("０８:００ - 10:30".into());
        assert_eq!(
            crew(&l).unwrap().time_window.as_deref(),
            Some("08:00–10:30")
        );
        l.time_window = Some("08:00-10:30 call 0501234567".into());
        assert_eq!(crew(&l).unwrap_err().field, "lead.time_window");
    }

    #[test]
    fn a_town_named_like_a_word_of_the_clients_name_is_still_a_town() {
        let mut l = lead();
        l.client.name = Some("Yona Cohen".into());
        l.to.locality = Some("Kfar Yona".into());
        assert!(crew(&l).is_ok());
        for bad in ["Yona Cohen", "Cohen", "Near Yona Cohen"] {
            l.to.locality = Some(bad.into());
            assert_eq!(crew(&l).unwrap_err().field, "lead.to.locality", "{bad}");
        }
    }

    #[test]
    fn crew_view_never_carries_personal_fields() {
        let text = crew(&lead()).unwrap().render();
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
        if let Some(path) = unknown_field(value, &known, "lead") {
            return Err(format!("`{path}` is not a known field"));
        }
        lead.check_text()?;
        Ok(lead)
    }

    /// Every text field of the lead under the one printable-text rule:
    /// names without bidirectional controls, notes on several lines.
    fn check_text(&self) -> Result<(), String> {
        use crate::text::{check_field, TextKind};
        let opt = |field: &str, v: &Option<String>, kind, max| match present(v) {
            Some(v) => check_field(field, v, kind, max),
            None => Ok(()),
        };
        opt("lead.client.name", &self.client.name, TextKind::Name, 200)?;
        opt("lead.client.phone", &self.client.phone, TextKind::Line, 40)?;
        for (end, a) in [("from", &self.from), ("to", &self.to)] {
            opt(
                &format!("lead.{end}.street"),
                &a.street,
                TextKind::Line,
                300,
            )?;
            opt(
                &format!("lead.{end}.locality"),
                &a.locality,
                TextKind::Name,
                200,
            )?;
        }
        opt("lead.time_window", &self.time_window, TextKind::Line, 100)?;
        opt("lead.volume", &self.volume, TextKind::Line, 100)?;
        opt("lead.notes", &self.notes, TextKind::Multiline, 5000)?;
        for (i, e) in self.extras.iter().enumerate() {
            check_field(&format!("lead.extras[{i}]"), e, TextKind::Line, 100)?;
        }
        for (i, m) in self.media.iter().enumerate() {
            check_field(&format!("lead.media[{i}]"), m, TextKind::Line, 2000)?;
        }
        Ok(())
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
