//! The one rule for stored free text: reasons, names, notes, provider
//! settings, route texts. Every field of that kind, at every way in (HTTP,
//! chat commands, the CLI, a workflow's own payload check), passes
//! [`check`], so the same input is refused the same way everywhere.
//!
//! Printable means: no control character (C0, DEL, C1), no line or paragraph
//! separator and no interlinear annotation character; a multi-line field may
//! hold line breaks and tabs. A name also refuses the bidirectional controls
//! (embeddings, overrides, isolates and marks) that can make a name read as
//! another one ("Trojan Source"); so does every single-line field.

/// What a field may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextKind {
    /// One line: a reason, a label, a setting, an e-mail address.
    Line,
    /// Several lines: notes, a message, a route's text (`\n`, `\r`, `\t` allowed).
    Multiline,
    /// A person's or a place's name: one line, no bidirectional controls.
    Name,
}

/// Why a text was refused, in words that carry none of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextError {
    /// Empty after trimming.
    Empty,
    /// Over the field's length (characters).
    TooLong(usize),
    /// A control or otherwise unprintable character.
    Unprintable,
    /// A bidirectional control character.
    Bidi,
}

impl std::fmt::Display for TextError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TextError::Empty => write!(f, "must not be empty"),
            TextError::TooLong(n) => write!(f, "must be at most {n} characters"),
            TextError::Unprintable => write!(f, "must hold printable characters only"),
            TextError::Bidi => write!(f, "must not hold bidirectional control characters"),
        }
    }
}

/// Bidirectional formatting characters (Unicode's Bidi_Control set).
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

fn unprintable(c: char, kind: TextKind) -> bool {
    let allowed_break = kind == TextKind::Multiline && matches!(c, '\n' | '\r' | '\t');
    (c.is_control() && !allowed_break)
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{FFF9}'..='\u{FFFB}')
}

/// Check `s` (not trimmed by this function; callers store what they trim)
/// against the rule for `kind`, 1..=`max` characters.
pub fn check(s: &str, kind: TextKind, max: usize) -> Result<(), TextError> {
    if s.trim().is_empty() {
        return Err(TextError::Empty);
    }
    if s.chars().count() > max {
        return Err(TextError::TooLong(max));
    }
    if s.chars().any(|c| unprintable(c, kind)) {
        return Err(TextError::Unprintable);
    }
    if kind != TextKind::Multiline && s.chars().any(is_bidi_control) {
        return Err(TextError::Bidi);
    }
    Ok(())
}

/// [`check`] as a sentence naming `field`: "`reason` must hold printable characters only".
pub fn check_field(field: &str, s: &str, kind: TextKind, max: usize) -> Result<(), String> {
    check(s, kind, max).map_err(|e| format!("`{field}` {e}"))
}

/// Error text with the client's values taken out. serde's messages quote
/// what they were given (`invalid type: string "+15550100199", expected
/// i64`, ``unknown variant `a@b.c` ``); what is left names the field and
/// what was expected. Bounded to 300 characters.
pub fn redact(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(300));
    let mut rest = message;
    while !rest.is_empty() {
        // A quoted value: "…" (with escapes) or `…`.
        let next = rest.find(['"', '`']);
        let Some(i) = next else {
            out.push_str(rest);
            break;
        };
        out.push_str(&rest[..i]);
        let quote = rest.as_bytes()[i] as char;
        let after = &rest[i + 1..];
        let mut end = None;
        let mut escaped = false;
        for (j, c) in after.char_indices() {
            if escaped {
                escaped = false;
            } else if c == '\\' && quote == '"' {
                escaped = true;
            } else if c == quote {
                end = Some(j);
                break;
            }
        }
        let Some(j) = end else {
            // Unbalanced: drop the rest rather than echo it.
            break;
        };
        let inner = &after[..j];
        // serde quotes the client's own value right after these.
        let clause = out.rsplit(", ").next().unwrap_or(&out);
        let their_value = ["unknown variant", "invalid value", "invalid type"]
            .iter()
            .any(|p| clause.contains(p))
            && !clause.contains('`');
        if quote == '`' && is_identifier(inner) && !their_value {
            // Our own field names (`lead.volume`) and serde's expected names.
            out.push('`');
            out.push_str(inner);
            out.push('`');
        } else {
            out.push_str("(value)");
        }
        rest = &after[j + 1..];
    }
    let literal = ["invalid type: ", "invalid value: "];
    for l in literal {
        // `invalid type: integer 5550100, expected …` carries the number bare.
        if let Some(i) = out.find(l) {
            let start = i + l.len();
            if let Some(comma) = out[start..].find(", expected") {
                let what: String = out[start..start + comma]
                    .split(' ')
                    .next()
                    .unwrap_or("")
                    .to_string();
                out.replace_range(start..start + comma, &what);
            }
        }
    }
    if out.chars().count() > 300 {
        out = out.chars().take(299).collect::<String>() + "…";
    }
    out
}

/// A short field or variant name we may echo.
fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.[]/-".contains(c))
        && s.chars().filter(char::is_ascii_digit).nth(4).is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_for_every_field() {
        assert!(check("late truck", TextKind::Line, 500).is_ok());
        assert_eq!(
            check("a\u{7}b", TextKind::Line, 500),
            Err(TextError::Unprintable)
        );
        assert_eq!(
            check("a\nb", TextKind::Line, 500),
            Err(TextError::Unprintable)
        );
        assert!(check("a\nb\tc", TextKind::Multiline, 500).is_ok());
        assert_eq!(
            check("a\u{1b}[2Jb", TextKind::Multiline, 500),
            Err(TextError::Unprintable)
        );
        assert_eq!(
            check("Eve\u{202E}rotaredo", TextKind::Name, 200),
            Err(TextError::Bidi)
        );
        assert_eq!(check("  ", TextKind::Name, 200), Err(TextError::Empty));
        assert_eq!(check("ab", TextKind::Name, 1), Err(TextError::TooLong(1)));
        assert!(check("דנה כהן", TextKind::Name, 200).is_ok());
    }

    #[test]
    fn errors_keep_the_field_and_lose_the_value() {
        let cases = [
            (
                "invalid type: string \"+15550100199\", expected i64",
                "invalid type: string, expected i64",
            ),
            (
                "unknown variant `dana@example.com`, expected `telegram` or `whatsapp`",
                "unknown variant (value), expected `telegram` or `whatsapp`",
            ),
            (
                "invalid type: integer `5550100199`, expected a string",
                "invalid type: integer, expected a string",
            ),
            (
                "`lead.volume` is not one of the tenant's volume categories",
                "`lead.volume` is not one of the tenant's volume categories",
            ),
            (
                "unknown field `+1 555 0100`, expected `name`",
                "unknown field (value), expected `name`",
            ),
        ];
        for (given, want) in cases {
            assert_eq!(redact(given), want);
        }
        let huge = format!("unknown workflow kind `{}`", "x".repeat(1_000_000));
        assert!(redact(&huge).chars().count() <= 300);
        assert!(!redact("invalid type: string \"abc").contains("abc"));
    }
}
