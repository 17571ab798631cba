//! End-to-end tests: a real server per test, the SDK (or raw HTTP, for what the SDK never sends) as the
//! client. One binary, a module per feature.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test, with its location

mod abuse;
mod accounts;
mod audit;
mod auth;
mod authoring;
mod billing;
mod chaos;
mod cli;
mod cross_tenant;
mod errors;
mod fuzz;
mod inference;
mod isolation;
mod members;
mod models;
mod openapi;
mod operations;
mod plugins;
mod portal;
mod rate_limit;
mod replay;
mod replicas;
mod resilience;
mod row_security;
mod sdk;
mod secrets;
mod training;
mod usage;
