//! Anti-poaching scanner for relayed SMS messages.
//!
//! Clients and sitters talk through masked phone numbers. A message that
//! tries to move the conversation (or the payment) off the platform is
//! blocked. The business rule is: detect phone numbers in common formats,
//! emails, URLs, social handles and the keywords instagram, ig, snap,
//! whatsapp, telegram, "dm me", "text me" and "call me". A blocked message
//! is never delivered by default, and a scan error blocks (fail closed).
//!
//! What is detected, and how:
//!
//! * **Phones** ([`FindingKind::Phone`]): runs of digits, spelled-out digits
//!   ("five five five"), "oh"/"o" and the letter O standing for zero inside a
//!   run, and "double"/"triple", joined by spaces, dots, dashes, parentheses
//!   and a leading `+`. A run needs at least 7 digits and must parse with the
//!   `phonenumber` crate (libphonenumber) as a possible number. Runs of up to
//!   6 digits are never phones. Dates, year ranges, ZIP+4 codes, IP
//!   addresses, prices, time/decimal ranges, and digits attached to letters
//!   ("INV-2026-0042") or introduced by an id word ("order", "booking",
//!   "confirmation", "code", "password", "microchip", ...) are not phones,
//!   unless a phone word ("call", "text", "cell", ...) is nearer, or the run
//!   has a `+` or a parenthesised area code.
//! * **Emails and URLs** ([`FindingKind::Email`], [`FindingKind::Url`]): the
//!   `linkify` crate, with schemes optional so bare domains ("myname.com",
//!   "www.x.io") are found; a bare domain must end in a common top-level
//!   domain so sentence typos such as "home.Thanks" are not URLs. Obfuscated
//!   forms ("name at gmail dot com", "name (at) gmail (dot) com",
//!   "name[at]gmail[.]com", "name @ gmail . com", "mysite dot com") are found
//!   with regular expressions.
//! * **Handles** ([`FindingKind::Handle`]): `@name` that is not part of an
//!   email address and is not a time ("@3pm") or a common place shorthand
//!   ("@home", "@work").
//! * **Keywords** ([`FindingKind::Keyword`]): whole words, any case:
//!   instagram, insta, ig, snapchat, snap, whatsapp / whats app, telegram,
//!   facebook, fb, tiktok, and the phrases "dm me" (also "d.m. me"),
//!   "text me", "txt me" and "call me" (so "call me back" and "text me when
//!   you arrive" block, as the rule says; "texted me", "recall me" and
//!   "called me" do not). Off-platform
//!   payment apps (venmo, cashapp / cash app, zelle, paypal) are keywords too:
//!   taking payment outside the platform is poaching. Words that merely
//!   contain the letters ("big", "sign", "snapped", "telegraph", "instant")
//!   do not match.
//!
//! Findings carry char offsets (Unicode scalar values, end exclusive), are
//! sorted by start, and overlapping findings are merged into one whose kind
//! is that of the longest finding merged into it.
#![warn(missing_docs)]

use std::sync::LazyLock;

use linkify::{LinkFinder, LinkKind};
use regex::Regex;

/// What kind of contact detail or off-platform signal a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// A phone number, possibly spelled out, split or obfuscated.
    Phone,
    /// An email address, plain or obfuscated ("name at gmail dot com").
    Email,
    /// A URL or bare domain, plain or obfuscated ("mysite dot com").
    Url,
    /// A social handle such as `@name`.
    Handle,
    /// A social network, messaging app, payment app or contact phrase
    /// ("instagram", "whatsapp", "venmo", "call me", ...).
    Keyword,
}

/// One detected span of a message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Finding {
    /// What was found.
    pub kind: FindingKind,
    /// Start of the span, in chars (Unicode scalar values) from the start of
    /// the message.
    pub start: usize,
    /// End of the span, in chars (Unicode scalar values), exclusive.
    pub end: usize,
}

/// Whether a message may be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Nothing was found: deliver the message.
    Allow,
    /// Something was found (or the scan failed): do not deliver by default.
    Block,
}

/// The result of scanning one message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Scan {
    /// [`Verdict::Block`] when there is at least one finding.
    pub verdict: Verdict,
    /// Everything found, sorted by start, overlapping findings merged.
    pub findings: Vec<Finding>,
}

/// Why a message could not be scanned. Callers must block (fail closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    /// The message has more than [`MAX_CHARS`] chars (the count is carried).
    #[error("text too long to scan ({0} characters, limit {MAX_CHARS})")]
    TooLong(usize),
    /// The scanner itself failed (a panic was caught).
    #[error("the scanner failed")]
    Internal,
}

/// The longest message, in chars, that [`scan`] accepts.
pub const MAX_CHARS: usize = 10_000;

/// Scan a message. Errors mean "could not decide"; callers block (fail closed).
pub fn scan(text: &str) -> Result<Scan, ScanError> {
    let chars = text.chars().count();
    if chars > MAX_CHARS {
        return Err(ScanError::TooLong(chars));
    }
    let findings = std::panic::catch_unwind(|| find_all(text)).map_err(|_| ScanError::Internal)?;
    let verdict = if findings.is_empty() {
        Verdict::Allow
    } else {
        Verdict::Block
    };
    Ok(Scan { verdict, findings })
}

/// Fail-closed verdict: Block on any finding or error.
pub fn verdict(text: &str) -> Verdict {
    match scan(text) {
        Ok(scan) => scan.verdict,
        Err(_) => Verdict::Block,
    }
}

// ---------------------------------------------------------------------------
// Driver and merging
// ---------------------------------------------------------------------------

fn find_all(text: &str) -> Vec<Finding> {
    let offsets = CharOffsets::new(text);
    let mut raw = Vec::new();
    find_links(text, &offsets, &mut raw);
    find_obfuscated_links(text, &offsets, &mut raw);
    find_handles(text, &offsets, &mut raw);
    find_keywords(text, &offsets, &mut raw);
    let chars: Vec<char> = text.chars().collect();
    find_spaced_links(&chars, &mut raw);
    find_phones(&chars, &mut raw);
    merge(raw)
}

/// Addresses spelled one character at a time ("m a r c o @ g m a i l . c o m"):
/// runs of at least six single-character words are joined and scanned for an
/// email or a URL; a hit covers the whole run.
fn find_spaced_links(chars: &[char], out: &mut Vec<Finding>) {
    // (start, char) of every one-character word.
    let mut run: Vec<(usize, char)> = Vec::new();
    let mut flush = |run: &mut Vec<(usize, char)>| {
        if run.len() >= 6 {
            let joined: String = run.iter().map(|(_, c)| *c).collect();
            let offsets = CharOffsets::new(&joined);
            let mut found = Vec::new();
            find_links(&joined, &offsets, &mut found);
            if let Some(f) = found.first() {
                out.push(Finding {
                    kind: f.kind,
                    start: run[0].0,
                    end: run[run.len() - 1].0 + 1,
                });
            }
        }
        run.clear();
    };
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && !chars[i].is_whitespace() {
            i += 1;
        }
        // Words of one character, at most two spaces apart, form a run.
        let gap_ok = run.last().is_some_and(|(s, _)| start - s <= 3);
        if i - start == 1 {
            if !gap_ok {
                flush(&mut run);
            }
            run.push((start, chars[start]));
        } else {
            flush(&mut run);
        }
    }
    flush(&mut run);
}

/// Sorts findings by start and merges overlapping ones. A merged finding
/// spans the union and takes the kind of its longest member (ties go to the
/// earlier-starting one).
fn merge(mut raw: Vec<Finding>) -> Vec<Finding> {
    raw.retain(|f| f.end > f.start);
    raw.sort_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
    let mut out: Vec<Finding> = Vec::with_capacity(raw.len());
    let mut best_len = 0;
    for f in raw {
        match out.last_mut() {
            Some(cur) if f.start < cur.end => {
                if f.end - f.start > best_len {
                    best_len = f.end - f.start;
                    cur.kind = f.kind;
                }
                cur.end = cur.end.max(f.end);
            }
            _ => {
                best_len = f.end - f.start;
                out.push(f);
            }
        }
    }
    out
}

/// Converts byte offsets (as regex and linkify report them) to char offsets.
struct CharOffsets {
    /// `starts[i]` is the byte offset of char `i`; one extra entry for the end.
    starts: Vec<usize>,
}

impl CharOffsets {
    fn new(text: &str) -> Self {
        let mut starts: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
        starts.push(text.len());
        CharOffsets { starts }
    }

    fn char_at(&self, byte: usize) -> usize {
        match self.starts.binary_search(&byte) {
            Ok(i) | Err(i) => i,
        }
    }

    fn finding(&self, kind: FindingKind, start: usize, end: usize) -> Finding {
        Finding {
            kind,
            start: self.char_at(start),
            end: self.char_at(end),
        }
    }
}

// ---------------------------------------------------------------------------
// URLs and emails
// ---------------------------------------------------------------------------

/// Top-level domains accepted for bare domains (no scheme, no "www.") and for
/// obfuscated addresses. Common English words that are also TLDs ("in",
/// "it", "is", "to", "so", "no", "my", ...) are left out on purpose: a typo
/// like "home.it" is far more likely than a domain in a pet-sitting SMS.
const TLDS: &[&str] = &[
    "com", "net", "org", "edu", "gov", "io", "co", "me", "us", "info", "biz", "app", "dev", "ly",
    "gg", "tv", "xyz", "site", "online", "store", "shop", "link", "page", "ai", "ee", "uk", "ca",
    "de", "fr", "au", "nz", "ie", "es", "nl", "mx", "br", "pet", "pets", "dog", "vet", "club",
    "live", "life", "blog", "website", "space", "tech", "top", "fun", "social", "bio", "email",
    "mail", "im",
];

const TLD_ALTERNATION: &str = "com|net|org|edu|gov|io|co|me|us|info|biz|app|dev|ly|gg|tv|xyz|site|online|store|shop|link|page|ai|ee|uk|ca|de|fr|au|nz|ie|es|nl|mx|br|pets?|dog|vet|club|live|life|blog|website|space|tech|top|fun|social|bio|email|mail|im";

fn find_links(text: &str, offsets: &CharOffsets, out: &mut Vec<Finding>) {
    let mut finder = LinkFinder::new();
    finder
        .kinds(&[LinkKind::Url, LinkKind::Email])
        .url_must_have_scheme(false);
    for link in finder.links(text) {
        let kind = match link.kind() {
            LinkKind::Email => FindingKind::Email,
            _ => {
                if !plausible_url(link.as_str()) {
                    continue;
                }
                FindingKind::Url
            }
        };
        out.push(offsets.finding(kind, link.start(), link.end()));
    }
}

/// Whether a URL found by linkify is a real link and not a sentence typo
/// such as "Done.See" or a file name like "photo.jpg".
fn plausible_url(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    if lower.contains("://") || lower.starts_with("www.") || lower.starts_with("mailto:") {
        return true;
    }
    let host = s.split(['/', '?', '#', ':']).next().unwrap_or("");
    let tld = host.rsplit('.').next().unwrap_or("");
    let same_case =
        tld.chars().all(|c| c.is_ascii_lowercase()) || tld.chars().all(|c| c.is_ascii_uppercase());
    if !host.contains('.') || !same_case || !tld.chars().all(|c| c.is_ascii_alphabetic()) {
        return false;
    }
    // Any two-letter-or-longer TLD counts when a path follows the host
    // ("photos.app.goo.gl/AbC123"): sentence typos do not carry paths.
    let has_path = s[host.len()..].starts_with('/') && s.len() > host.len() + 1;
    TLDS.contains(&tld.to_ascii_lowercase().as_str()) || (has_path && tld.len() >= 2)
}

/// Obfuscated "at": `@` (spaces allowed around it) or a bracketed "at".
const OBF_AT: &str = r"(?:\s*@\s*|\s*[(\[{<]\s*(?:at|@)\s*[)\]}>]\s*)";
/// Obfuscated dot: the word "dot" or a bracketed "dot" / ".".
const OBF_DOT: &str = r"(?:\s*[(\[{<]\s*(?:dot|\.)\s*[)\]}>]\s*|\s+dot\s+)";
/// Dot in an obfuscated domain: [`OBF_DOT`], or a plain dot with spaces on
/// both sides ("mysite . com"); "done. Co-op" is a sentence, not a domain.
const URL_DOT: &str = r"(?:\s*[(\[{<]\s*(?:dot|\.)\s*[)\]}>]\s*|\s+dot\s+|\s+\.\s+)";

static OBF_EMAIL: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    let local = r"[a-z0-9][a-z0-9._%+-]*";
    let label = r"[a-z0-9][a-z0-9-]*";
    let any_dot = format!(r"(?:{OBF_DOT}|\s*\.\s*)");
    let patterns = [
        // name @ gmail . com, name(at)gmail(dot)com, name[at]gmail[.]com
        format!(
            r"(?i)\b{local}{OBF_AT}{label}(?:{any_dot}{label})*?{any_dot}(?:{TLD_ALTERNATION})\b"
        ),
        // name at gmail dot com, name at gmail.com (a plain dot must be tight)
        format!(
            r"(?i)\b{local}\s+at\s+{label}(?:(?:{OBF_DOT}|\.){label})*?(?:{OBF_DOT}|\.)(?:{TLD_ALTERNATION})\b"
        ),
        // name at gmail (a well-known mail provider and no domain at all)
        format!(
            r"(?i)\b{local}(?:\s+at\s+|{OBF_AT})(?:gmail|googlemail|yahoo|hotmail|icloud|aol|protonmail|proton\.me)\b"
        ),
    ];
    patterns
        .iter()
        .map(|p| Regex::new(p).expect("static regex"))
        .collect()
});

static OBF_URL: LazyLock<Regex> = LazyLock::new(|| {
    let label = r"[a-z0-9][a-z0-9-]*";
    Regex::new(&format!(
        r"(?i)\b{label}(?:{URL_DOT}{label})*?{URL_DOT}(?:{TLD_ALTERNATION})\b|\bwww{URL_DOT}{label}"
    ))
    .expect("static regex")
});

fn find_obfuscated_links(text: &str, offsets: &CharOffsets, out: &mut Vec<Finding>) {
    for re in OBF_EMAIL.iter() {
        for m in re.find_iter(text) {
            out.push(offsets.finding(FindingKind::Email, m.start(), m.end()));
        }
    }
    for m in OBF_URL.find_iter(text) {
        out.push(offsets.finding(FindingKind::Url, m.start(), m.end()));
    }
}

// ---------------------------------------------------------------------------
// Handles and keywords
// ---------------------------------------------------------------------------

static HANDLE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?:^|[^\w@.+-])(@[A-Za-z0-9_](?:[A-Za-z0-9_.]*[A-Za-z0-9_])?)")
        .expect("static regex")
});

static HANDLE_NOT: LazyLock<Regex> = LazyLock::new(|| {
    // "@3pm", "@10:30", "@ 5", "@home": times and place shorthands.
    Regex::new(
        r"(?i)^@(?:\d{1,2}(?:[:.]?\d{2})?(?:am|pm|a|p|ish)?|home|work|noon|midnight|night|school|the)$",
    )
    .expect("static regex")
});

fn find_handles(text: &str, offsets: &CharOffsets, out: &mut Vec<Finding>) {
    for caps in HANDLE.captures_iter(text) {
        let Some(m) = caps.get(1) else { continue };
        let handle = m.as_str();
        let has_letter = handle.chars().any(|c| c.is_ascii_alphabetic());
        if !has_letter || HANDLE_NOT.is_match(handle) {
            continue;
        }
        out.push(offsets.finding(FindingKind::Handle, m.start(), m.end()));
    }
}

static KEYWORDS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)\b(?:
            instagram | insta | ig
          | snapchat | snap
          | whats\s*-?\s*app | what['’]s\s*app
          | telegram
          | facebook | fb
          | tik\s*-?\s*tok
          | venmo | cash\s*-?\s*app | zelle | pay\s*-?\s*pal
          | (?:dm|d\.\s?m\.?|text|txt|call)\s+me
        )\b",
    )
    .expect("static regex")
});

fn find_keywords(text: &str, offsets: &CharOffsets, out: &mut Vec<Finding>) {
    for m in KEYWORDS.find_iter(text) {
        out.push(offsets.finding(FindingKind::Keyword, m.start(), m.end()));
    }
}

// ---------------------------------------------------------------------------
// Phones
// ---------------------------------------------------------------------------

/// Fewest digits (counting spelled-out ones) that make a phone number.
const MIN_PHONE_DIGITS: usize = 7;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokKind {
    /// ASCII digits, possibly with a letter O standing for zero ("2O7").
    Digits,
    /// A spelled-out digit ("five", "zero").
    Word(u8),
    /// "o" / "oh": zero, but only inside a run.
    Oh,
    /// "double" / "triple": repeats the next single digit.
    Repeat(u8),
    /// Any other word; breaks a run.
    Other,
}

#[derive(Debug)]
struct Tok {
    start: usize,
    end: usize,
    kind: TokKind,
    /// Lowercased text of the token.
    text: String,
}

impl Tok {
    fn is_digitish(&self) -> bool {
        self.kind != TokKind::Other
    }
}

fn classify(word: &str) -> TokKind {
    let has_digit = word.chars().any(|c| c.is_ascii_digit());
    if has_digit && word.chars().all(|c| c.is_ascii_digit() || c == 'o') {
        return TokKind::Digits;
    }
    let digit = match word {
        "zero" => 0,
        "one" => 1,
        "two" => 2,
        "three" => 3,
        "four" => 4,
        "five" => 5,
        "six" => 6,
        "seven" => 7,
        "eight" => 8,
        "nine" | "niner" => 9,
        "o" | "oh" => return TokKind::Oh,
        "double" => return TokKind::Repeat(2),
        "triple" => return TokKind::Repeat(3),
        _ => return TokKind::Other,
    };
    TokKind::Word(digit)
}

fn tokenize(chars: &[char]) -> Vec<Tok> {
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_alphanumeric() {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && chars[i].is_alphanumeric() {
            i += 1;
        }
        let text: String = chars[start..i]
            .iter()
            .map(|&c| fold_digit(c))
            .flat_map(char::to_lowercase)
            .collect();
        let kind = classify(&text);
        let glued = if kind == TokKind::Other {
            split_glued(&text)
        } else {
            None
        };
        if let Some(parts) = glued {
            // `split_glued` only splits ASCII words, whose chars map one to
            // one onto `chars`, so part lengths map back to offsets.
            let mut at = start;
            for part in parts {
                let len = part.chars().count();
                toks.push(Tok {
                    start: at,
                    end: at + len,
                    kind: classify(&part),
                    text: part,
                });
                at += len;
            }
            continue;
        }
        toks.push(Tok {
            start,
            end: i,
            kind,
            text,
        });
    }
    toks
}

/// Folds fullwidth digits ("５５５") to ASCII.
fn fold_digit(c: char) -> char {
    match c {
        '\u{FF10}'..='\u{FF19}' => {
            char::from_u32(u32::from(c) - 0xFF10 + u32::from('0')).unwrap_or(c)
        }
        _ => c,
    }
}

/// Number words that may be glued to digits or to each other.
const GLUED_WORDS: &[&str] = &[
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "oh",
];

/// Splits a word such as "five5five" or "fivefivefive" into digit runs and
/// number words; `None` unless the whole word splits and has at least two
/// parts.
fn split_glued(word: &str) -> Option<Vec<String>> {
    if !word.is_ascii() {
        return None;
    }
    let mut parts = Vec::new();
    let mut rest = word;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits > 0 {
            parts.push(rest[..digits].to_string());
            rest = &rest[digits..];
            continue;
        }
        let w = GLUED_WORDS.iter().find(|w| rest.starts_with(**w))?;
        parts.push((*w).to_string());
        rest = &rest[w.len()..];
    }
    (parts.len() >= 2).then_some(parts)
}

fn is_invisible(c: char) -> bool {
    // Zero-width characters, the soft hyphen, and the parts of keycap emoji
    // ("5️⃣" is "5", U+FE0F, U+20E3).
    matches!(
        c,
        '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}' | '\u{00AD}' | '\u{FE0F}' | '\u{20E3}'
    )
}

/// Whether the characters between two digit-ish tokens keep them in one run.
fn joins(sep: &[char], prev: &Tok, next: &Tok) -> bool {
    if sep.len() > 5 {
        return false;
    }
    let spelled = !matches!(prev.kind, TokKind::Digits) || !matches!(next.kind, TokKind::Digits);
    let mut parens = 0;
    let both_digits = matches!(prev.kind, TokKind::Digits) && matches!(next.kind, TokKind::Digits);
    // One line break between groups of at least three digits ("312 555\n0147").
    let groups = both_digits && prev.text.len() >= 3 && next.text.len() >= 3;
    let newlines = sep.iter().filter(|c| **c == '\n').count();
    for (i, &c) in sep.iter().enumerate() {
        match c {
            '\n' | '\r' if groups && newlines <= 1 => {}
            '\n' | '\r' => return false,
            // Slashes between digit groups ("07700/900/123"); dates are excluded later.
            '/' if both_digits => {}
            // Emoji and other symbols between digits ("617🐾555🐾0198").
            c if !c.is_ascii()
                && !c.is_alphanumeric()
                && !c.is_whitespace()
                && !matches!(c, '\u{2010}'..='\u{2015}' | '\u{2212}') => {}
            // "at 5. Then 555..." is a sentence break; "555.123", "555 . 123"
            // and "Three one two. Five five five" are not.
            '.' if !spelled
                && sep.get(i + 1).is_some_and(|n| n.is_whitespace())
                && !(i > 0 && sep[i - 1].is_whitespace()) =>
            {
                return false;
            }
            '(' | ')' => parens += 1,
            ',' if spelled => {}
            c if c.is_whitespace() || is_invisible(c) => {}
            '-' | '.' | '_' | '*' | '~' | '\u{2010}'..='\u{2015}' | '\u{2212}' => {}
            _ => return false,
        }
    }
    parens <= 2
}

/// Words that introduce an identifier, code or amount, not a phone number.
const ID_WORDS: &[&str] = &[
    "order",
    "orders",
    "invoice",
    "inv",
    "booking",
    "bookings",
    "confirmation",
    "conf",
    "ref",
    "reference",
    "tracking",
    "receipt",
    "ticket",
    "case",
    "claim",
    "policy",
    "account",
    "acct",
    "member",
    "membership",
    "microchip",
    "chip",
    "serial",
    "transaction",
    "txn",
    "id",
    "po",
    "code",
    "codes",
    "pin",
    "passcode",
    "password",
    "pw",
    "pwd",
    "passwd",
    "wifi",
    "lockbox",
    "gate",
    "alarm",
    "garage",
    "keypad",
    "door",
    "combo",
    "combination",
    "zip",
    "zipcode",
    "postcode",
    "reservation",
    "rabies",
    "tag",
    "license",
    "registration",
    "sku",
    "item",
    "model",
    "vin",
    "routing",
    "card",
    "visa",
    "points",
    "steps",
];

/// Words that introduce a phone number; nearer than an id word, they win.
const PHONE_WORDS: &[&str] = &[
    "call",
    "text",
    "txt",
    "phone",
    "cell",
    "mobile",
    "tel",
    "telephone",
    "reach",
    "contact",
    "ring",
    "dial",
    "whatsapp",
    "signal",
    "me",
    "digits",
    "line",
];

/// Possessives that make "number" someone's phone number.
const POSSESSIVES: &[&str] = &[
    "my", "your", "our", "his", "her", "their", "personal", "own",
];

/// Words skipped when looking back for context ("booking number is ...").
const NEUTRAL_WORDS: &[&str] = &[
    "number", "num", "no", "nr", "is", "are", "was", "my", "the", "your", "our", "a", "it", "s",
    "at", "on", "for", "new",
];

const UNIT_WORDS: &[&str] = &[
    "dollars",
    "dollar",
    "bucks",
    "usd",
    "cents",
    "lbs",
    "lb",
    "kg",
    "mg",
    "ml",
    "steps",
    "miles",
    "mi",
    "km",
    "points",
    "pts",
    "calories",
    "kcal",
    "views",
    "followers",
];

fn find_phones(chars: &[char], out: &mut Vec<Finding>) {
    let toks = tokenize(chars);
    let mut i = 0;
    while i < toks.len() {
        if !toks[i].is_digitish() {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        loop {
            if j < toks.len()
                && toks[j].is_digitish()
                && joins(
                    &chars[toks[j - 1].end..toks[j].start],
                    &toks[j - 1],
                    &toks[j],
                )
            {
                j += 1;
                continue;
            }
            // Dictated in parts: "0 8 7, then 9 8 7, then 6 5 4 3".
            let dictated = j + 1 < toks.len()
                && toks[j].text == "then"
                && toks[j + 1].is_digitish()
                && chars[toks[j - 1].end..toks[j].start]
                    .iter()
                    .all(|c| c.is_whitespace() || matches!(c, ',' | '-' | ';'))
                && chars[toks[j].end..toks[j + 1].start]
                    .iter()
                    .all(|c| c.is_whitespace());
            if dictated {
                j += 2;
                continue;
            }
            break;
        }
        if let Some(f) = phone_in_run(chars, &toks, i, j) {
            out.push(f);
        }
        i = j;
    }
}

/// Decides whether the digit-ish tokens `toks[first..last]` are a phone.
fn phone_in_run(chars: &[char], toks: &[Tok], first: usize, last: usize) -> Option<Finding> {
    // "oh" and "double" only count inside a run.
    let mut a = first;
    let mut b = last;
    while a < b && matches!(toks[a].kind, TokKind::Oh) {
        a += 1;
    }
    while a < b && matches!(toks[b - 1].kind, TokKind::Oh | TokKind::Repeat(_)) {
        b -= 1;
    }
    if a == b {
        return None;
    }
    let run = &toks[a..b];

    let mut digits = String::new();
    let mut repeat = 1;
    for t in run {
        let piece: String = match t.kind {
            TokKind::Digits => t.text.replace('o', "0"),
            TokKind::Word(d) => char::from(b'0' + d).to_string(),
            TokKind::Oh => "0".to_string(),
            TokKind::Repeat(n) => {
                repeat = n;
                continue;
            }
            // The "then" of a dictated number (see `find_phones`).
            TokKind::Other if t.text == "then" => continue,
            TokKind::Other => return None,
        };
        if repeat > 1 && piece.len() == 1 {
            digits.push_str(&piece.repeat(usize::from(repeat)));
        } else {
            digits.push_str(&piece);
        }
        repeat = 1;
    }
    if digits.len() < MIN_PHONE_DIGITS || digits.len() > 15 {
        return None;
    }

    let mut start = run[0].start;
    let mut end = run[run.len() - 1].end;
    while end < chars.len() && is_invisible(chars[end]) {
        end += 1;
    }
    let before = |i: usize| {
        if i == 0 {
            None
        } else {
            chars.get(i - 1).copied()
        }
    };
    if before(start) == Some('(') {
        start -= 1;
    }
    let plus = before(start) == Some('+');
    if plus {
        start -= 1;
    }
    let span: String = chars[start..end].iter().collect();
    // A `+`, a parenthesised area code or the North American 3-3-4 grouping
    // ("555-123-4567", "555.123.4567") is a phone whatever the words around it.
    let strong = plus || span.contains('(') || NANP_GROUPED.is_match(&span);

    if !strong && not_a_phone(chars, toks, a, b, &span) {
        return None;
    }
    if !possible_phone(&digits, plus) {
        return None;
    }
    Some(Finding {
        kind: FindingKind::Phone,
        start,
        end,
    })
}

static NANP_GROUPED: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\d{3}([-. ])\d{3}([-. ])\d{4}$").expect("static regex"));
static DATE_LIKE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?:(?:19|20)\d{2}([-./])(?:0?[1-9]|1[0-2])([-./])(?:0?[1-9]|[12]\d|3[01])|(?:0?[1-9]|[12]\d|3[01])([-./])(?:0?[1-9]|[12]\d|3[01])([-./])(?:19|20)\d{2})$")
        .expect("static regex")
});
static YEAR_RANGE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?:19|20)\d{2}\s*[-–—]\s*(?:19|20)\d{2}$").expect("static regex")
});
static ZIP4: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\d{5}-\d{4}$").expect("static regex"));
static IPV4: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}$").expect("static regex"));
static DECIMAL_RANGE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^\d{1,4}\.\d{1,2}\s*[-–—]+\s*\d{1,4}\.\d{1,2}$").expect("static regex")
});

/// Context and shape checks for runs without a `+` or parenthesised area code.
fn not_a_phone(chars: &[char], toks: &[Tok], a: usize, b: usize, span: &str) -> bool {
    if DATE_LIKE.is_match(span)
        || YEAR_RANGE.is_match(span)
        || ZIP4.is_match(span)
        || IPV4.is_match(span)
        || DECIMAL_RANGE.is_match(span)
    {
        return true;
    }
    let start = toks[a].start;
    let end = toks[b - 1].end;

    // Money: "$1250000", "€ 1 250 000".
    let mut k = start;
    while k > 0 && chars[k - 1].is_whitespace() {
        k -= 1;
    }
    if k > 0 && matches!(chars[k - 1], '$' | '€' | '£' | '#' | '№') {
        return true;
    }

    // Digits glued to a word: "INV-2026-0042", "A-22319", "8842173-B".
    if a > 0 && toks[a - 1].end < start {
        let sep = &chars[toks[a - 1].end..start];
        if toks[a - 1].kind == TokKind::Other && sep.iter().all(|c| matches!(c, '-' | '_' | '/')) {
            return true;
        }
    }
    if let Some(next) = toks.get(b) {
        let sep = &chars[end..next.start];
        if next.kind == TokKind::Other
            && sep.iter().all(|c| matches!(c, '-' | '_' | '/'))
            && !sep.is_empty()
        {
            return true;
        }
        if UNIT_WORDS.contains(&next.text.as_str()) && sep.iter().all(|c| c.is_whitespace()) {
            return true;
        }
    }

    // Nearest meaningful word before the run: an id word means an id.
    let before: Vec<&Tok> = toks[..a].iter().rev().take(5).collect();
    for (i, t) in before.iter().enumerate().take(4) {
        let w = t.text.as_str();
        if PHONE_WORDS.contains(&w) {
            return false;
        }
        // "my number", "your number": someone's number is a phone number.
        let possessed = before
            .get(i + 1)
            .is_some_and(|p| POSSESSIVES.contains(&p.text.as_str()));
        if matches!(w, "number" | "num" | "no" | "nr" | "digits") && possessed {
            return false;
        }
        if ID_WORDS.contains(&w) {
            return true;
        }
        if !NEUTRAL_WORDS.contains(&w) {
            break;
        }
    }
    false
}

/// Asks libphonenumber whether the digits can be a phone number, leniently:
/// possible lengths, not only numbers valid for an assigned range.
fn possible_phone(digits: &str, plus: bool) -> bool {
    use phonenumber::country::Id;
    let (intl, candidate) = if plus {
        (true, format!("+{digits}"))
    } else if let Some(rest) = digits.strip_prefix("011") {
        (true, format!("+{rest}"))
    } else if let Some(rest) = digits.strip_prefix("00") {
        (true, format!("+{rest}"))
    } else {
        (false, digits.to_string())
    };
    if !phonenumber::is_viable(&candidate) {
        return false;
    }
    let Ok(number) = phonenumber::parse(Some(Id::US), &candidate) else {
        return false;
    };
    let national = number.national().to_string().len();
    let code = number.code().value();
    if intl {
        return number.is_valid()
            || (code != 1 && (6..=13).contains(&national))
            || (code == 1 && (7..=10).contains(&national));
    }
    if (7..=11).contains(&national) {
        return true;
    }
    // Written without "+": "44 20 7946 0958".
    phonenumber::parse(None, format!("+{digits}")).is_ok_and(|n| n.is_valid())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<FindingKind> {
        scan(text)
            .unwrap()
            .findings
            .iter()
            .map(|f| f.kind)
            .collect()
    }

    fn spans(text: &str) -> Vec<String> {
        let chars: Vec<char> = text.chars().collect();
        scan(text)
            .unwrap()
            .findings
            .iter()
            .map(|f| chars[f.start..f.end].iter().collect())
            .collect()
    }

    #[test]
    fn offsets_are_chars_on_non_ascii_text() {
        let text = "café — call me";
        let s = scan(text).unwrap();
        assert_eq!(s.verdict, Verdict::Block);
        assert_eq!(
            s.findings,
            vec![Finding {
                kind: FindingKind::Keyword,
                start: 7,
                end: 14
            }]
        );
        assert_eq!(spans("Ça va 😀 ➜ 917-555-0182 merci"), vec!["917-555-0182"]);
        assert_eq!(spans("naïve ✉ bob@example.com"), vec!["bob@example.com"]);
    }

    #[test]
    fn too_long_fails_closed() {
        let text = "a".repeat(MAX_CHARS + 1);
        assert_eq!(scan(&text), Err(ScanError::TooLong(MAX_CHARS + 1)));
        assert_eq!(verdict(&text), Verdict::Block);
        let ok = "a".repeat(MAX_CHARS);
        assert_eq!(verdict(&ok), Verdict::Allow);
        // The limit counts chars, not bytes.
        let wide = "é".repeat(MAX_CHARS);
        assert_eq!(verdict(&wide), Verdict::Allow);
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            ScanError::TooLong(12).to_string(),
            "text too long to scan (12 characters, limit 10000)"
        );
        assert_eq!(ScanError::Internal.to_string(), "the scanner failed");
    }

    #[test]
    fn overlapping_findings_merge() {
        // "instagram" (keyword) lies inside the URL: one finding, kind Url.
        let s = scan("see instagram.com/rexthedog").unwrap();
        assert_eq!(s.findings.len(), 1);
        assert_eq!(s.findings[0].kind, FindingKind::Url);
        assert_eq!((s.findings[0].start, s.findings[0].end), (4, 27));
        // "call me" and the number are separate, sorted by start.
        assert_eq!(
            kinds("call me 415 555 0133"),
            vec![FindingKind::Keyword, FindingKind::Phone]
        );
        let merged = merge(vec![
            Finding {
                kind: FindingKind::Keyword,
                start: 5,
                end: 8,
            },
            Finding {
                kind: FindingKind::Url,
                start: 0,
                end: 6,
            },
            Finding {
                kind: FindingKind::Handle,
                start: 10,
                end: 12,
            },
            Finding {
                kind: FindingKind::Email,
                start: 2,
                end: 9,
            },
        ]);
        assert_eq!(
            merged,
            vec![
                Finding {
                    kind: FindingKind::Email,
                    start: 0,
                    end: 9
                },
                Finding {
                    kind: FindingKind::Handle,
                    start: 10,
                    end: 12
                },
            ]
        );
    }

    #[test]
    fn phones_in_many_shapes() {
        for text in [
            "555.123.4567",
            "(555)123-4567",
            "+44 20 7946 0958",
            "5551234567",
            "555 123 4567",
            "5 5 5 - 1 2 3 - 4 5 6 7",
            "five five five one two three four five six seven",
            "nine one seven, four four two, oh one three eight",
            "555 two three four 9876",
            "my cell is 917-55O-O182",
            "555-1234 is my landline",
            "double five five, one two three, four five six seven",
            "Three one two. Five five five. Zero one eight seven.",
            "Number is 555 . 123 . 4567",
            "312 five5five 0187",
            "fivefivefive onetwothree fourfivesixseven",
            "４１５ ５５５ ０１３３",
            "+1-415-555-0133",
            "0033 6 12 34 56 78",
        ] {
            assert_eq!(kinds(text), vec![FindingKind::Phone], "{text}");
        }
    }

    #[test]
    fn service_numbers_are_not_phones() {
        for text in [
            "be there at 3:30pm, between 2-4 is fine",
            "that's $1,250.00 for the two weeks",
            "booked 12/24/2026 through 2026-11-22",
            "gate code 4821# and lockbox 0912",
            "alarm code is 1 2 3 4",
            "order #A-22319, booking 8842-17, invoice INV-2026-0042",
            "1423 Maple Ave Apt 5B, zip 94110-2231",
            "give 2.5 ml twice a day",
            "confirmation 88421733 sent",
            "wifi password is 83920174",
            "microchip 985 112 003 456 789",
            "the 2025-2026 season",
            "router is 192.168.1.1",
            "walks 10.15-11.30 daily",
            "he's a big boy, please sign the waiver, he snapped at the telegraph pole",
            "meet @3pm or @ 4, I'll be @home",
            "Done.See you tomorrow",
            "I'm done. Co-op pickup is at 5",
            "Walked to the park.Then home",
            "Order 1129384756 ships today",
            "Tracking 1Z999AA10123456784",
            "UPC 038100175632",
        ] {
            assert_eq!(verdict(text), Verdict::Allow, "{text}");
        }
    }

    #[test]
    fn keycap_digits_and_span_end() {
        let text = "4\u{FE0F}\u{20E3}1\u{FE0F}\u{20E3}5\u{FE0F}\u{20E3}5\u{FE0F}\u{20E3}5\u{FE0F}\u{20E3}5\u{FE0F}\u{20E3}0\u{FE0F}\u{20E3} ok";
        let s = scan(text).unwrap();
        assert_eq!(
            s.findings,
            vec![Finding {
                kind: FindingKind::Phone,
                start: 0,
                end: 21
            }]
        );
    }

    #[test]
    fn contact_phrases() {
        for text in ["D.M. me", "dm me", "TEXT ME", "call me back", "txt me"] {
            assert_eq!(kinds(text), vec![FindingKind::Keyword], "{text}");
        }
        for text in [
            "she texted me",
            "he called me",
            "recall me",
            "call mel",
            "a dm",
        ] {
            assert_eq!(verdict(text), Verdict::Allow, "{text}");
        }
    }

    #[test]
    fn ig_is_a_whole_word() {
        assert_eq!(kinds("what's your IG?"), vec![FindingKind::Keyword]);
        assert_eq!(verdict("big dog, sign here, twig"), Verdict::Allow);
    }

    #[test]
    fn obfuscated_emails_and_urls() {
        for text in [
            "jen.walks at gmail dot com",
            "jen (at) gmail (dot) com",
            "jen[at]gmail[.]com",
            "jen @ gmail . com",
            "check out happypaws dot com",
            "jen at gmail",
            "janesdogs . com",
            "www dot janesdogs dot net",
        ] {
            assert_eq!(verdict(text), Verdict::Block, "{text}");
        }
        assert_eq!(kinds("jen@example.org"), vec![FindingKind::Email]);
        assert_eq!(kinds("myname.com"), vec![FindingKind::Url]);
        assert_eq!(kinds("www.x.io"), vec![FindingKind::Url]);
    }

    #[test]
    fn handles_but_not_emails() {
        assert_eq!(kinds("follow @rex_the_pup"), vec![FindingKind::Handle]);
        assert_eq!(kinds("mail rex@pup.com"), vec![FindingKind::Email]);
    }
}
