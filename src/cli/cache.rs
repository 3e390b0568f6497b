//! `runner cache`. (Being written.)
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct CacheArgs {}

pub fn cache(_args: &CacheArgs) -> crate::Result<ExitCode> {
    Err(crate::Error::Other("not yet".into()))
}
