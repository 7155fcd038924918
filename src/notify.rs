//! One LISTEN connection per process.
//!
//! PostgreSQL wakes every listening backend of a database on every NOTIFY,
//! whatever the channel, and each wake-up is a transaction of its own on the
//! server. With a listener per task (a pump, the timer loop, the waiters of
//! `?wait_ms=`, one per apalis queue) that cost grew with every queue the
//! process served: measured under the bench, about 16 server transactions per
//! workflow. So a process listens once, on every channel it cares about, and
//! fans the notifications out in memory.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{broadcast, oneshot};
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

    /// Wake the [`Waiters`] of each applied or rejected signal (payload:
    /// one id, or several separated by commas), until `shutdown`. After a
    /// missed stretch (the listener reconnected, or this loop lagged) every
    /// waiter is woken to re-check.
    pub fn forward_applied(&self, waiters: Waiters, shutdown: CancellationToken) {
        let mut rx = self.subscribe();
        tokio::spawn(async move {
            loop {
                let note = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = rx.recv() => n,
                };
                match note {
                    Ok(Note::On { channel, payload }) if &*channel == SIGNAL_CHANNEL => {
                        waiters.wake(payload.split(',').filter_map(|id| id.parse().ok()));
                    }
                    Ok(Note::On { .. }) => {}
                    Ok(Note::Resumed) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        waiters.wake_all()
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
}

/// Callers waiting for a signal's outcome, by signal id: a notification
/// wakes only the waiters of the signals it names (a broadcast to every
/// waiter cost each of them a wake-up per applied signal — at 200 waiting
/// callers a second that was tens of thousands of wake-ups a second, and
/// the lagging receivers all re-read their signal at once, exhausting the
/// connection pool: measured with `dispatch bench --scenario latency`).
#[derive(Clone, Default)]
pub struct Waiters {
    by_signal: Arc<std::sync::Mutex<HashMap<uuid::Uuid, Vec<oneshot::Sender<()>>>>>,
}

impl Waiters {
    /// Wait for `id`: the receiver fires when a notification names it (or
    /// everything is re-checked). Register *before* the last look at the
    /// signal's status so an outcome cannot slip between the two.
    pub fn register(&self, id: uuid::Uuid) -> Waiting {
        let (tx, rx) = oneshot::channel();
        self.lock().entry(id).or_default().push(tx);
        Waiting {
            id,
            rx,
            waiters: self.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<uuid::Uuid, Vec<oneshot::Sender<()>>>> {
        // A panic while holding it cannot leave the map inconsistent.
        self.by_signal.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self, ids: impl Iterator<Item = uuid::Uuid>) {
        let mut map = self.lock();
        for id in ids {
            for tx in map.remove(&id).unwrap_or_default() {
                let _ = tx.send(());
            }
        }
    }

    fn wake_all(&self) {
        for (_, txs) in self.lock().drain() {
            for tx in txs {
                let _ = tx.send(());
            }
        }
    }
}

/// One registered wait (see [`Waiters::register`]); deregisters when dropped.
pub struct Waiting {
    id: uuid::Uuid,
    rx: oneshot::Receiver<()>,
    waiters: Waiters,
}

impl Waiting {
    /// Until woken, or `deadline`. Returns whether it was woken; wake-ups
    /// are one-shot: register again to wait again.
    pub async fn until(&mut self, deadline: tokio::time::Instant) -> bool {
        matches!(
            tokio::time::timeout_at(deadline, &mut self.rx).await,
            Ok(Ok(()))
        )
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.rx.close();
        let mut map = self.waiters.lock();
        if let Some(txs) = map.get_mut(&self.id) {
            txs.retain(|tx| !tx.is_closed());
            if txs.is_empty() {
                map.remove(&self.id);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn soon() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_millis(200)
    }

    #[tokio::test]
    async fn a_notification_wakes_only_the_waiters_of_the_signals_it_names() {
        let waiters = Waiters::default();
        let (a, b) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        let mut wa = waiters.register(a);
        let mut wa2 = waiters.register(a);
        let mut wb = waiters.register(b);
        waiters.wake([a].into_iter());
        assert!(wa.until(soon()).await);
        assert!(wa2.until(soon()).await);
        assert!(!wb.until(soon()).await, "b was not named");
        waiters.wake_all();
        assert!(wb.until(soon()).await, "a resume wakes everyone");
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_leaves_nothing_behind() {
        let waiters = Waiters::default();
        let id = uuid::Uuid::now_v7();
        let kept = waiters.register(id);
        drop(waiters.register(id));
        assert_eq!(waiters.lock().get(&id).map(Vec::len), Some(1));
        drop(kept);
        assert!(waiters.lock().is_empty());
    }
}
