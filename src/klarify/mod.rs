//! Everything about the Klarify Integration API: its item model and a typed client.

mod client;
mod model;

pub use client::{ClientSettings, KlarifyClient, KlarifyError, PageQuery};
pub use model::{format_instant, normalise, parse_instant, parse_item, Page, Procedure, Rejected};
