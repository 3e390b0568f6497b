//! `runner list`. (Being written.)
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Also list the hook points of this model (a directory or hub id).
    #[arg(long)]
    pub model: Option<String>,
}

pub fn list(_args: &ListArgs) -> crate::Result<ExitCode> {
    Err(crate::Error::Other("not yet".into()))
}
