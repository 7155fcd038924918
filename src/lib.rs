//! Dispatch: a durable workflow runtime on PostgreSQL.
//!
//! Business lifecycles are pure state machines (the `workflows` crate); this
//! library makes them durable. One signal batch is one PostgreSQL transaction
//! ([`engine`]); effects leave through an outbox ([`outbox`]) run by apalis
//! workers ([`workers`]); timers are rows fired by a timer loop; the HTTP API
//! ([`http`]) queues signals and can wait for their outcome via LISTEN/NOTIFY.
#![warn(missing_docs)]

pub mod admin;
pub mod api;
pub mod app;
pub mod bench;
pub mod channels;
pub mod config;
pub mod console;
pub mod courier;
pub mod crew;
pub mod delivery;
pub mod edge;
pub mod engine;
pub mod http;
pub mod intake;
pub mod messaging;
pub mod metrics;
pub mod notify;
pub mod openapi;
pub mod ops;
pub mod ops_cli;
pub mod outbox;
pub mod pg;
pub mod pipeline;
pub mod scan;
pub mod schedules;
pub mod store;
pub mod telemetry;
pub mod workers;

pub use app::{embed, launch, Running};
pub use config::{ProcessRole, Settings};
pub use engine::{Engine, EngineError};
pub use workflows;
