//! The anti-poaching detector on labelled corpora of realistic pet-sitting SMS
//! (tests/data): recall at least 95 % and a false-positive rate under 5 %
//! (DOMAIN.md §2). `poaching_corpus.jsonl` was written alongside the
//! detector. `poaching_heldout.jsonl` was written independently, without
//! sight of the detector; two general fixes followed its misses.
//! `poaching_heldout2.jsonl` was written independently after those fixes;
//! its first run missed the recall target (0.929) and four more general fixes
//! followed. `poaching_heldout3.jsonl` was written independently after all of
//! them and has never been used to tune anything: its figures are the honest ones.

use dispatch::scan::{scan, verdict, FindingKind, ScanError, Verdict, MAX_CHARS};

#[derive(serde::Deserialize)]
struct Sample {
    text: String,
    block: bool,
    category: String,
}

fn load(name: &str) -> Vec<Sample> {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    let raw = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    raw.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{name} line {}: {e}", i + 1))
        })
        .collect()
}

/// (messages, recall, false-positive rate), printing every miss.
fn measure(name: &str) -> (usize, f64, f64) {
    let samples = load(name);
    let (mut tp, mut fn_, mut fp, mut tn) = (0usize, 0usize, 0usize, 0usize);
    for s in &samples {
        let blocked = verdict(&s.text) == Verdict::Block;
        match (s.block, blocked) {
            (true, true) => tp += 1,
            (true, false) => {
                fn_ += 1;
                println!("{name}: missed [{}] {}", s.category, s.text);
            }
            (false, true) => {
                fp += 1;
                println!("{name}: wrongly blocked [{}] {}", s.category, s.text);
            }
            (false, false) => tn += 1,
        }
    }
    let recall = tp as f64 / (tp + fn_) as f64;
    let fpr = fp as f64 / (fp + tn) as f64;
    println!("{name}: {} messages, TP={tp} FN={fn_} FP={fp} TN={tn}, recall {recall:.4}, false-positive rate {fpr:.4}", samples.len());
    (samples.len(), recall, fpr)
}

#[test]
fn detector_meets_the_targets_on_the_labelled_corpus() {
    let (n, recall, fpr) = measure("poaching_corpus.jsonl");
    assert!(n >= 300, "corpus too small: {n}");
    assert!(recall >= 0.95, "recall {recall:.4} below 0.95");
    assert!(fpr < 0.05, "false-positive rate {fpr:.4} not below 0.05");
}

#[test]
fn detector_meets_the_targets_on_the_independent_held_out_corpus() {
    let (n, recall, fpr) = measure("poaching_heldout.jsonl");
    assert!(n >= 200, "held-out corpus too small: {n}");
    assert!(recall >= 0.95, "recall {recall:.4} below 0.95");
    assert!(fpr < 0.05, "false-positive rate {fpr:.4} not below 0.05");
}

#[test]
fn detector_meets_the_targets_on_the_second_held_out_corpus() {
    let (n, recall, fpr) = measure("poaching_heldout2.jsonl");
    assert!(n >= 200, "held-out corpus too small: {n}");
    assert!(recall >= 0.95, "recall {recall:.4} below 0.95");
    assert!(fpr < 0.05, "false-positive rate {fpr:.4} not below 0.05");
}

#[test]
fn detector_meets_the_targets_on_the_third_held_out_corpus() {
    let (n, recall, fpr) = measure("poaching_heldout3.jsonl");
    assert!(n >= 200, "held-out corpus too small: {n}");
    assert!(recall >= 0.95, "recall {recall:.4} below 0.95");
    assert!(fpr < 0.05, "false-positive rate {fpr:.4} not below 0.05");
}

#[test]
fn findings_carry_character_offsets_and_errors_fail_closed() {
    let text = "café ☕ — dm me";
    let s = scan(text).unwrap();
    assert_eq!(s.verdict, Verdict::Block);
    let f = &s.findings[0];
    assert_eq!(f.kind, FindingKind::Keyword);
    let found: String = text.chars().skip(f.start).take(f.end - f.start).collect();
    assert_eq!(found.to_lowercase(), "dm me");
    let long = "a".repeat(MAX_CHARS + 1);
    assert_eq!(scan(&long), Err(ScanError::TooLong(MAX_CHARS + 1)));
    assert_eq!(verdict(&long), Verdict::Block);
    assert_eq!(
        verdict("Walk done, she ate at 5:30 and the gate code 4821# worked"),
        Verdict::Allow
    );
}
