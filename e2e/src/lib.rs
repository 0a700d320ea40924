//! End-to-end tests live in `tests/`; this crate only builds the programs they start.
