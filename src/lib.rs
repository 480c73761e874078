//! klarify-sync keeps a SQL database in step with an organisation's Klarify procedures.
//!
//! `main` only wires these together: [`config`] is read and validated, a [`store::Store`] and a
//! [`klarify::KlarifyClient`] are opened, and [`sync::run_pass`] runs once or under the
//! [`daemon`]. [`fake`] is a faithful stand-in for the Klarify API, shared by the tests,
//! the benchmarks and `--demo`.

pub mod app;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod fake;
pub mod graph;
pub mod http;
pub mod klarify;
pub mod metrics;
pub mod progress_bar;
pub mod schedule;
pub mod status;
pub mod store;
pub mod sync;
pub mod telemetry;
