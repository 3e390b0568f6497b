//! `runner run` and `runner validate`. (Being written.)
use std::path::Path;
use std::process::ExitCode;

use super::RunArgs;
use crate::device::DeviceChoice;

pub fn run(_spec: &Path, _args: &RunArgs) -> crate::Result<ExitCode> {
    Err(crate::Error::Other("not yet".into()))
}

pub fn validate(_spec: &Path, _device: Option<DeviceChoice>) -> crate::Result<ExitCode> {
    Err(crate::Error::Other("not yet".into()))
}
