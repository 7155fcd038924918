//! The dispatch workflow (one per lead): publish → claim → release.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> NEW: start (integration)
//!     NEW --> PUBLISHED: published (effect result)
//!     PUBLISHED --> CLAIMED: claim (executor)
//!     CLAIMED --> PUBLISHED: reject_claim (operator)
//!     CLAIMED --> OPERATOR_CONFIRMED: confirm (operator)
//!     OPERATOR_CONFIRMED --> INVOICE_SENT: invoice_sent (operator)
//!     INVOICE_SENT --> PAID: paid (operator / integration)
//!     INVOICE_SENT --> DETAILS_RELEASED: paid, tenant auto-release
//!     PAID --> DETAILS_RELEASED: release (operator)
//!     CLAIMED --> DETAILS_RELEASED: release + reason (operator override, audited)
//!     OPERATOR_CONFIRMED --> DETAILS_RELEASED: release + reason (override)
//!     INVOICE_SENT --> DETAILS_RELEASED: release + reason (override)
//!     PUBLISHED --> EXPIRED: expire (claim deadline timer)
//!     NEW --> CANCELLED: cancel (operator)
//!     PUBLISHED --> CANCELLED: cancel
//!     CLAIMED --> CANCELLED: cancel
//!     OPERATOR_CONFIRMED --> CANCELLED: cancel
//!     INVOICE_SENT --> CANCELLED: cancel
//!     PAID --> CANCELLED: cancel
//!     DETAILS_RELEASED --> [*]
//!     CANCELLED --> [*]
//!     EXPIRED --> [*]
//! ```
//!
//! Choices where DOMAIN.md is silent, written down here:
//! - The claim deadline comes from the start input (`claim_deadline_s`), else the
//!   tenant's `dispatch.claim_deadline_s`, else 24 h. It is armed when the post is
//!   published, cancelled on claim, and re-armed for a fresh full window when the
//!   operator rejects a claim (the job was off the market meanwhile).
//! - `release` before PAID is an operator override: it must carry a `reason`, and
//!   the release is recorded as `early` in state and history. Without a reason it
//!   is rejected (`not_paid`), so personal data never leaves by accident.
//! - With the tenant flag `dispatch.auto_release_on_paid`, `paid` goes straight to
//!   DETAILS_RELEASED and sends the details.
//! - `paid` may come from an operator or an integration (payment webhook).
//! - Claims that lose the race are rejected with `already_claimed`; the caller
//!   (chat adapter) tells the executor it is taken.
//! - Every effect key is `<lead_id>:<effect>_v1`; effects that can recur within
//!   one lifecycle (claim notice, group edits) add the claim number `:c<n>`.
//! - Final states (DETAILS_RELEASED, CANCELLED, EXPIRED) reject every signal
//!   with `final_state`, except the expiry timer, which like any timer firing
//!   after its state moved on is a no-op rejection (`stale_timer`).

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::lead::short_id;
use crate::{Command, Ctx, Outcome, ParseError, Role, Workflow};

/// Default claim deadline when neither the input nor the tenant sets one.
pub const DEFAULT_CLAIM_DEADLINE_S: u64 = 24 * 60 * 60;
/// The expiry timer's name.
pub const CLAIM_TIMER: &str = "claim_deadline";

/// Effect names, shared with the runtime's renderers.
pub mod effects {
    /// Post the crew view to the crew chat; replies `published`.
    pub const PUBLISH: &str = "dispatch_publish";
    /// Tell the operator privately who claimed the job.
    pub const NOTIFY_OPERATOR_CLAIMED: &str = "notify_operator_claimed";
    /// Edit the crew post to "Reserved by @executor".
    pub const CREW_POST_RESERVED: &str = "crew_post_reserved";
    /// Restore the crew post after a rejected claim.
    pub const CREW_POST_RESTORED: &str = "crew_post_restored";
    /// Mark the crew post cancelled.
    pub const CREW_POST_CANCELLED: &str = "crew_post_cancelled";
    /// Mark the crew post expired.
    pub const CREW_POST_EXPIRED: &str = "crew_post_expired";
    /// Send the full lead privately to the executor.
    pub const RELEASE_DETAILS: &str = "dispatch_release";
}

/// Facts fixed at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The lead this dispatch is for (the workflow key).
    pub lead_id: Uuid,
    /// First 8 hex digits of the lead id, as crews see it.
    pub short_id: String,
    /// Claim window length in seconds.
    pub claim_deadline_s: u64,
    /// When the workflow started.
    pub created_at: DateTime<Utc>,
    /// How many claims were accepted so far (keys recurring effects).
    pub claims: u32,
}

/// The crew chat post.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Post {
    /// Channel provider (`log`, `telegram`, `whatsapp`).
    pub provider: Option<String>,
    /// Crew chat id.
    pub chat_id: Option<String>,
    /// Provider message id.
    pub message_id: String,
    /// When it was published.
    pub published_at: DateTime<Utc>,
    /// When the current claim window ends.
    pub deadline: DateTime<Utc>,
}

/// The accepted claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// Executor id (the executor key's subject).
    pub claimed_by: String,
    /// When the claim applied.
    pub claimed_at: DateTime<Utc>,
}

/// How the details left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// When.
    pub released_at: DateTime<Utc>,
    /// Operator subject, or `auto` for tenant auto-release.
    pub released_by: Option<String>,
    /// Released before OPERATOR_CONFIRMED + PAID (operator override).
    pub early: bool,
    /// The operator's reason (required when early).
    pub reason: Option<String>,
    /// When the operator confirmed, if they did.
    pub operator_confirmed_at: Option<DateTime<Utc>>,
    /// When payment arrived, if it did.
    pub paid_at: Option<DateTime<Utc>>,
}

/// Dispatch lifecycle. Each variant carries only what is true in that state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DispatchState {
    /// Started; the publish effect is on its way.
    New {
        /// Facts fixed at start.
        job: Job,
    },
    /// Posted to the crew, open for claims until `post.deadline`.
    Published {
        /// Facts fixed at start.
        job: Job,
        /// The crew chat post.
        post: Post,
    },
    /// An executor holds the claim; the operator decides.
    Claimed {
        /// Facts fixed at start.
        job: Job,
        /// The crew chat post.
        post: Post,
        /// The accepted claim.
        claim: Claim,
    },
    /// The operator confirmed the executor.
    OperatorConfirmed {
        /// Facts fixed at start.
        job: Job,
        /// The crew chat post.
        post: Post,
        /// The accepted claim.
        claim: Claim,
        /// When the operator confirmed the executor.
        operator_confirmed_at: DateTime<Utc>,
    },
    /// The invoice went out.
    InvoiceSent {
        /// Facts fixed at start.
        job: Job,
        /// The crew chat post.
        post: Post,
        /// The accepted claim.
        claim: Claim,
        /// When the operator confirmed the executor.
        operator_confirmed_at: DateTime<Utc>,
        /// When the invoice went out.
        invoice_sent_at: DateTime<Utc>,
    },
    /// Payment received.
    Paid {
        /// Facts fixed at start.
        job: Job,
        /// The crew chat post.
        post: Post,
        /// The accepted claim.
        claim: Claim,
        /// When the operator confirmed the executor.
        operator_confirmed_at: DateTime<Utc>,
        /// When the invoice went out.
        invoice_sent_at: DateTime<Utc>,
        /// When payment arrived.
        paid_at: DateTime<Utc>,
    },
    /// The full lead was sent to the executor (final).
    DetailsReleased {
        /// Facts fixed at start.
        job: Job,
        /// The crew chat post.
        post: Post,
        /// The accepted claim.
        claim: Claim,
        /// How and when the details left.
        release: Release,
    },
    /// Cancelled by the operator (final).
    Cancelled {
        /// Facts fixed at start.
        job: Job,
        /// The crew chat post.
        post: Option<Post>,
        /// The accepted claim.
        claim: Option<Claim>,
        /// When it was cancelled.
        cancelled_at: DateTime<Utc>,
        /// Why (audited).
        reason: Option<String>,
    },
    /// Nobody claimed in time (final).
    Expired {
        /// Facts fixed at start.
        job: Job,
        /// The crew chat post.
        post: Post,
        /// When the claim window closed unclaimed.
        expired_at: DateTime<Utc>,
    },
}

impl DispatchState {
    /// The job facts, in every state.
    pub fn job(&self) -> &Job {
        match self {
            DispatchState::New { job }
            | DispatchState::Published { job, .. }
            | DispatchState::Claimed { job, .. }
            | DispatchState::OperatorConfirmed { job, .. }
            | DispatchState::InvoiceSent { job, .. }
            | DispatchState::Paid { job, .. }
            | DispatchState::DetailsReleased { job, .. }
            | DispatchState::Cancelled { job, .. }
            | DispatchState::Expired { job, .. } => job,
        }
    }

    /// Who holds the claim, if anyone.
    pub fn claim(&self) -> Option<&Claim> {
        match self {
            DispatchState::Claimed { claim, .. }
            | DispatchState::OperatorConfirmed { claim, .. }
            | DispatchState::InvoiceSent { claim, .. }
            | DispatchState::Paid { claim, .. }
            | DispatchState::DetailsReleased { claim, .. } => Some(claim),
            DispatchState::Cancelled { claim, .. } => claim.as_ref(),
            _ => None,
        }
    }

    fn post(&self) -> Option<&Post> {
        match self {
            DispatchState::New { .. } => None,
            DispatchState::Published { post, .. }
            | DispatchState::Claimed { post, .. }
            | DispatchState::OperatorConfirmed { post, .. }
            | DispatchState::InvoiceSent { post, .. }
            | DispatchState::Paid { post, .. }
            | DispatchState::DetailsReleased { post, .. }
            | DispatchState::Expired { post, .. } => Some(post),
            DispatchState::Cancelled { post, .. } => post.as_ref(),
        }
    }
}

/// Start input: `{"lead": {…FullLead…}, "claim_deadline_s": N}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartInput {
    /// The full lead; stored apart by the runtime, never in state.
    pub lead: crate::lead::FullLead,
    /// Optional claim window in seconds (1 s .. 90 days).
    #[serde(default)]
    pub claim_deadline_s: Option<u64>,
}

/// Signals of the dispatch workflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DispatchSignal {
    /// The publish effect's result.
    Published {
        /// Provider message id of the crew post.
        message_id: String,
        /// Provider name.
        provider: Option<String>,
        /// Crew chat id.
        chat_id: Option<String>,
    },
    /// An executor claims the job.
    Claim,
    /// The operator rejects the current claim.
    RejectClaim {
        /// Why (audited).
        reason: Option<String>,
    },
    /// The operator confirms the claim.
    Confirm,
    /// The invoice was sent.
    InvoiceSent,
    /// Payment received.
    Paid,
    /// Release the full lead to the executor.
    Release {
        /// Required for a release before PAID.
        reason: Option<String>,
    },
    /// Cancel the job.
    Cancel {
        /// Why (audited).
        reason: Option<String>,
    },
    /// The claim deadline timer fired.
    Expire {
        /// The deadline the timer was armed for (the runtime sends it): a
        /// timer of an earlier window is stale, the current one expires the
        /// job even when ops fire it early. Without it, the clock decides.
        due: Option<DateTime<Utc>>,
    },
}

/// All signal names, for docs and tests.
pub const SIGNALS: &[&str] = &[
    "published",
    "claim",
    "reject_claim",
    "confirm",
    "invoice_sent",
    "paid",
    "release",
    "cancel",
    "expire",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpirePayload {
    #[serde(default)]
    due: Option<DateTime<Utc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WithReason {
    #[serde(default)]
    reason: Option<String>,
}

// The publish effect's result: extra fields from a channel are ignored, so a
// richer provider answer can never strand the workflow in NEW.
#[derive(Deserialize)]
struct PublishedPayload {
    message_id: String,
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    chat_id: Option<String>,
}

fn payload<T: for<'de> Deserialize<'de>>(p: &Value) -> Result<T, ParseError> {
    let p = if p.is_null() { json!({}) } else { p.clone() };
    serde_json::from_value(p).map_err(|e| ParseError::InvalidPayload(e.to_string()))
}

fn reason_of(p: &Value) -> Result<Option<String>, ParseError> {
    let r = payload::<WithReason>(p)?.reason;
    let r = r.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    if let Some(r) = &r {
        crate::text::check_field("reason", r, crate::text::TextKind::Line, 500)
            .map_err(ParseError::InvalidPayload)?;
    }
    Ok(r)
}

/// The dispatch workflow.
#[derive(Debug, Clone, Copy)]
pub struct Dispatch;

/// Longest claim window accepted (90 days).
pub const MAX_CLAIM_DEADLINE_S: u64 = 90 * 24 * 3600;

/// A tenant value outside 1 s ..= 90 days is ignored (falls back to 24 h):
/// tenant config is edited at run time and must not wedge or instantly expire jobs.
fn deadline_s(input: Option<u64>, tenant_config: &Value) -> u64 {
    input
        .or_else(|| {
            tenant_config
                .pointer("/dispatch/claim_deadline_s")
                .and_then(Value::as_u64)
                .filter(|s| (1..=MAX_CLAIM_DEADLINE_S).contains(s))
        })
        .unwrap_or(DEFAULT_CLAIM_DEADLINE_S)
}

fn effect(job: &Job, name: &str, key_suffix: &str, extra: Value, reply: Option<&str>) -> Command {
    let mut payload = json!({ "lead_id": job.lead_id, "short_id": job.short_id });
    if let (Some(p), Value::Object(extra)) = (payload.as_object_mut(), extra) {
        p.extend(extra);
    }
    Command::Effect {
        name: name.to_string(),
        idempotency_key: format!("{}:{}", job.lead_id, key_suffix),
        payload,
        reply: reply.map(str::to_string),
    }
}

fn arm(job: &Job, now: DateTime<Utc>) -> (DateTime<Utc>, Command) {
    let at = now + Duration::seconds(job.claim_deadline_s as i64);
    (
        at,
        Command::SetTimer {
            name: CLAIM_TIMER.to_string(),
            at,
            signal: "expire".to_string(),
        },
    )
}

fn cancel_timer() -> Command {
    Command::CancelTimer {
        name: CLAIM_TIMER.to_string(),
    }
}

fn release_to(job: &Job, claim: &Claim, release: Release, post: &Post) -> Outcome<DispatchState> {
    let cmd = effect(
        job,
        effects::RELEASE_DETAILS,
        "release_v1",
        json!({ "to": claim.claimed_by, "early": release.early }),
        None,
    );
    Outcome::Accept {
        next: DispatchState::DetailsReleased {
            job: job.clone(),
            post: post.clone(),
            claim: claim.clone(),
            release,
        },
        commands: vec![cmd, Command::Complete],
    }
}

impl Workflow for Dispatch {
    const KIND: &'static str = "dispatch";
    type State = DispatchState;
    type Signal = DispatchSignal;

    fn start(
        key: &str,
        input: &Value,
        ctx: &Ctx<'_>,
    ) -> Result<(DispatchState, Vec<Command>), ParseError> {
        let lead_id = crate::parse_lead_key(Self::KIND, key)?;
        let raw_input = input;
        let input: StartInput = serde_json::from_value(input.clone())
            .map_err(|e| ParseError::InvalidPayload(e.to_string()))?;
        if let Some(raw) = raw_input.get("lead") {
            crate::lead::FullLead::parse_strict(raw).map_err(ParseError::InvalidPayload)?;
        }
        crate::lead::CrewLeadView::checked(lead_id, &input.lead, ctx.tenant_config)
            .map_err(|e| ParseError::CrewUnsafe(e.to_string()))?;
        if input.lead.id.is_some_and(|id| id != lead_id) {
            return Err(ParseError::InvalidPayload(
                "lead.id differs from the workflow key".into(),
            ));
        }
        if let Some(s) = input.claim_deadline_s {
            if !(1..=MAX_CLAIM_DEADLINE_S).contains(&s) {
                return Err(ParseError::InvalidPayload(
                    "claim_deadline_s must be 1..=7776000".into(),
                ));
            }
        }
        let job = Job {
            lead_id,
            short_id: short_id(lead_id),
            claim_deadline_s: deadline_s(input.claim_deadline_s, ctx.tenant_config),
            created_at: ctx.now,
            claims: 0,
        };
        let publish = effect(
            &job,
            effects::PUBLISH,
            "publish_v1",
            json!({ "view": "crew" }),
            Some("published"),
        );
        Ok((DispatchState::New { job }, vec![publish]))
    }

    fn parse_signal(name: &str, p: &Value) -> Result<DispatchSignal, ParseError> {
        Ok(match name {
            "published" => {
                let p: PublishedPayload = payload(p)?;
                DispatchSignal::Published {
                    message_id: p.message_id,
                    provider: p.provider,
                    chat_id: p.chat_id,
                }
            }
            "claim" => payload::<Empty>(p).map(|_| DispatchSignal::Claim)?,
            "reject_claim" => DispatchSignal::RejectClaim {
                reason: reason_of(p)?,
            },
            "confirm" => payload::<Empty>(p).map(|_| DispatchSignal::Confirm)?,
            "invoice_sent" => payload::<Empty>(p).map(|_| DispatchSignal::InvoiceSent)?,
            "paid" => payload::<Empty>(p).map(|_| DispatchSignal::Paid)?,
            "release" => DispatchSignal::Release {
                reason: reason_of(p)?,
            },
            "cancel" => DispatchSignal::Cancel {
                reason: reason_of(p)?,
            },
            "expire" => DispatchSignal::Expire {
                due: payload::<ExpirePayload>(p)?.due,
            },
            other => return Err(ParseError::UnknownSignal(other.to_string())),
        })
    }

    fn allowed_roles(signal_name: &str) -> &'static [Role] {
        match signal_name {
            "claim" => &[Role::Executor],
            "reject_claim" | "confirm" | "invoice_sent" | "release" | "cancel" => {
                &[Role::Operator, Role::Ops]
            }
            "paid" => &[Role::Operator, Role::Ops, Role::Integration],
            "published" | "expire" => &[Role::System],
            _ => &[],
        }
    }

    fn on_signal(
        state: &DispatchState,
        signal: DispatchSignal,
        ctx: &Ctx<'_>,
    ) -> Outcome<DispatchState> {
        use DispatchSignal as S;
        use DispatchState as St;
        let now = ctx.now;
        if Self::is_final(state) {
            return Outcome::reject(if matches!(signal, S::Expire { .. }) {
                "stale_timer"
            } else {
                "final_state"
            });
        }
        match (state, signal) {
            (
                St::New { job },
                S::Published {
                    message_id,
                    provider,
                    chat_id,
                },
            ) => {
                let (deadline, timer) = arm(job, now);
                Outcome::Accept {
                    next: St::Published {
                        job: job.clone(),
                        post: Post {
                            provider,
                            chat_id,
                            message_id,
                            published_at: now,
                            deadline,
                        },
                    },
                    commands: vec![timer],
                }
            }
            (_, S::Published { .. }) => Outcome::reject("already_published"),

            (St::Published { job, post }, S::Claim) => {
                let Some(executor) = ctx.actor.subject.clone() else {
                    return Outcome::reject("executor_identity_required");
                };
                let mut job = job.clone();
                job.claims += 1;
                let n = job.claims;
                let commands = vec![
                    cancel_timer(),
                    effect(
                        &job,
                        effects::NOTIFY_OPERATOR_CLAIMED,
                        &format!("claim_notify_v1:c{n}"),
                        json!({ "executor": executor }),
                        None,
                    ),
                    effect(
                        &job,
                        effects::CREW_POST_RESERVED,
                        &format!("group_edit_v1:c{n}"),
                        json!({ "executor": executor, "message_id": post.message_id, "provider": post.provider, "chat_id": post.chat_id }),
                        None,
                    ),
                ];
                Outcome::Accept {
                    next: St::Claimed {
                        job,
                        post: post.clone(),
                        claim: Claim {
                            claimed_by: executor,
                            claimed_at: now,
                        },
                    },
                    commands,
                }
            }
            (St::New { .. }, S::Claim) => Outcome::reject("not_published"),
            (_, S::Claim) => Outcome::reject("already_claimed"),

            (St::Claimed { job, post, .. }, S::RejectClaim { .. }) => {
                let (deadline, timer) = arm(job, now);
                let restore = effect(
                    job,
                    effects::CREW_POST_RESTORED,
                    &format!("group_restore_v1:c{}", job.claims),
                    json!({ "message_id": post.message_id, "provider": post.provider, "chat_id": post.chat_id }),
                    None,
                );
                Outcome::Accept {
                    next: St::Published {
                        job: job.clone(),
                        post: Post {
                            deadline,
                            ..post.clone()
                        },
                    },
                    commands: vec![timer, restore],
                }
            }
            (_, S::RejectClaim { .. }) => Outcome::reject("not_claimed"),

            (St::Claimed { job, post, claim }, S::Confirm) => Outcome::Accept {
                next: St::OperatorConfirmed {
                    job: job.clone(),
                    post: post.clone(),
                    claim: claim.clone(),
                    operator_confirmed_at: now,
                },
                commands: vec![],
            },
            (St::New { .. } | St::Published { .. }, S::Confirm) => Outcome::reject("not_claimed"),
            (_, S::Confirm) => Outcome::reject("already_confirmed"),

            (
                St::OperatorConfirmed {
                    job,
                    post,
                    claim,
                    operator_confirmed_at,
                },
                S::InvoiceSent,
            ) => Outcome::Accept {
                next: St::InvoiceSent {
                    job: job.clone(),
                    post: post.clone(),
                    claim: claim.clone(),
                    operator_confirmed_at: *operator_confirmed_at,
                    invoice_sent_at: now,
                },
                commands: vec![],
            },
            (St::InvoiceSent { .. } | St::Paid { .. }, S::InvoiceSent) => {
                Outcome::reject("invoice_already_sent")
            }
            (_, S::InvoiceSent) => Outcome::reject("not_confirmed"),

            (
                St::InvoiceSent {
                    job,
                    post,
                    claim,
                    operator_confirmed_at,
                    invoice_sent_at,
                },
                S::Paid,
            ) => {
                let auto = ctx
                    .tenant_config
                    .pointer("/dispatch/auto_release_on_paid")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                if auto {
                    let release = Release {
                        released_at: now,
                        released_by: Some("auto".into()),
                        early: false,
                        reason: None,
                        operator_confirmed_at: Some(*operator_confirmed_at),
                        paid_at: Some(now),
                    };
                    return release_to(job, claim, release, post);
                }
                Outcome::Accept {
                    next: St::Paid {
                        job: job.clone(),
                        post: post.clone(),
                        claim: claim.clone(),
                        operator_confirmed_at: *operator_confirmed_at,
                        invoice_sent_at: *invoice_sent_at,
                        paid_at: now,
                    },
                    commands: vec![],
                }
            }
            (St::Paid { .. }, S::Paid) => Outcome::reject("already_paid"),
            (_, S::Paid) => Outcome::reject("invoice_not_sent"),

            (
                St::Paid {
                    job,
                    post,
                    claim,
                    operator_confirmed_at,
                    paid_at,
                    ..
                },
                S::Release { reason },
            ) => {
                let release = Release {
                    released_at: now,
                    released_by: ctx.actor.subject.clone(),
                    early: false,
                    reason,
                    operator_confirmed_at: Some(*operator_confirmed_at),
                    paid_at: Some(*paid_at),
                };
                release_to(job, claim, release, post)
            }
            (
                st @ (St::Claimed { job, post, claim }
                | St::OperatorConfirmed {
                    job, post, claim, ..
                }
                | St::InvoiceSent {
                    job, post, claim, ..
                }),
                S::Release { reason },
            ) => {
                let Some(reason) = reason else {
                    return Outcome::reject("not_paid");
                };
                let confirmed = match st {
                    St::OperatorConfirmed {
                        operator_confirmed_at,
                        ..
                    }
                    | St::InvoiceSent {
                        operator_confirmed_at,
                        ..
                    } => Some(*operator_confirmed_at),
                    _ => None,
                };
                let release = Release {
                    released_at: now,
                    released_by: ctx.actor.subject.clone(),
                    early: true,
                    reason: Some(reason),
                    operator_confirmed_at: confirmed,
                    paid_at: None,
                };
                release_to(job, claim, release, post)
            }
            (_, S::Release { .. }) => Outcome::reject("not_claimed"),

            (st, S::Cancel { reason }) => {
                let job = st.job().clone();
                let mut commands = vec![cancel_timer()];
                // Without a post yet (NEW), the publish may still be on its way:
                // the cancel edit then finds the post through the publish key.
                let target = match st.post() {
                    Some(post) => {
                        json!({ "message_id": post.message_id, "provider": post.provider, "chat_id": post.chat_id })
                    }
                    None => json!({ "publish_key": format!("{}:publish_v1", job.lead_id) }),
                };
                commands.push(effect(
                    &job,
                    effects::CREW_POST_CANCELLED,
                    "group_cancel_v1",
                    target,
                    None,
                ));
                commands.push(Command::Complete);
                Outcome::Accept {
                    next: St::Cancelled {
                        post: st.post().cloned(),
                        claim: st.claim().cloned(),
                        job,
                        cancelled_at: now,
                        reason,
                    },
                    commands,
                }
            }

            // A timer armed for an earlier window (before a rejected claim re-armed it)
            // may fire late in a batch: only the current deadline expires the job.
            // (The stored due time may be rounded to microseconds: 1 ms slack.)
            (St::Published { post, .. }, S::Expire { due })
                if due.unwrap_or(now) + Duration::milliseconds(1) < post.deadline =>
            {
                Outcome::reject("stale_timer")
            }
            (St::Published { job, post }, S::Expire { .. }) => Outcome::Accept {
                next: St::Expired {
                    job: job.clone(),
                    post: post.clone(),
                    expired_at: now,
                },
                commands: vec![
                    effect(
                        job,
                        effects::CREW_POST_EXPIRED,
                        "group_expire_v1",
                        json!({ "message_id": post.message_id, "provider": post.provider, "chat_id": post.chat_id }),
                        None,
                    ),
                    Command::Complete,
                ],
            },
            (_, S::Expire { .. }) => Outcome::reject("stale_timer"),
        }
    }

    const EDGES: &'static [(&'static str, &'static str, &'static str)] = &[
        ("[*]", "NEW", "start (integration)"),
        ("NEW", "PUBLISHED", "published (effect result)"),
        ("PUBLISHED", "CLAIMED", "claim (executor)"),
        ("CLAIMED", "PUBLISHED", "reject_claim (operator)"),
        ("CLAIMED", "OPERATOR_CONFIRMED", "confirm (operator)"),
        (
            "OPERATOR_CONFIRMED",
            "INVOICE_SENT",
            "invoice_sent (operator)",
        ),
        ("INVOICE_SENT", "PAID", "paid (operator, integration)"),
        (
            "INVOICE_SENT",
            "DETAILS_RELEASED",
            "paid, tenant auto-release",
        ),
        ("PAID", "DETAILS_RELEASED", "release (operator)"),
        (
            "CLAIMED",
            "DETAILS_RELEASED",
            "release + reason (audited override)",
        ),
        (
            "OPERATOR_CONFIRMED",
            "DETAILS_RELEASED",
            "release + reason (audited override)",
        ),
        (
            "INVOICE_SENT",
            "DETAILS_RELEASED",
            "release + reason (audited override)",
        ),
        ("PUBLISHED", "EXPIRED", "expire (claim deadline timer)"),
        ("NEW", "CANCELLED", "cancel (operator)"),
        ("PUBLISHED", "CANCELLED", "cancel"),
        ("CLAIMED", "CANCELLED", "cancel"),
        ("OPERATOR_CONFIRMED", "CANCELLED", "cancel"),
        ("INVOICE_SENT", "CANCELLED", "cancel"),
        ("PAID", "CANCELLED", "cancel"),
        ("DETAILS_RELEASED", "[*]", ""),
        ("CANCELLED", "[*]", ""),
        ("EXPIRED", "[*]", ""),
    ];

    /// Ops may force: cancel, expire now, un-claim, confirm, mark invoiced,
    /// mark paid. Never a release (personal data) and never `published`
    /// (it needs the provider's message id: send it by hand instead).
    fn force_signal(state: &DispatchState, target: &str) -> Option<(&'static str, Value)> {
        Some(match (state, target) {
            (_, "CANCELLED") => ("cancel", json!({ "reason": "forced by ops" })),
            (DispatchState::Published { post, .. }, "EXPIRED") => {
                ("expire", json!({ "due": post.deadline }))
            }
            (DispatchState::Claimed { .. }, "PUBLISHED") => {
                ("reject_claim", json!({ "reason": "forced by ops" }))
            }
            (DispatchState::Claimed { .. }, "OPERATOR_CONFIRMED") => ("confirm", json!({})),
            (DispatchState::OperatorConfirmed { .. }, "INVOICE_SENT") => {
                ("invoice_sent", json!({}))
            }
            (DispatchState::InvoiceSent { .. }, "PAID") => ("paid", json!({})),
            _ => return None,
        })
    }

    /// A publish should come back within minutes; the operator should act on a
    /// claim within a day, on a confirmed job within three, and a payment is
    /// chased after two weeks. PUBLISHED has its own expiry timer.
    const STUCK_AFTER: &'static [(&'static str, u64)] = &[
        ("NEW", 10 * 60),
        ("CLAIMED", 24 * 3600),
        ("OPERATOR_CONFIRMED", 3 * 24 * 3600),
        ("INVOICE_SENT", 14 * 24 * 3600),
        ("PAID", 24 * 3600),
    ];

    fn state_name(state: &DispatchState) -> &'static str {
        match state {
            DispatchState::New { .. } => "NEW",
            DispatchState::Published { .. } => "PUBLISHED",
            DispatchState::Claimed { .. } => "CLAIMED",
            DispatchState::OperatorConfirmed { .. } => "OPERATOR_CONFIRMED",
            DispatchState::InvoiceSent { .. } => "INVOICE_SENT",
            DispatchState::Paid { .. } => "PAID",
            DispatchState::DetailsReleased { .. } => "DETAILS_RELEASED",
            DispatchState::Cancelled { .. } => "CANCELLED",
            DispatchState::Expired { .. } => "EXPIRED",
        }
    }

    fn is_final(state: &DispatchState) -> bool {
        matches!(
            state,
            DispatchState::DetailsReleased { .. }
                | DispatchState::Cancelled { .. }
                | DispatchState::Expired { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_diagram_names_every_state_and_ends_in_the_final_ones() {
        let diagram = crate::mermaid(Dispatch::EDGES);
        for state in [
            "NEW",
            "PUBLISHED",
            "CLAIMED",
            "OPERATOR_CONFIRMED",
            "INVOICE_SENT",
            "PAID",
            "DETAILS_RELEASED",
            "CANCELLED",
            "EXPIRED",
        ] {
            assert!(diagram.contains(state), "{state} missing");
        }
        for end in [
            "DETAILS_RELEASED --> [*]",
            "CANCELLED --> [*]",
            "EXPIRED --> [*]",
        ] {
            assert!(diagram.contains(end));
        }
        assert!(diagram.starts_with("stateDiagram-v2\n    [*] --> NEW: start (integration)"));
    }
}
