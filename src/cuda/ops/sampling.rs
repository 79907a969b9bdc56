//! sample_tokens (cuda/sampling.cu): one token per [`SampleRow`] from a row of f32 logits, by
//! the sampling rule of [`crate::numerics::sampling`] (bit-identical to its `draw`;
//! tests/gpu_sampling.rs). Contract: cuda/params/sampling.h. No workspace: each CTA keeps its
//! histograms in shared memory and re-reads its row, so a call allocates nothing.

use cudarc::driver::LaunchConfig;

use super::{Checker, Region};
use crate::cuda::error::Result;
use crate::cuda::launch::{KernelLaunch, Prepared};
use crate::cuda::sys::{self, R1SampleParams, R1SampleRow};
use crate::cuda::{Device, DeviceBuffer};
use crate::numerics::sampling::Draw;

const KERNEL: &str = "sample_tokens";

/// How one logits row draws its token on the device: the row index into the logits buffer and
/// the [`Draw`] fields (cuda/params/sampling.h's R1SampleRow).
pub type SampleRow = R1SampleRow;

// SAFETY: R1SampleRow is `#[repr(C)]` (bindgen) of two u64 then four 4-byte fields: 32 bytes,
// 8-byte aligned, no padding (asserted below), and any bit pattern is a valid value.
unsafe impl bytemuck::Zeroable for R1SampleRow {}
unsafe impl bytemuck::Pod for R1SampleRow {}
const _: () = assert!(std::mem::size_of::<R1SampleRow>() == 32);

impl R1SampleRow {
    /// Row `row` of the logits buffer drawn by `d`. A row past i32 (or past the buffer) draws
    /// -1 on the device.
    pub fn new(row: usize, d: &Draw) -> Self {
        R1SampleRow {
            seed: d.seed,
            counter: d.counter,
            row: i32::try_from(row).unwrap_or(-1),
            temperature: d.temperature,
            top_p: d.top_p,
            top_k: d.top_k,
        }
    }
}

/// A sample_tokens call as plain numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleDesc {
    /// f32 `[logits.len / vocab][vocab]`.
    pub logits: Region,
    pub vocab: usize,
    /// [`SampleRow`] `[n_rows]` (at least).
    pub rows: Region,
    pub n_rows: usize,
    /// i32 `[n_rows]` (at least).
    pub tokens: Region,
}

impl SampleDesc {
    /// Every requirement of cuda/params/sampling.h, checked on the host. Row indices live in
    /// device memory; the kernel draws -1 for one outside the logits buffer.
    pub fn check(&self) -> Result<()> {
        let c = Checker { kernel: KERNEL };
        c.req(self.vocab >= 1, || "vocab must be >= 1".to_string())?;
        c.req(self.logits.len >= self.vocab, || {
            format!(
                "logits holds {} elements, less than one row of vocab {}",
                self.logits.len, self.vocab
            )
        })?;
        c.fits_i32(&[
            ("vocab", self.vocab),
            ("logit rows", self.logits.len / self.vocab),
            ("n_rows", self.n_rows),
        ])?;
        c.aligned("logits", self.logits, 4)?;
        c.aligned("rows", self.rows, 8)?;
        c.aligned("tokens", self.tokens, 4)?;
        c.holds("rows", self.rows, self.n_rows, "one SampleRow per row")?;
        c.holds("tokens", self.tokens, self.n_rows, "one token per row")
    }
}

impl KernelLaunch for SampleDesc {
    type Params = R1SampleParams;

    fn kernel(&self) -> &'static str {
        KERNEL
    }

    fn launch_config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.n_rows as u32, 1, 1),
            block_dim: (sys::R1_SAMPLE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn params(&self) -> Result<R1SampleParams> {
        Ok(R1SampleParams {
            logits: self.logits.addr,
            rows: self.rows.addr,
            tokens: self.tokens.addr,
            vocab: self.vocab as i32,
            logit_rows: (self.logits.len / self.vocab) as i32,
            n: self.n_rows as i32,
            reserved: 0,
        })
    }
}

/// sample_tokens over caller-owned buffers: `tokens[i]` = the draw of `rows[i]` for
/// `i < n_rows`, each from row `rows[i].row` of `logits` (`[logits.len() / vocab][vocab]`).
pub struct SampleArgs<'a> {
    pub logits: &'a DeviceBuffer<f32>,
    pub vocab: usize,
    pub rows: &'a DeviceBuffer<SampleRow>,
    pub n_rows: usize,
    pub tokens: &'a mut DeviceBuffer<i32>,
}

impl SampleArgs<'_> {
    pub fn desc(&self) -> SampleDesc {
        SampleDesc {
            logits: Region::from(self.logits),
            vocab: self.vocab,
            rows: Region::from(self.rows),
            n_rows: self.n_rows,
            tokens: Region::from(&*self.tokens),
        }
    }
}

impl Device {
    /// Checks `args` and builds the launch (no work queued yet); `n_rows == 0` launches nothing.
    pub fn prepare_sample<'a>(&'a self, args: SampleArgs<'a>) -> Result<Prepared<'a>> {
        let desc = args.desc();
        desc.check()?;
        if desc.n_rows == 0 {
            return Ok(Prepared::new(self, KERNEL));
        }
        Prepared::single(self, &desc)
    }

    /// sample_tokens into caller-owned buffers (queued on the stream).
    pub fn sample_into(&self, args: SampleArgs<'_>) -> Result<()> {
        self.prepare_sample(args)?.launch()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::launch::row_symbol;
    use crate::numerics::sampling::{draw, exp_portable, gumbel, noise_bits, order_key};

    /// cuda/sampling.cu's passes on the host, step for step (the radix selects with their
    /// 256 bins, the warp's 32 lanes of 8 bins, the need carried between digits), so that the
    /// device algorithm is checked against the rule's `draw` where no GPU is.
    fn kernel_model(x: &[f32], s: &SampleRow) -> i32 {
        let vocab = x.len();
        let temp = s.temperature;
        let greedy = temp.is_nan() || temp <= 0.0;
        let z = |i: usize| if greedy { x[i] } else { x[i] / temp };
        let pack = |k: u32, i: usize| (u64::from(k) << 32) | u64::from(u32::MAX - i as u32);
        let best = (0..vocab).map(|i| pack(order_key(z(i)), i)).max().unwrap();
        let top = (u32::MAX - best as u32) as usize;
        let m = z(top);
        if greedy || !m.is_finite() {
            return top as i32;
        }
        let mass = |v: f32| {
            let d = v - m;
            if d.is_nan() || d < -23.0 {
                0
            } else {
                (exp_portable(d) * 4_294_967_296.0) as u64
            }
        };
        let select = |floor: u32, by_mass: bool| -> u32 {
            let (mut prefix, mut mask, mut need) = (0u32, 0u32, 0u64);
            for shift in [24, 16, 8, 0] {
                let mut hist = [0u64; 256];
                for i in 0..vocab {
                    let key = order_key(z(i));
                    if key < floor || key & mask != prefix {
                        continue;
                    }
                    hist[((key >> shift) & 0xFF) as usize] += if by_mass { mass(z(i)) } else { 1 };
                }
                let own: Vec<u64> = (0..32)
                    .map(|l| (0..8).map(|j| hist[255 - 8 * l - j]).sum())
                    .collect();
                let incl: Vec<u64> = own
                    .iter()
                    .scan(0, |acc, &o| {
                        *acc += o;
                        Some(*acc)
                    })
                    .collect();
                if shift == 24 {
                    let total = incl[31];
                    need = if by_mass {
                        ((f64::from(s.top_p) * total as f64).ceil() as u64).max(1)
                    } else {
                        u64::from(s.top_k)
                    };
                    if total < need {
                        return floor;
                    }
                }
                let lane = (0..32)
                    .find(|&l| incl[l] - own[l] < need && need <= incl[l])
                    .unwrap();
                let mut acc = incl[lane] - own[lane];
                for j in 0..8 {
                    let b = 255 - 8 * lane - j;
                    let before = acc;
                    acc += hist[b];
                    if acc >= need {
                        prefix |= (b as u32) << shift;
                        need -= before;
                        break;
                    }
                }
                mask |= 0xFF << shift;
            }
            prefix.max(floor)
        };
        let mut t = 1;
        if s.top_k != 0 && s.top_k as usize <= vocab {
            t = select(1, false);
        }
        if s.top_p < 1.0 {
            t = select(t, true);
        }
        let score = |i: usize| z(i) + gumbel(noise_bits(s.seed, s.counter, i as u32));
        let best = (0..vocab)
            .filter(|&i| order_key(z(i)) >= t)
            .map(|i| pack(order_key(score(i)), i))
            .max()
            .unwrap();
        (u32::MAX - best as u32) as i32
    }

    #[test]
    fn kernel_model_draws_what_the_rule_draws() {
        let mut state = 7u64;
        let mut next = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            noise_bits(state, 0, 0)
        };
        let mut cases = 0;
        for vocab in [1usize, 2, 7, 300, 4096] {
            for r in 0..24 {
                let scale = [0.5f32, 3.0, 9.0][r % 3];
                let mut x: Vec<f32> = (0..vocab)
                    .map(|_| ((next() >> 40) as f32 / (1u32 << 24) as f32 - 0.5) * scale)
                    .collect();
                match r % 6 {
                    1 => x.iter_mut().for_each(|v| *v = (*v * 2.0).round()),
                    2 if vocab > 2 => {
                        x[0] = f32::NAN;
                        x[vocab - 1] = f32::NEG_INFINITY;
                    }
                    3 => x.iter_mut().for_each(|v| *v = (*v).abs().round() * 0.25),
                    _ => {}
                }
                for (temperature, top_k, top_p) in [
                    (0.0, 0, 1.0),
                    (1.0, 0, 1.0),
                    (0.6, 1, 1.0),
                    (1.5, 50, 1.0),
                    (1.0, 0, 0.5),
                    (0.6, 50, 0.95),
                    (1.0, 3, 0.0),
                    (1.0, 5000, 0.99),
                ] {
                    let d = Draw {
                        temperature,
                        top_k,
                        top_p,
                        seed: next(),
                        counter: next() % 1000,
                    };
                    let want = draw(&x, &d) as i32;
                    assert_eq!(
                        kernel_model(&x, &SampleRow::new(0, &d)),
                        want,
                        "{x:?} {d:?}"
                    );
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 5 * 24 * 8);
    }

    fn ok() -> SampleDesc {
        SampleDesc {
            logits: Region {
                addr: 0x1000,
                len: 3 * 1000,
            },
            vocab: 1000,
            rows: Region {
                addr: 0x8000,
                len: 4,
            },
            n_rows: 4,
            tokens: Region {
                addr: 0x9000,
                len: 4,
            },
        }
    }

    #[test]
    fn sample_row_carries_the_draw() {
        let d = Draw {
            temperature: 0.6,
            top_k: 50,
            top_p: 0.95,
            seed: u64::MAX,
            counter: 1 << 40,
        };
        let r = SampleRow::new(7, &d);
        assert_eq!(
            (r.row, r.seed, r.counter, r.top_k),
            (7, u64::MAX, 1 << 40, 50)
        );
        assert_eq!((r.temperature, r.top_p), (0.6, 0.95));
        assert_eq!(SampleRow::new(usize::MAX, &d).row, -1);
    }

    #[test]
    fn host_checks_name_requirements() {
        ok().check().unwrap();
        assert_eq!(row_symbol(&ok()), KERNEL);
        let p = ok().params().unwrap();
        assert_eq!((p.vocab, p.logit_rows, p.n), (1000, 3, 4));
        let msg = |d: SampleDesc| d.check().unwrap_err().to_string();
        assert!(msg(SampleDesc { vocab: 0, ..ok() }).contains("sample_tokens: vocab must be >= 1"));
        let short = Region {
            addr: 0x1000,
            len: 999,
        };
        assert!(msg(SampleDesc {
            logits: short,
            ..ok()
        })
        .contains("less than one row"));
        assert!(msg(SampleDesc { n_rows: 5, ..ok() }).contains("rows holds 4 elements"));
        let tokens = Region {
            addr: 0x9002,
            len: 4,
        };
        assert!(msg(SampleDesc { tokens, ..ok() }).contains("4-byte aligned"));
    }
}
