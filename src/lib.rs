//! hookgraph: declarative mechanistic-interpretability experiments on GPT-2.
//!
//! A run reads an experiment spec ([`spec`]), loads a GPT-2 checkpoint into dfdx
//! ([`model`]), builds its datasets ([`data`]), asks every metric ([`metrics`]) which hook
//! points it reads, runs **one** forward pass per batch that caches exactly the union of
//! those points ([`hooks`]), hands each metric its activations, and writes CSV tables and a
//! manifest into a staging directory swapped into place whole ([`output`]); Ctrl-C stops it
//! cleanly ([`interrupt`]). The crate layout follows that flow; [`cli`] is the `runner`
//! binary's front end.

pub mod bench;
pub mod build_info;
pub mod circuits;
pub mod cli;
pub mod compare;
pub mod data;
pub mod device;
pub mod engine;
pub mod error;
pub mod hooks;
pub mod interrupt;
pub mod interventions;
pub mod kernels;
pub mod means;
pub mod metrics;
pub mod model;
pub mod outdir;
pub mod output;
pub mod report;
pub mod runner;
pub mod seam;
pub mod shard;
pub mod spec;
pub mod tokenizer;

pub use error::{Error, Result};
/// Plugins live with the metrics (`metrics::plugin`); the old path still works.
pub use metrics::plugin;
