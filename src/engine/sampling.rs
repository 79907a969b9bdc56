//! A request's sampling settings. The rule that draws a token from them is
//! `numerics::sampling` (the same on every backend); a draw's counter is the position of the
//! token it draws.

use crate::numerics::sampling::Draw;

/// Sampling settings; `temperature == 0` is greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1.0: all).
    pub top_p: f32,
    pub seed: u64,
    /// Keep generating past eos (benchmarks), as vLLM's `ignore_eos`.
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }

    /// The draw of the token at sequence position `counter`.
    pub fn draw(&self, counter: u64) -> Draw {
        Draw {
            temperature: self.temperature,
            top_k: u32::try_from(self.top_k).unwrap_or(u32::MAX),
            top_p: self.top_p,
            seed: self.seed,
            counter,
        }
    }
}
