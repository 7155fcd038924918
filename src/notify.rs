//! One LISTEN connection per process.
//!
//! PostgreSQL wakes every listening backend of a database on every NOTIFY,
//! whatever the channel, and each wake-up is a transaction of its own on the
//! server. With a listener per task (a pump, the timer loop, the waiters of
//! `?wait_ms=`, one per apalis queue) that cost grew with every queue the
//! process served: measured under the bench, about 16 server transactions per
//! workflow. So a process listens once, on every channel it cares about, and
//! fans the notifications out in memory.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::store::effects::EFFECT_QUEUED_CHANNEL;
use crate::store::signals::{SIGNAL_CHANNEL, SIGNAL_QUEUED_CHANNEL};
use crate::store::timers::TIMER_CHANNEL;

/// apalis' channel for inserted jobs (payload: `{"job_type": …, "id": …}`).
pub const APALIS_INSERT_CHANNEL: &str = "apalis::job::insert";

const CHANNELS: [&str; 5] = [
    SIGNAL_QUEUED_CHANNEL,
    EFFECT_QUEUED_CHANNEL,
    TIMER_CHANNEL,
    SIGNAL_CHANNEL,
    APALIS_INSERT_CHANNEL,
];

/// One notification. After the connection was lost and re-established the
/// hub sends [`Note::Resumed`]: anything may have been missed meanwhile.
#[derive(Debug, Clone)]
pub enum Note {
    /// A NOTIFY on `channel`.
    On {
        /// The channel.
        channel: Arc<str>,
        /// Its payload.
        payload: Arc<str>,
    },
    /// Listening (again): re-check everything.
    Resumed,
}

impl Note {
    /// Whether this note should wake a consumer of `channel` (a resume wakes all).
    pub fn is(&self, channel: &str) -> bool {
        match self {
            Note::On { channel: c, .. } => &**c == channel,
            Note::Resumed => true,
        }
    }

    /// The payload of a NOTIFY (empty for a resume).
    pub fn payload(&self) -> &str {
        match self {
            Note::On { payload, .. } => payload,
            Note::Resumed => "",
        }
    }
}

/// The process's notification hub. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    tx: broadcast::Sender<Note>,
}

impl Hub {
    /// Start listening on `pool` until `shutdown`.
    pub fn start(pool: PgPool, shutdown: CancellationToken) -> Hub {
        let (tx, _) = broadcast::channel(8192);
        let hub = Hub { tx };
        let sender = hub.tx.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            while !shutdown.is_cancelled() {
                let mut listener = match PgListener::connect_with(&pool).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "notification listener cannot connect; polling meanwhile");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(Duration::from_secs(5));
                        continue;
                    }
                };
                if let Err(e) = listener.listen_all(CHANNELS).await {
                    tracing::warn!(error = %e, "LISTEN failed; polling meanwhile");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
                delay = Duration::from_millis(100);
                let _ = sender.send(Note::Resumed);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        // `try_recv` reports a lost connection as `None` (and
                        // re-listens on the next call); resume either way.
                        n = listener.try_recv() => match n {
                            Ok(Some(n)) => {
                                let _ = sender.send(Note::On {
                                    channel: n.channel().into(),
                                    payload: n.payload().into(),
                                });
                            }
                            Ok(None) => {
                                let _ = sender.send(Note::Resumed);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "notification listener lost; reconnecting");
                                break;
                            }
                        }
                    }
                }
            }
        });
        hub
    }

    /// Receive every notification from now on. A receiver that falls behind
    /// gets `Lagged`: treat it as a resume.
    pub fn subscribe(&self) -> broadcast::Receiver<Note> {
        self.tx.subscribe()
    }

    /// Forward applied-signal notifications (payload: one id, or several
    /// separated by commas) to `applied`, until `shutdown`.
    pub fn forward_applied(
        &self,
        applied: broadcast::Sender<uuid::Uuid>,
        shutdown: CancellationToken,
    ) {
        let mut rx = self.subscribe();
        tokio::spawn(async move {
            loop {
                let note = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = rx.recv() => n,
                };
                match note {
                    Ok(Note::On { channel, payload }) if &*channel == SIGNAL_CHANNEL => {
                        for id in payload.split(',') {
                            if let Ok(id) = id.parse() {
                                let _ = applied.send(id);
                            }
                        }
                    }
                    Ok(_) => {}
                    // Waiters re-check on their own every few seconds.
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
}

/// Wait for a note that `wake` accepts. `Lagged` counts as a resume (a
/// wake-up). Returns `false` when the hub is gone.
pub async fn next(rx: &mut broadcast::Receiver<Note>, wake: impl Fn(&Note) -> bool) -> bool {
    loop {
        match rx.recv().await {
            Ok(n) if wake(&n) => return true,
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => return true,
            Err(broadcast::error::RecvError::Closed) => return false,
        }
    }
}
