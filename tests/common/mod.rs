//! Shared helpers for the integration tests: fixture paths and reference outputs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub struct Reference {
    pub tokens: Vec<u32>,
    pub logits: Vec<f32>,
    pub mtp_logits: Vec<f32>,
    pub greedy: Vec<u32>,
    pub vocab: usize,
}

/// The committed fixtures and the number of new tokens their greedy reference asked for.
pub const FIXTURES: [(&str, usize); 2] = [("r1-heads", 8), ("small-odd", 6)];

/// A committed fixture (`tests/fixtures/<name>`), from the first place that holds it:
/// `$R1_FIXTURES/<name>` (test binaries staged to another machine by tools/gpu-suite run there
/// with R1_FIXTURES naming the stage's copy of tests/fixtures), the crate that built the test,
/// then `tests/fixtures/<name>` under the current directory. Panics naming every place tried.
pub fn fixture(name: &str) -> PathBuf {
    let mut tried = Vec::new();
    if let Some(dir) = std::env::var_os("R1_FIXTURES").filter(|d| !d.is_empty()) {
        tried.push(PathBuf::from(dir).join(name));
    }
    tried.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    );
    tried.push(Path::new("tests/fixtures").join(name));
    if let Some(found) = tried.iter().find(|p| p.exists()) {
        return found.clone();
    }
    let places: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    panic!(
        "fixture `{name}` not found; looked in {} (set R1_FIXTURES to the folder holding the \
         fixtures)",
        places.join(", ")
    )
}

pub fn reference(name: &str) -> Reference {
    let bytes = std::fs::read(fixture(name).join("reference.safetensors")).expect("reference file");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("reference parses");
    let f32s = |n: &str| -> (Vec<f32>, Vec<usize>) {
        let t = st.tensor(n).expect(n);
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        let v = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        (v, t.shape().to_vec())
    };
    let i64s = |n: &str| -> Vec<u32> {
        let t = st.tensor(n).expect(n);
        assert_eq!(t.dtype(), safetensors::Dtype::I64);
        t.data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect()
    };
    let (logits, shape) = f32s("logits");
    let (mtp_logits, _) = f32s("mtp_logits");
    Reference {
        tokens: i64s("tokens"),
        logits,
        mtp_logits,
        greedy: i64s("greedy"),
        vocab: shape[1],
    }
}

pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// max |a - b| and max |b|.
pub fn max_err(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let mag = b.iter().fold(0f32, |m, y| m.max(y.abs()));
    (err, mag)
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}
