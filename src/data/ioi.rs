//! IOI prompts. (Being written.)

/// One IOI prompt: its positions and answer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IoiPrompt {
    pub text: String,
    pub io_name: String,
    pub s_name: String,
    pub io_pos: usize,
    pub s1_pos: usize,
    pub s2_pos: usize,
    pub end_pos: usize,
    /// The answer token (the IO name with a leading space).
    pub answer: u32,
    pub template: usize,
}
