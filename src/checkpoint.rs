//! Safetensors checkpoints as DeepSeek ships them: `model.safetensors.index.json` plus shards, or
//! a single `model.safetensors`. Opening parses headers only; tensor bytes stay in the memory
//! maps until a backend reads them, so opening a 671B checkpoint costs time in proportion to
//! its tensor count, not its size.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::numerics::{e4m3_to_f32, QUANT_BLOCK};

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    F8E4M3,
    BF16,
    F16,
    F32,
    I32,
    I64,
}

impl Dtype {
    fn parse(tag: &str) -> Option<Self> {
        Some(match tag {
            "F8_E4M3" => Dtype::F8E4M3,
            "BF16" => Dtype::BF16,
            "F16" => Dtype::F16,
            "F32" => Dtype::F32,
            "I32" => Dtype::I32,
            "I64" => Dtype::I64,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::F8E4M3 => 1,
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::I64 => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::BF16 => "BF16",
            Dtype::F16 => "F16",
            Dtype::F32 => "F32",
            Dtype::I32 => "I32",
            Dtype::I64 => "I64",
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    shard: usize,
    /// Byte range inside the shard file.
    start: usize,
    end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn bytes(&self) -> usize {
        self.end - self.start
    }
}

/// A tensor's bytes, still inside the memory map (zero-copy).
#[derive(Clone)]
pub struct TensorBytes {
    map: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    end: usize,
}

impl TensorBytes {
    pub fn as_slice(&self) -> &[u8] {
        &(*self.map).as_ref()[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

impl std::fmt::Debug for TensorBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorBytes({} bytes)", self.len())
    }
}

struct Shard {
    path: PathBuf,
    map: Arc<dyn AsRef<[u8]> + Send + Sync>,
}

pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorInfo>,
}

/// An FP8 Linear weight [n, k] with its 128x128 block multipliers [ceil(n/128), ceil(k/128)].
#[derive(Debug, Clone)]
pub struct Fp8Weight {
    pub n: usize,
    pub k: usize,
    pub codes: TensorBytes,
    pub scales: Vec<f32>,
}

impl Fp8Weight {
    /// A weight from owned codes [n, k] and block multipliers [ceil(n/128), ceil(k/128)].
    pub fn from_parts(n: usize, k: usize, codes: Vec<u8>, scales: Vec<f32>) -> Self {
        assert_eq!(codes.len(), n * k, "codes are not [{n}, {k}]");
        assert_eq!(
            scales.len(),
            n.div_ceil(QUANT_BLOCK) * k.div_ceil(QUANT_BLOCK)
        );
        let len = codes.len();
        Fp8Weight {
            n,
            k,
            codes: TensorBytes {
                map: Arc::new(codes),
                start: 0,
                end: len,
            },
            scales,
        }
    }

    /// The weight in f32, exactly: W = q * s per 128x128 block, row-major [n, k].
    pub fn dequantized(&self) -> Vec<f32> {
        let kb = self.k.div_ceil(QUANT_BLOCK);
        self.codes
            .as_slice()
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let (n, k) = (i / self.k, i % self.k);
                e4m3_to_f32(c) * self.scales[(n / QUANT_BLOCK) * kb + k / QUANT_BLOCK]
            })
            .collect()
    }
}

impl Checkpoint {
    /// Opens a checkpoint directory: the index and every shard it names (headers only).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::Checkpoint {
                path: dir,
                message: "is not a directory (pass the folder holding config.json and the .safetensors files)".into(),
            });
        }
        let index_path = dir.join(INDEX_FILE);
        let mut ckpt = Checkpoint {
            dir: dir.clone(),
            shards: Vec::new(),
            tensors: BTreeMap::new(),
        };
        if index_path.exists() {
            let weight_map = read_index(&index_path)?;
            // Shard file -> tensors the index says it holds.
            let mut by_shard: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (tensor, file) in weight_map {
                by_shard.entry(file).or_default().push(tensor);
            }
            for (file, expected) in by_shard {
                let path = dir.join(&file);
                if !path.is_file() {
                    return Err(Error::Checkpoint {
                        path,
                        message: format!(
                            "shard named by {INDEX_FILE} is missing (it should hold `{}` and {} other tensors)",
                            expected[0],
                            expected.len() - 1
                        ),
                    });
                }
                let shard = ckpt.add_shard(path.clone())?;
                for name in expected {
                    match ckpt.tensors.get(&name) {
                        Some(info) if info.shard == shard => {}
                        _ => {
                            return Err(Error::Tensor {
                                tensor: name,
                                file: path,
                                message: format!("listed in {INDEX_FILE} but not in this shard"),
                            })
                        }
                    }
                }
            }
        } else if dir.join(SINGLE_FILE).is_file() {
            ckpt.add_shard(dir.join(SINGLE_FILE))?;
        } else {
            return Err(Error::Checkpoint {
                path: dir,
                message: format!("has neither {INDEX_FILE} nor {SINGLE_FILE}"),
            });
        }
        Ok(ckpt)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor, by name.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &TensorInfo)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors.get(name).ok_or_else(|| {
            let prefix = name.rsplit_once('.').map_or(name, |(p, _)| p);
            let near: Vec<&str> = self
                .tensors
                .keys()
                .filter(|k| k.starts_with(prefix))
                .take(3)
                .map(String::as_str)
                .collect();
            Error::MissingTensor {
                tensor: name.to_string(),
                dir: self.dir.clone(),
                hint: if near.is_empty() {
                    String::new()
                } else {
                    format!("; present nearby: {}", near.join(", "))
                },
            }
        })
    }

    fn file_of(&self, info: &TensorInfo) -> PathBuf {
        self.shards[info.shard].path.clone()
    }

    fn tensor_error(&self, name: &str, info: &TensorInfo, message: String) -> Error {
        Error::Tensor {
            tensor: name.to_string(),
            file: self.file_of(info),
            message,
        }
    }

    /// The tensor's bytes after checking its dtype and shape.
    pub fn expect(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<TensorBytes> {
        let info = self.info(name)?;
        if info.dtype != dtype {
            return Err(self.tensor_error(
                name,
                info,
                format!("dtype is {}, expected {dtype}", info.dtype),
            ));
        }
        if info.shape != shape {
            return Err(self.tensor_error(
                name,
                info,
                format!(
                    "shape is {:?}, expected {shape:?} (from config.json)",
                    info.shape
                ),
            ));
        }
        Ok(self.bytes(info))
    }

    fn bytes(&self, info: &TensorInfo) -> TensorBytes {
        TensorBytes {
            map: Arc::clone(&self.shards[info.shard].map),
            start: info.start,
            end: info.end,
        }
    }

    /// A BF16 or F32 tensor of the given shape, widened to f32 (copies).
    pub fn read_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let info = self.info(name)?;
        let dtype = match info.dtype {
            Dtype::BF16 | Dtype::F32 => info.dtype,
            other => {
                return Err(self.tensor_error(
                    name,
                    info,
                    format!("dtype is {other}, expected BF16 or F32"),
                ))
            }
        };
        let bytes = self.expect(name, dtype, shape)?;
        Ok(widen(bytes.as_slice(), dtype))
    }

    /// An FP8 Linear weight `<prefix>.weight` [n, k] and its `<prefix>.weight_scale_inv`.
    pub fn fp8_weight(&self, prefix: &str, n: usize, k: usize) -> Result<Fp8Weight> {
        let weight = format!("{prefix}.weight");
        let codes = self.expect(&weight, Dtype::F8E4M3, &[n, k])?;
        let scale_name = format!("{prefix}.weight_scale_inv");
        if !self.contains(&scale_name) {
            let info = self.info(&weight)?;
            return Err(self.tensor_error(
                &weight,
                info,
                format!("is FP8 but its block scales `{scale_name}` are missing"),
            ));
        }
        let scale_shape = [n.div_ceil(QUANT_BLOCK), k.div_ceil(QUANT_BLOCK)];
        let scales = self.expect(&scale_name, Dtype::F32, &scale_shape)?;
        let scales = widen(scales.as_slice(), Dtype::F32);
        if let Some(bad) = scales.iter().find(|s| !s.is_finite()) {
            let info = self.info(&scale_name)?;
            return Err(self.tensor_error(
                &scale_name,
                info,
                format!("holds a non-finite scale ({bad})"),
            ));
        }
        Ok(Fp8Weight {
            n,
            k,
            codes,
            scales,
        })
    }

    fn add_shard(&mut self, path: PathBuf) -> Result<usize> {
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only; like every mmap-based loader we rely on the checkpoint
        // files not being modified while the process runs.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let shard = self.shards.len();
        let fail = |message: String| Error::Checkpoint {
            path: path.clone(),
            message,
        };
        let headers = parse_header(&map[..]).map_err(fail)?;
        for (name, info) in headers {
            if self.tensors.contains_key(&name) {
                return Err(Error::Tensor {
                    tensor: name,
                    file: path.clone(),
                    message: "appears in more than one shard".into(),
                });
            }
            self.tensors.insert(name, TensorInfo { shard, ..info });
        }
        self.shards.push(Shard {
            path,
            map: Arc::new(map),
        });
        Ok(shard)
    }
}

fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    let fail = |message: String| Error::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| fail(format!("not valid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| fail("has no `weight_map` object".into()))?;
    map.iter()
        .map(|(tensor, file)| {
            let file = file
                .as_str()
                .ok_or_else(|| fail(format!("`weight_map.{tensor}` is not a file name")))?;
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(fail(format!(
                    "`weight_map.{tensor}` names \"{file}\"; shards must sit beside the index"
                )));
            }
            Ok((tensor.clone(), file.to_string()))
        })
        .collect()
}

/// Parses a safetensors header, checking every tensor's byte range against the file size.
fn parse_header(file: &[u8]) -> std::result::Result<Vec<(String, TensorInfo)>, String> {
    let len = file.len();
    let Some(head) = file.get(..8) else {
        return Err(format!(
            "is {len} bytes, too short for a safetensors header (truncated?)"
        ));
    };
    let header_len = u64::from_le_bytes(head.try_into().expect("8 bytes")) as usize;
    let data_start = 8usize.saturating_add(header_len);
    if data_start > len {
        return Err(format!(
            "header claims {header_len} bytes but the file has {len} (truncated or not safetensors)"
        ));
    }
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&file[8..data_start])
        .map_err(|e| format!("malformed safetensors header: {e}"))?;
    let mut out = Vec::with_capacity(header.len());
    for (name, entry) in header {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| format!("malformed header entry for `{name}`: {what}");
        let tag = entry
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no dtype"))?;
        let dtype = Dtype::parse(tag).ok_or_else(|| {
            format!("tensor `{name}` has dtype {tag}, which DeepSeek checkpoints do not use")
        })?;
        let shape: Vec<usize> = entry
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("shape is not a list of sizes"))?;
        let offsets = entry
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()? as usize, o[1].as_u64()? as usize)))
            .ok_or_else(|| bad("data_offsets is not [start, end]"))?;
        let (begin, end) = offsets;
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad("shape overflows"))?;
        if end < begin || end - begin != numel * dtype.size() {
            return Err(bad(&format!(
                "{shape:?} {dtype} needs {} bytes but data_offsets span {}",
                numel * dtype.size(),
                end.saturating_sub(begin)
            )));
        }
        let (start, end) = (data_start + begin, data_start + end);
        if end > len {
            return Err(format!(
                "tensor `{name}` ends at byte {end} but the file has only {len} bytes (truncated)"
            ));
        }
        out.push((
            name,
            TensorInfo {
                dtype,
                shape,
                shard: 0,
                start,
                end,
            },
        ));
    }
    Ok(out)
}

/// Little-endian BF16 or F32 bytes as f32.
pub(crate) fn widen(bytes: &[u8], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        other => unreachable!("widen called on {other}"),
    }
}

/// Writes named F32 tensors (`(name, shape, values)`) to a safetensors file.
pub fn write_f32_tensors(path: &Path, tensors: &[(&str, Vec<usize>, &[f32])]) -> Result<()> {
    let fail = |message: String| Error::Output {
        path: path.to_path_buf(),
        message,
    };
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            let bytes: &[u8] = bytemuck::cast_slice(data);
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.to_string(), v))
                .map_err(|e| fail(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| fail(e.to_string()))
}

/// Parameter count and bytes per dtype (weight scales included), for `r1-run info`.
pub fn dtype_summary(ckpt: &Checkpoint) -> BTreeMap<Dtype, (usize, usize)> {
    let mut out = BTreeMap::new();
    for (_, info) in ckpt.tensors() {
        let e = out.entry(info.dtype).or_insert((0, 0));
        e.0 += info.numel();
        e.1 += info.bytes();
    }
    out
}
