//! End-to-end tests: API and worker processes against the real Redis, RabbitMQ and files,
//! killed, stopped and cut off from the broker the way production would do it to them.

#![allow(clippy::unwrap_used)]

mod access;
mod browser;
mod crashes;
mod digests;
mod downloads;
mod harness;
mod lock_quorum;
mod merge;
mod metrics;
mod migrations;
mod outages;
mod prefix;
mod service_faults;
mod storage;
mod storage_truth;
mod traces;
mod tus_clients;
mod tus_faults;
mod unroutable;
mod webhooks;
