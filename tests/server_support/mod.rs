//! Helpers for the server tests: a tiny random checkpoint in the official layout whose
//! vocabulary covers the real DeepSeek tokenizer, a scripted backend that makes the engine emit
//! a chosen token sequence, an in-process server on 127.0.0.1, and a minimal HTTP/1.1 client.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use half::bf16;
use r1_runtime::backend::{Backend, Readout, StepOutput};
use r1_runtime::chat::ChatFormat;
use r1_runtime::checkpoint::Checkpoint;
use r1_runtime::config::ModelConfig;
use r1_runtime::engine::scheduler::{SchedulerHandle, SchedulerOptions};
use r1_runtime::engine::{Engine, EngineOptions};
use r1_runtime::graph::{Graph, Plan};
use r1_runtime::kv_cache::{Batch, PAGE_TOKENS};
use r1_runtime::model::weights::ModelWeights;
use r1_runtime::numerics::fp8::f32_to_e4m3;
use r1_runtime::numerics::sampling::SplitMix64;
use r1_runtime::server::{AppState, ServerOptions};
use r1_runtime::Precision;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

pub const VOCAB: usize = 129_280;
pub const MODEL: &str = "r1-test";

struct SplitMix(SplitMix64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

struct Tensors {
    rng: SplitMix,
    data: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
}

impl Tensors {
    fn bf16(&mut self, name: &str, shape: &[usize], scale: f32, offset: f32) {
        let n: usize = shape.iter().product();
        let mut bytes = Vec::with_capacity(2 * n);
        for _ in 0..n {
            let v = bf16::from_f32(offset + scale * self.rng.uniform());
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        self.data
            .push((name.into(), Dtype::BF16, shape.to_vec(), bytes));
    }

    fn f32(&mut self, name: &str, shape: &[usize], scale: f32) {
        let n: usize = shape.iter().product();
        let mut bytes = Vec::with_capacity(4 * n);
        for _ in 0..n {
            bytes.extend_from_slice(&(scale * self.rng.uniform()).to_le_bytes());
        }
        self.data
            .push((name.into(), Dtype::F32, shape.to_vec(), bytes));
    }

    /// An FP8 Linear `[n, k]` plus its `weight_scale_inv` (a multiplier per 128x128 block).
    fn fp8(&mut self, prefix: &str, n: usize, k: usize) {
        let codes: Vec<u8> = (0..n * k)
            .map(|_| f32_to_e4m3(2.0 * self.rng.uniform()))
            .collect();
        let (sn, sk) = (n.div_ceil(128), k.div_ceil(128));
        let std = 1.0 / (k as f32).sqrt();
        let mut scales = Vec::with_capacity(4 * sn * sk);
        for _ in 0..sn * sk {
            let s = std * (0.75 + 0.25 * self.rng.uniform());
            scales.extend_from_slice(&s.to_le_bytes());
        }
        self.data.push((
            format!("{prefix}.weight"),
            Dtype::F8_E4M3,
            vec![n, k],
            codes,
        ));
        self.data.push((
            format!("{prefix}.weight_scale_inv"),
            Dtype::F32,
            vec![sn, sk],
            scales,
        ));
    }

    fn mlp(&mut self, p: &str, h: usize, inter: usize) {
        self.fp8(&format!("{p}.gate_proj"), inter, h);
        self.fp8(&format!("{p}.up_proj"), inter, h);
        self.fp8(&format!("{p}.down_proj"), h, inter);
    }
}

/// Writes a tiny random DeepSeek-V3 checkpoint (official tensor names and dtypes, one
/// safetensors file) with the real vocabulary size into `dir`, and copies the test tokenizer's
/// `tokenizer.json` beside it. With `chat_template` the tokenizer_config.json (DeepSeek's own
/// template) is copied too; without it the built-in R1-0528-style template applies.
pub fn random_checkpoint(dir: &Path, tokenizer_dir: &Path, context: usize, chat_template: bool) {
    let (h, heads, qr, kvr, nope, rope, v) = (64, 2, 32, 32, 16, 16, 16);
    let (inter, moe_inter, experts) = (96, 32, 4);
    let layers = 2;
    let config = json!({
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": VOCAB,
        "hidden_size": h,
        "intermediate_size": inter,
        "moe_intermediate_size": moe_inter,
        "num_hidden_layers": layers,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "q_lora_rank": qr,
        "kv_lora_rank": kvr,
        "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope,
        "v_head_dim": v,
        "n_routed_experts": experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": true,
        "routed_scaling_factor": 2.5,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000,
        "max_position_embeddings": context,
        "num_nextn_predict_layers": 0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": false,
        "attention_bias": false,
        "torch_dtype": "bfloat16",
    });
    let mut config = config;
    config["rope_scaling"] = json!({
        "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0
    });
    config["quantization_config"] = json!({
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
        "weight_block_size": [128, 128]
    });
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut t = Tensors {
        rng: SplitMix(SplitMix64::new(0x5EED)),
        data: Vec::new(),
    };
    t.bf16("model.embed_tokens.weight", &[VOCAB, h], 1.0, 0.0);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        t.bf16(&format!("{p}.input_layernorm.weight"), &[h], 0.1, 1.0);
        t.bf16(
            &format!("{p}.post_attention_layernorm.weight"),
            &[h],
            0.1,
            1.0,
        );
        let a = format!("{p}.self_attn");
        t.fp8(&format!("{a}.q_a_proj"), qr, h);
        t.bf16(&format!("{a}.q_a_layernorm.weight"), &[qr], 0.1, 1.0);
        t.fp8(&format!("{a}.q_b_proj"), heads * (nope + rope), qr);
        t.fp8(&format!("{a}.kv_a_proj_with_mqa"), kvr + rope, h);
        t.bf16(&format!("{a}.kv_a_layernorm.weight"), &[kvr], 0.1, 1.0);
        t.fp8(&format!("{a}.kv_b_proj"), heads * (nope + v), kvr);
        t.fp8(&format!("{a}.o_proj"), h, heads * v);
        if l == 0 {
            t.mlp(&format!("{p}.mlp"), h, inter);
        } else {
            t.bf16(&format!("{p}.mlp.gate.weight"), &[experts, h], 0.5, 0.0);
            t.f32(
                &format!("{p}.mlp.gate.e_score_correction_bias"),
                &[experts],
                0.01,
            );
            for e in 0..experts {
                t.mlp(&format!("{p}.mlp.experts.{e}"), h, moe_inter);
            }
            t.mlp(&format!("{p}.mlp.shared_experts"), h, moe_inter);
        }
    }
    t.bf16("model.norm.weight", &[h], 0.1, 1.0);
    t.bf16("lm_head.weight", &[VOCAB, h], 0.5, 0.0);
    let views: Vec<(String, TensorView<'_>)> = t
        .data
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &dir.join("model.safetensors")).unwrap();
    std::fs::copy(
        tokenizer_dir.join("tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    if chat_template {
        std::fs::copy(
            tokenizer_dir.join("tokenizer_config.json"),
            dir.join("tokenizer_config.json"),
        )
        .unwrap();
    }
}

/// A backend that ignores the network and makes the engine emit a script: after the last
/// occurrence of `trigger` in a sequence, the k-th generated token is `script[k]` (then eos).
/// Sequences are told apart by their first cache page.
pub struct ScriptedBackend {
    trigger: u32,
    script: Vec<u32>,
    eos: u32,
    vocab: usize,
    hidden: usize,
    history: Mutex<HashMap<u32, Vec<u32>>>,
}

impl Backend for ScriptedBackend {
    fn name(&self) -> &'static str {
        "scripted"
    }

    fn precision(&self) -> Precision {
        Precision::Exact
    }

    fn run(
        &mut self,
        _graph: &Graph,
        _plan: &Plan,
        batch: &Batch,
        _inputs: &[(&str, &[f32])],
        readout: &Readout<'_>,
    ) -> r1_runtime::Result<StepOutput> {
        let mut logits = Vec::new();
        let mut history = self.history.lock().unwrap();
        let mut offset = 0;
        for seg in &batch.segments {
            let tokens = &batch.tokens[offset..offset + seg.len];
            offset += seg.len;
            let h = history.entry(seg.blocks[0]).or_default();
            h.truncate(seg.start_pos);
            for (i, &t) in tokens.iter().enumerate() {
                h.push(t);
                if i + seg.logit_rows.min(seg.len) >= tokens.len() {
                    let next = match h.iter().rposition(|&x| x == self.trigger) {
                        Some(at) => {
                            let k = h.len() - 1 - at;
                            self.script.get(k).copied().unwrap_or(self.eos)
                        }
                        None => self.eos,
                    };
                    let mut row = vec![0.0f32; self.vocab];
                    row[next as usize] = 100.0;
                    logits.extend(row);
                }
            }
        }
        let hidden = vec![0.0; batch.tokens.len() * self.hidden];
        Ok(readout.from_host(&logits, self.vocab, hidden))
    }
}

/// An engine over the checkpoint in `dir` whose output is `script` after `trigger`.
pub fn scripted_engine(dir: &Path, trigger: u32, script: Vec<u32>) -> Engine {
    let cfg = ModelConfig::from_dir(dir).unwrap();
    let ckpt = Checkpoint::open(dir).unwrap();
    let weights = Arc::new(ModelWeights::load(&ckpt, &cfg, false).unwrap());
    let backend = ScriptedBackend {
        trigger,
        script,
        eos: cfg.eos_token_ids[0],
        vocab: cfg.vocab_size,
        hidden: cfg.hidden_size,
        history: Mutex::new(HashMap::new()),
    };
    Engine::with_backend(cfg, weights, Box::new(backend), 1 << 16)
}

/// A server running in this process on 127.0.0.1 (its own thread and runtime).
pub struct TestServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    /// Serves the checkpoint in `dir` with the CPU backend.
    pub fn start(dir: &Path) -> Self {
        let d = dir.to_path_buf();
        Self::with_engine(dir, move || {
            Engine::load(
                &d,
                &EngineOptions {
                    with_mtp: false,
                    cache_tokens: 1 << 16,
                    ..EngineOptions::default()
                },
            )
        })
    }

    pub fn with_engine<F>(dir: &Path, load: F) -> Self
    where
        F: FnOnce() -> r1_runtime::Result<Engine> + Send + 'static,
    {
        let chat = ChatFormat::from_dir(dir).unwrap();
        let sched = SchedulerHandle::spawn(
            load,
            SchedulerOptions {
                max_running: 32,
                step_tokens: 256,
                kv_pages: (1 << 16) / PAGE_TOKENS,
                tokenizer: Some(chat.tokenizer.clone()),
                prefix_cache_pages: (1 << 16) / PAGE_TOKENS / 4,
                draft_tokens: 0,
            },
        )
        .unwrap();
        let state = AppState::new(
            sched,
            chat,
            ServerOptions {
                model_name: MODEL.into(),
                ..ServerOptions::default()
            },
            Some(0),
        );
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let st = Arc::clone(&state);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                r1_runtime::server::serve(listener, st, async {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
            });
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        TestServer {
            addr,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn get(&self, path: &str) -> Response {
        request(self.addr, "GET", path, None)
    }

    pub fn post(&self, path: &str, body: &str) -> Response {
        request(self.addr, "POST", path, Some(body))
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Response {
        self.post(path, &body.to_string())
    }

    /// Waits (bounded) until no sequence runs and no KV page is in use.
    pub fn wait_idle(&self) -> r1_runtime::engine::scheduler::Metrics {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let m = self.state.scheduler.metrics();
            if (m.running == 0 && m.waiting == 0 && m.kv_pages_in_use == 0)
                || std::time::Instant::now() > deadline
            {
                return m;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `data:` payloads of an SSE body.
    pub fn sse_data(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(|s| s.trim().to_string())
            .collect()
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

fn send_head(s: &mut TcpStream, method: &str, path: &str, body: Option<&str>) {
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
}

fn read_head(r: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    (status, headers)
}

/// One request on a fresh connection (`Connection: close`), chunked bodies decoded.
pub fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Response {
    let mut s = connect(addr);
    send_head(&mut s, method, path, body);
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut raw = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            let mut buf = vec![0; n + 2];
            r.read_exact(&mut buf).unwrap();
            raw.extend_from_slice(&buf[..n]);
        }
    } else {
        r.read_to_end(&mut raw).unwrap();
    }
    Response {
        status,
        headers,
        body: String::from_utf8(raw).expect("UTF-8 body"),
    }
}

/// Starts a streaming request and reads until `events` SSE data lines arrived, then returns
/// the open connection (dropping it disconnects mid-stream).
pub fn open_stream(
    addr: SocketAddr,
    path: &str,
    body: &Value,
    events: usize,
) -> BufReader<TcpStream> {
    let mut s = connect(addr);
    send_head(&mut s, "POST", path, Some(&body.to_string()));
    let mut r = BufReader::new(s);
    let (status, _) = read_head(&mut r);
    assert_eq!(status, 200);
    let mut seen = 0;
    while seen < events {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap() == 0 {
            break;
        }
        if l.contains("data:") {
            seen += 1;
        }
    }
    r
}

/// A fresh random checkpoint in a temp dir, or None (skip line printed) without the tokenizer.
pub fn checkpoint(context: usize, chat_template: bool) -> Option<(tempfile::TempDir, PathBuf)> {
    let tok = crate::chat_support::test_tokenizer_dir()?;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r1-test");
    random_checkpoint(&dir, &tok, context, chat_template);
    Some((tmp, dir))
}
