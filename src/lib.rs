//! klarify-sync keeps a SQL database in step with an organisation's Klarify procedures.
//!
//! `main` only wires these together: [`config`] is read and validated, and [`app`] assembles
//! from it what each mode runs: a [`store::Store`] and a [`klarify::KlarifyClient`], with
//! [`sync::run_pass`] run once or under the [`daemon`] ([`app::Application::build`], which the
//! tests use too). `demo` (the default feature of that name) serves `--demo` its sample
//! organisation through the `klarify-fake` crate, the stand-in for the Klarify API that the
//! tests and the bench use too.

pub mod app;
pub mod config;
pub mod daemon;
#[cfg(feature = "demo")]
pub mod demo;
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
