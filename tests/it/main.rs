//! hookgraph's integration tests, one binary (as ripgrep does): every module links the
//! library once, so the suite builds dfdx into one test executable instead of a dozen.
//!
//! Shared helpers live in [`common`]; fixtures and goldens sit beside this folder in
//! `tests/fixtures` and `tests/golden`.

mod bad_specs;
mod cache_cli;
mod checkpoint_errors;
mod circuits;
mod common;
mod compare_cli;
mod cspa;
#[cfg(feature = "cuda")]
mod cuda;
mod data;
mod fuzz;
mod hooks;
mod hub;
mod hub_download;
mod interventions;
mod metrics;
mod outdir;
mod parity;
mod plugins;
mod reliability;
mod report;
mod runner_cli;
mod shards;
mod smoke_checkpoint;
mod tokenizer;
mod trust;
