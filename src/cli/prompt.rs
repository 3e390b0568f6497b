//! `runner prompt`: TransformerLens's `utils.test_prompt` in the terminal.
//!
//! Owns: the subcommand's arguments, loading the model on the chosen device, and printing
//! [`crate::report::prompt::PromptReport`] in TL's layout. Must not: compute anything itself; the
//! ranking lives in [`crate::report::prompt`].

use std::path::PathBuf;
use std::process::ExitCode;

use crate::device::{with_device, DeviceChoice, OnDevice};
use crate::error::{Error, Result};
use crate::model::{self, ModelSource, Processing};
use crate::report::prompt::{test_prompt, PromptOptions};
use crate::seam::SeamDevice;

/// `runner prompt --model gpt2 "PROMPT" --answer " Sarah"`.
#[derive(clap::Args, Debug)]
pub struct PromptArgs {
    /// The prompt text.
    pub prompt: String,
    /// The expected answer. Repeat to compare several answers (first token of each, at the
    /// next position, as TL does).
    #[arg(long, required = true)]
    pub answer: Vec<String>,
    /// A hub id (`gpt2`, ...) or a checkpoint directory.
    #[arg(long, default_value = "gpt2")]
    pub model: String,
    /// Where the tokenizer files are, if not in the checkpoint directory.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// How many of the most probable next tokens to print.
    #[arg(long, default_value_t = 10)]
    pub top_k: usize,
    /// Do not prepend BOS to the prompt.
    #[arg(long)]
    pub no_prepend_bos: bool,
    /// Do not prepend a space to an answer that lacks one.
    #[arg(long)]
    pub no_prepend_space: bool,
}

pub fn prompt(args: &PromptArgs) -> Result<ExitCode> {
    with_device(args.device.resolve()?, Prompt(args))
}

/// The command's work, on whichever device was picked.
struct Prompt<'a>(&'a PromptArgs);

impl OnDevice for Prompt<'_> {
    type Output = ExitCode;
    fn run<D: SeamDevice>(self, dev: D) -> Result<ExitCode> {
        prompt_on(dev, self.0)
    }
}

fn prompt_on<D: SeamDevice>(dev: D, args: &PromptArgs) -> Result<ExitCode> {
    let files = ModelSource::parse(&args.model).resolve()?;
    // TL's `from_pretrained` defaults, so logits print as TL prints them.
    let loaded = model::load(dev, files, Processing::ALL, args.tokenizer.as_deref())?;
    let tokenizer = loaded.tokenizer()?;
    if args.answer.iter().any(|a| a.is_empty()) {
        return Err(Error::Other("--answer must not be empty".into()));
    }
    let report = test_prompt(
        &loaded.model,
        tokenizer,
        &args.prompt,
        &args.answer,
        PromptOptions {
            prepend_bos: !args.no_prepend_bos,
            prepend_space_to_answer: !args.no_prepend_space,
            top_k: args.top_k,
        },
    )?;
    print!("{report}");
    Ok(ExitCode::SUCCESS)
}
