//! `r1-run chat` and `r1-run serve` as processes, on a generated random checkpoint with the
//! real tokenizer: one-shot and piped multi-turn chat, and a server answering over HTTP.

mod chat_support;
mod server_support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn r1_run() -> Command {
    Command::new(env!("CARGO_BIN_EXE_r1-run"))
}

#[test]
fn chat_one_shot_and_piped_turns() {
    let Some((_tmp, dir)) = server_support::checkpoint(4096, false) else {
        return;
    };
    let out = r1_run()
        .args(["chat", "--model"])
        .arg(&dir)
        .args([
            "--prompt",
            "Hello there",
            "--max-tokens",
            "6",
            "--think",
            "--temperature",
            "0",
            "--stats",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Not a terminal: no ANSI codes; forced thinking shows as a <think> block.
    assert!(!stdout.contains('\x1b'), "{stdout:?}");
    assert!(stdout.starts_with("<think>\n"), "{stdout:?}");
    assert!(stderr.contains("generated tokens"), "{stderr}");

    let mut child = r1_run()
        .args(["chat", "--model"])
        .arg(&dir)
        .args([
            "--max-tokens",
            "4",
            "--temperature",
            "0",
            "--stats",
            "--hide-thinking",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"first question\n\n/reset\nsecond question\n/exit\nnever asked\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("generated tokens").count(), 2, "{stderr}");
    assert!(stderr.contains("(conversation reset)"));
}

#[test]
fn chat_rejects_a_directory_without_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let out = r1_run()
        .args(["chat", "--model"])
        .arg(dir.path())
        .args(["--prompt", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokenizer.json"));
}

#[test]
fn serve_answers_over_http() {
    let Some((_tmp, dir)) = server_support::checkpoint(4096, false) else {
        return;
    };
    let mut child = r1_run()
        .args(["serve", "--model"])
        .arg(&dir)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--served-model-name",
            "tiny",
            "--cache-tokens",
            "65536",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 || Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve exited or never listened");
        }
        if let Some(rest) = line.split("http://").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    let r = server_support::request(addr, "GET", "/health", None);
    let models = server_support::request(addr, "GET", "/v1/models", None);
    let chat = server_support::request(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(r#"{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#),
    );
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(r.status, 200);
    assert_eq!(models.json()["data"][0]["id"], "tiny");
    assert_eq!(chat.status, 200, "{}", chat.body);
    assert!(chat.json()["usage"]["completion_tokens"].as_u64().unwrap() <= 3);
}
