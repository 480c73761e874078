//! Everything about the Klarify Integration API: its item model and a typed client.

mod client;
mod model;
mod storable;

pub use client::{ClientSettings, KlarifyClient, KlarifyError, PageQuery};
pub use model::{
    format_instant, normalise, parse_instant, parse_item, parse_page, untrusted, InstantError,
    Page, Procedure, Rejected, EARLIEST, LATEST, SHOWN_BYTES,
};
pub use storable::{MAX_DEPTH, MAX_ITEM_BYTES, MAX_NUMBER_DIGITS};
