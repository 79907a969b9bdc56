//! Build script.
//!
//! 1. `$OUT_DIR/launch_params.rs`: Rust mirrors of `cuda/launch_params.h` (bindgen; needs libclang).
//! 2. `$OUT_DIR/kernels.rs`: every `.cu` under `cuda/` (subfolders included) compiled by nvcc to
//!    an sm_90a cubin and embedded (`CUBINS`) with ptxas's inventory of its kernels and their
//!    registers (`KERNELS`), or `KERNELS_BUILT = false` when no nvcc is found. A cubin's stem is
//!    the source's path under `cuda/` without `.cu`, folders joined with `_`: `cuda/moe.cu` is
//!    "moe", `cuda/mla/decode.cu` is "mla_decode". Two sources with the same stem fail the
//!    build. Every `.cu`, `.cuh` and `.h` under `cuda/` reruns the script when it changes.
//!    nvcc is looked up as
//!    `$NVCC`, `$CUDA_HOME/bin/nvcc`, the project-local `tools/install-cuda-toolchain` install,
//!    then `nvcc` on `PATH`. `R1_REQUIRE_CUDA=1` turns a missing nvcc into an error (CI).
//!    A kernel that fails to compile is always an error.

use std::collections::BTreeMap;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where `tools/install-cuda-toolchain` puts nvcc, relative to the crate root.
const LOCAL_NVCC: &str = ".toolchain/cuda/nvidia/cu13/bin/nvcc";
const NVCC_FLAGS: &[&str] = &[
    "-cubin",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-O3",
    "-lineinfo",
    "-std=c++17",
    // A kernel that spills or uses local memory fails the build (the fast paths are sized to
    // avoid both; a regression should not land silently).
    "-Xptxas=--warn-on-spills,--warn-on-local-memory-usage,--warning-as-error",
    // ptxas's per-kernel report (names, registers) becomes the embedded kernel inventory.
    "-Xptxas=--verbose",
];

type Result<T> = std::result::Result<T, String>;

fn main() {
    if let Err(msg) = run() {
        eprintln!("\nerror: {msg}\n");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let root = PathBuf::from(
        env::var("CARGO_MANIFEST_DIR").map_err(|e| format!("CARGO_MANIFEST_DIR: {e}"))?,
    );
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let cuda = root.join("cuda");

    println!("cargo::rustc-check-cfg=cfg(r1_cuda_kernels)");
    for var in ["NVCC", "CUDA_HOME", "R1_REQUIRE_CUDA"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rerun-if-changed={}", cuda.display());
    let mut files = Vec::new();
    walk(&cuda, &mut files)?;
    files.sort();
    let mut sources = Vec::new();
    for path in files {
        match path.extension().and_then(|e| e.to_str()) {
            Some("cu") => sources.push(Source::new(&cuda, path.clone())?),
            Some("cuh" | "h") => {}
            _ => continue,
        }
        // cuda/'s own entry (above) notices added and removed files; each source and header is
        // also named, so that the dependency is explicit in cargo's output.
        println!("cargo::rerun-if-changed={}", path.display());
    }
    let mut stems = BTreeMap::new();
    for src in &sources {
        if let Some(other) = stems.insert(src.stem.as_str(), &src.path) {
            return Err(format!(
                "{} and {} both compile to the cubin stem {:?}; rename one",
                other.display(),
                src.path.display(),
                src.stem
            ));
        }
    }

    generate_launch_params(&cuda.join("launch_params.h"), &out.join("launch_params.rs"))?;

    let require = env::var("R1_REQUIRE_CUDA").is_ok_and(|v| !v.is_empty() && v != "0");
    let (built, cubins) = match find_nvcc(&root)? {
        Some(nvcc) => {
            println!("cargo::rerun-if-changed={}", nvcc.display());
            println!("cargo::rustc-cfg=r1_cuda_kernels");
            (true, compile_kernels(&nvcc, &cuda, &sources, &out)?)
        }
        None if require => {
            return Err(
                "R1_REQUIRE_CUDA is set but nvcc was not found (looked at $NVCC, $CUDA_HOME/bin, \
                        .toolchain/cuda, PATH); run tools/install-cuda-toolchain"
                    .into(),
            )
        }
        None => {
            println!("cargo::warning=nvcc not found: built without CUDA kernels (run tools/install-cuda-toolchain)");
            (false, Vec::new())
        }
    };
    write_kernels_rs(&out.join("kernels.rs"), built, &cubins)
}

/// Every file under `dir`, recursively.
fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry
            .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
            .path();
        if path.is_dir() {
            walk(&path, files)?;
        } else {
            files.push(path);
        }
    }
    Ok(())
}

/// A kernel source and the stem of its cubin (see the module docs).
struct Source {
    path: PathBuf,
    stem: String,
}

impl Source {
    fn new(cuda: &Path, path: PathBuf) -> Result<Self> {
        let rel = path
            .strip_prefix(cuda)
            .map_err(|_| format!("{} is not under {}", path.display(), cuda.display()))?
            .with_extension("");
        let parts = rel
            .components()
            .map(|c| c.as_os_str().to_str())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| format!("bad file name {}", path.display()))?;
        Ok(Source {
            stem: parts.join("_"),
            path,
        })
    }
}

/// `$NVCC` (must exist when set), `$CUDA_HOME/bin/nvcc`, the project-local install, `PATH`.
fn find_nvcc(root: &Path) -> Result<Option<PathBuf>> {
    if let Some(nvcc) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        let nvcc = PathBuf::from(nvcc);
        return if nvcc.is_file() {
            Ok(Some(nvcc))
        } else {
            Err(format!(
                "NVCC={} does not exist; unset it or run tools/install-cuda-toolchain",
                nvcc.display()
            ))
        };
    }
    let mut candidates: Vec<PathBuf> = env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin/nvcc"))
        .into_iter()
        .collect();
    candidates.push(root.join(LOCAL_NVCC));
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|dir| dir.join("nvcc")));
    }
    Ok(candidates.into_iter().find(|p| p.is_file()))
}

/// One compiled kernel source: its cubin and the kernels ptxas reported in it.
struct Cubin {
    stem: String,
    path: PathBuf,
    /// (kernel name, registers per thread) in ptxas's order.
    kernels: Vec<(String, u32)>,
}

/// nvcc's log split into ptxas's `--verbose` report and everything else.
struct PtxasLog<'a> {
    /// (kernel name, registers per thread) in ptxas's order.
    kernels: Vec<(String, u32)>,
    other: Vec<&'a str>,
}

/// The kernels of ptxas's `--verbose` report: "Compiling entry function 'NAME' for 'sm_90a'"
/// followed by "Used N registers, ..." for each.
fn ptxas_report(log: &str) -> Result<PtxasLog<'_>> {
    let mut kernels = Vec::new();
    let mut other = Vec::new();
    let mut current: Option<String> = None;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let Some(info) = line.strip_prefix("ptxas info    : ") else {
            // The continuation of "Function properties for NAME" is part of the report too.
            if !line.contains("bytes stack frame") {
                other.push(line);
            }
            continue;
        };
        if let Some(rest) = info.strip_prefix("Compiling entry function '") {
            current = rest.split('\'').next().map(str::to_string);
        } else if let Some(rest) = info.strip_prefix("Used ") {
            let regs = rest
                .split_once(" registers")
                .and_then(|(n, _)| n.trim().parse::<u32>().ok());
            if let (Some(name), Some(regs)) = (current.take(), regs) {
                kernels.push((name, regs));
            }
        }
    }
    if current.is_some() {
        return Err(format!("ptxas reported no register count for {current:?}"));
    }
    Ok(PtxasLog { kernels, other })
}

/// Compiles every source to `$OUT_DIR/<stem>.cubin` (in parallel).
fn compile_kernels(nvcc: &Path, cuda: &Path, sources: &[Source], out: &Path) -> Result<Vec<Cubin>> {
    let mut jobs = Vec::new();
    for Source { path: src, stem } in sources {
        let cubin = out.join(format!("{stem}.cubin"));
        let child = Command::new(nvcc)
            .args(NVCC_FLAGS)
            .arg("-I")
            .arg(cuda)
            .arg("-o")
            .arg(&cubin)
            .arg(src)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run {}: {e} (set NVCC or run tools/install-cuda-toolchain)",
                    nvcc.display()
                )
            })?;
        jobs.push((stem.to_string(), cubin, src, child));
    }
    let mut cubins = Vec::new();
    let mut failures = String::new();
    for (stem, cubin, src, child) in jobs {
        let output = child
            .wait_with_output()
            .map_err(|e| format!("nvcc on {}: {e}", src.display()))?;
        let log = String::from_utf8_lossy(&output.stderr).to_string()
            + &String::from_utf8_lossy(&output.stdout);
        if output.status.success() {
            let PtxasLog { kernels, other } = ptxas_report(&log)?;
            for line in other {
                println!("cargo::warning=nvcc {}: {line}", src.display());
            }
            if kernels.is_empty() {
                return Err(format!("ptxas reported no kernels in {}", src.display()));
            }
            cubins.push(Cubin {
                stem,
                path: cubin,
                kernels,
            });
        } else {
            let _ = write!(
                failures,
                "\n--- nvcc failed on {} ({}) ---\n{log}",
                src.display(),
                output.status
            );
        }
    }
    if !failures.is_empty() {
        return Err(format!(
            "CUDA kernels failed to compile with {}:{failures}",
            nvcc.display()
        ));
    }
    Ok(cubins)
}

fn write_kernels_rs(path: &Path, built: bool, cubins: &[Cubin]) -> Result<()> {
    let mut rs =
        String::from("// @generated by build.rs: cuda/**/*.cu compiled to sm_90a cubins.\n");
    let _ = writeln!(
        rs,
        "/// False when the crate was built without nvcc (no CUDA kernels embedded)."
    );
    let _ = writeln!(rs, "pub const KERNELS_BUILT: bool = {built};");
    let _ = writeln!(
        rs,
        "/// (cubin stem, cubin for sm_90a) for every .cu under cuda/ (stem: its path under cuda/ \
         without .cu, folders joined with `_`)."
    );
    let _ = writeln!(rs, "pub static CUBINS: &[(&str, &[u8])] = &[");
    for c in cubins {
        let _ = writeln!(
            rs,
            "    ({:?}, include_bytes!({:?})),",
            c.stem,
            c.path.display().to_string()
        );
    }
    rs.push_str("];\n");
    let _ = writeln!(
        rs,
        "/// (cubin stem, kernel, registers per thread as ptxas reported) for every kernel."
    );
    let _ = writeln!(rs, "pub static KERNELS: &[(&str, &str, u32)] = &[");
    for c in cubins {
        for (name, regs) in &c.kernels {
            let _ = writeln!(rs, "    ({:?}, {name:?}, {regs}),", c.stem);
        }
    }
    rs.push_str("];\n");
    fs::write(path, rs).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn generate_launch_params(header: &Path, out: &Path) -> Result<()> {
    let builder = bindgen::Builder::default()
        .header(header.display().to_string())
        .allowlist_type("R1.*")
        .allowlist_var("R1_.*")
        .derive_default(true)
        .layout_tests(true);
    // bindgen panics (rather than erroring) when it cannot load libclang.
    let generated =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || builder.generate()));
    let bindings = match generated {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return Err(format!("bindgen failed on {}: {e}", header.display())),
        Err(_) => {
            return Err(format!(
                "bindgen could not run on {} (see the panic above): it needs libclang; install it \
                 (Debian/Ubuntu: apt-get install libclang-dev) or point LIBCLANG_PATH at libclang.so",
                header.display()
            ))
        }
    };
    bindings
        .write_to_file(out)
        .map_err(|e| format!("cannot write {}: {e}", out.display()))
}
