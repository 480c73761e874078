//! The throwaway PostgreSQL of the root package's tests, compiled here from the same files
//! rather than copied: the bench's test needs only `pg::fresh_database`.

#![allow(dead_code)] // the rest of pg and tools serves the root package's tests

#[path = "../../../tests/common/pg.rs"]
pub mod pg;
#[path = "../../../tests/common/tools.rs"]
pub mod tools;
