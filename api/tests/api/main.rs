//! Integration tests of the API: the real server on port 0, real Redis, real files.

#![allow(clippy::unwrap_used)]

mod backends;
mod bad_input;
mod completion;
mod cors;
mod helpers;
mod ingest;
mod limits;
mod pace;
mod process;
mod tus;
mod ui;
