//! Every bad-input case of the checkpoint loader fails with a message naming the file or tensor.

mod common;

use std::path::{Path, PathBuf};

use common::fixture;
use r1_runtime::engine::{Engine, EngineOptions};
use serde_json::Value;

const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";

/// A private copy of the small fixture to damage.
fn copy_fixture() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixture("small-odd")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    (tmp, dir)
}

fn load_error(dir: &Path) -> String {
    match Engine::load(dir, &EngineOptions::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// The shard holding `tensor`, per the index.
fn shard_of(dir: &Path, tensor: &str) -> PathBuf {
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    dir.join(index["weight_map"][tensor].as_str().unwrap())
}

/// Rewrites a shard's JSON header with `edit`, keeping the data bytes as they are.
fn edit_header(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut text = serde_json::to_vec(&header).unwrap();
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

fn drop_from_index(dir: &Path, tensor: &str) {
    let path = dir.join("model.safetensors.index.json");
    let mut index: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    index["weight_map"].as_object_mut().unwrap().remove(tensor);
    std::fs::write(path, index.to_string()).unwrap();
}

fn assert_mentions(err: &str, needles: &[&str]) {
    for n in needles {
        assert!(err.contains(n), "expected `{n}` in: {err}");
    }
}

#[test]
fn missing_directory() {
    let err = load_error(Path::new("/nonexistent/r1"));
    assert_mentions(&err, &["/nonexistent/r1"]);
}

#[test]
fn directory_without_weights() {
    let (_tmp, dir) = copy_fixture();
    std::fs::remove_file(dir.join("model.safetensors.index.json")).unwrap();
    std::fs::remove_file(dir.join(SHARD1)).unwrap();
    std::fs::remove_file(dir.join(SHARD2)).unwrap();
    assert_mentions(
        &load_error(&dir),
        &["model.safetensors.index.json", "model.safetensors"],
    );
}

#[test]
fn missing_shard() {
    let (_tmp, dir) = copy_fixture();
    std::fs::remove_file(dir.join(SHARD2)).unwrap();
    assert_mentions(&load_error(&dir), &[SHARD2, "missing"]);
}

#[test]
fn missing_tensor() {
    let (_tmp, dir) = copy_fixture();
    let name = "model.layers.1.self_attn.o_proj.weight";
    edit_header(&shard_of(&dir, name), |h| {
        h.remove(name);
    });
    drop_from_index(&dir, name);
    assert_mentions(&load_error(&dir), &[name, "not in the checkpoint"]);
}

#[test]
fn index_names_a_tensor_its_shard_lacks() {
    let (_tmp, dir) = copy_fixture();
    let name = "model.layers.1.self_attn.o_proj.weight";
    edit_header(&shard_of(&dir, name), |h| {
        h.remove(name);
    });
    assert_mentions(
        &load_error(&dir),
        &[name, "listed in model.safetensors.index.json"],
    );
}

#[test]
fn missing_scale() {
    let (_tmp, dir) = copy_fixture();
    let name = "model.layers.0.mlp.down_proj.weight_scale_inv";
    edit_header(&shard_of(&dir, name), |h| {
        h.remove(name);
    });
    drop_from_index(&dir, name);
    assert_mentions(
        &load_error(&dir),
        &["model.layers.0.mlp.down_proj.weight", name, "missing"],
    );
}

#[test]
fn wrong_dtype() {
    let (_tmp, dir) = copy_fixture();
    let name = "model.layers.0.input_layernorm.weight";
    edit_header(&shard_of(&dir, name), |h| {
        h[name]["dtype"] = "F16".into();
    });
    assert_mentions(&load_error(&dir), &[name, "dtype is F16"]);
}

#[test]
fn wrong_fp8_dtype() {
    let (_tmp, dir) = copy_fixture();
    let name = "model.layers.0.self_attn.q_a_proj.weight";
    let shard = shard_of(&dir, name);
    edit_header(&shard, |h| {
        // Same bytes reinterpreted as half the number of BF16 values.
        let shape: Vec<u64> = h[name]["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        h[name]["dtype"] = "BF16".into();
        h[name]["shape"] = serde_json::json!([shape[0], shape[1] / 2]);
    });
    assert_mentions(
        &load_error(&dir),
        &[name, "dtype is BF16, expected F8_E4M3"],
    );
}

#[test]
fn wrong_shape() {
    let (_tmp, dir) = copy_fixture();
    let name = "model.layers.0.self_attn.kv_a_layernorm.weight";
    edit_header(&shard_of(&dir, name), |h| {
        h[name]["shape"] = serde_json::json!([32, 2]);
    });
    assert_mentions(
        &load_error(&dir),
        &[name, "shape is [32, 2], expected [64]"],
    );
}

#[test]
fn wrong_config_dimension() {
    let (_tmp, dir) = copy_fixture();
    let path = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["moe_intermediate_size"] = 80.into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    assert_mentions(
        &load_error(&dir),
        &[
            "model.layers.1.mlp.experts.0.gate_proj.weight",
            "expected [80, 128]",
        ],
    );
}

#[test]
fn truncated_shard() {
    let (_tmp, dir) = copy_fixture();
    let path = dir.join(SHARD1);
    let len = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len - 100).unwrap();
    assert_mentions(&load_error(&dir), &[SHARD1, "truncated"]);
}

#[test]
fn malformed_header() {
    let (_tmp, dir) = copy_fixture();
    let path = dir.join(SHARD2);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..16].copy_from_slice(b"not json");
    std::fs::write(&path, bytes).unwrap();
    assert_mentions(&load_error(&dir), &[SHARD2, "malformed safetensors header"]);
}

#[test]
fn malformed_config() {
    let (_tmp, dir) = copy_fixture();
    std::fs::write(dir.join("config.json"), "{\"hidden_size\": 12").unwrap();
    assert_mentions(&load_error(&dir), &["config.json", "not valid JSON"]);
}

#[test]
fn shard_path_outside_the_directory_is_refused() {
    let (_tmp, dir) = copy_fixture();
    let path = dir.join("model.safetensors.index.json");
    let mut index: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors".into();
    std::fs::write(path, index.to_string()).unwrap();
    assert_mentions(
        &load_error(&dir),
        &["model.norm.weight", "beside the index"],
    );
}

/// Opening reads headers only: a shard declaring 16 GiB of (sparse) tensor data opens at once.
#[test]
fn open_costs_headers_not_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size: u64 = 16 << 30;
    let header = serde_json::json!({
        "big.weight": {"dtype": "F8_E4M3", "shape": [size / 8192, 8192], "data_offsets": [0, size]}
    });
    let mut text = serde_json::to_vec(&header).unwrap();
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let path = dir.join("model.safetensors");
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&text);
    std::fs::write(&path, &bytes).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(bytes.len() as u64 + size).unwrap(); // sparse: no blocks written
    let t = std::time::Instant::now();
    let ckpt = r1_runtime::checkpoint::Checkpoint::open(dir).unwrap();
    let elapsed = t.elapsed();
    assert_eq!(ckpt.info("big.weight").unwrap().bytes() as u64, size);
    assert!(elapsed.as_millis() < 500, "open took {elapsed:?}");
}
