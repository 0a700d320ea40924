//! HTTP handlers: extract, call one service function, respond. No rules live here.

pub mod chunks;
pub mod files;
pub mod health;
pub mod tokens;
pub mod uploads;

mod views;
