//! The backend's persistent device memory (docs/design.md, "The decode path"): every buffer a
//! step uses is made when the backend is built, sized for the largest step the
//! [`CudaOptions`](super::CudaOptions) allow, and reused; a step uploads only its metadata, in
//! one host-to-device copy laid out by [`MetaLayout`].
//!
//! - graph slots at their largest width (over the model's graphs) times the step limit;
//! - the quantized activations of every FP8 Linear (codes + SA scales, one pair for all);
//! - MLA: the attention scratch (latent query, latent output, lse) and the split-KV
//!   workspace, carved per split plan out of one set of buffers;
//! - the step metadata block (token ids, positions, sequences, selected rows, query starts,
//!   kv lengths, block tables).
//!
//! A step larger than the limits still runs: [`Core::reserve`] grows what it needs, once, and
//! says why under `R1_CUDA_DEBUG=1`. Growing frees and reallocates, which the backend notices
//! through the device's allocation count and answers by dropping its captured graphs.

use half::bf16;

use super::weights::GpuWeight;
use super::{debug_log, Core, Slot, State};
use crate::cuda::heuristics::mla_plan_parts;
use crate::cuda::ops::{act_scale_m_pad, QuantizedActivations, QUANT_BLOCK};
use crate::cuda::{CudaError, Device, DeviceBuffer, MlaBatch, MlaWorkspace};
use crate::error::Result;
use crate::graph::{Graph, Op, Plan, Rows, Storage};
use crate::kv_cache::Batch;

/// Grows `buf` to at least `len` elements (contents not kept), saying why under
/// `R1_CUDA_DEBUG`.
pub(super) fn grow<T: bytemuck::Pod>(
    dev: &Device,
    buf: &mut Option<DeviceBuffer<T>>,
    len: usize,
    what: &str,
) -> Result<()> {
    let have = buf.as_ref().map_or(0, DeviceBuffer::len);
    if buf.is_some() && have >= len {
        return Ok(());
    }
    if dev.is_capturing() {
        // Refused before the old buffer goes: its free would be recorded into the capture.
        return Err(CudaError::Capture(format!(
            "{what} would grow from {have} to {len} elements inside a captured step"
        ))
        .into());
    }
    if buf.is_some() {
        debug_log(|| format!("growing {what} from {have} to {len} elements"));
    }
    *buf = None; // free before allocating the larger one
    *buf = Some(dev.alloc(len.max(1))?);
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Step metadata
// ------------------------------------------------------------------------------------------

/// Parts of the metadata block start on 64-byte boundaries (16 i32).
const META_ALIGN: usize = 16;

/// Where each part of a step's metadata lies in the metadata block, in i32 elements: a pure
/// function of the step's sizes, so a graph bucket finds its parts at the same addresses on
/// every replay and the host fills one staging vector laid out the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MetaLayout {
    pub tokens: usize,
    /// Selected rows.
    pub rows: usize,
    pub seqs: usize,
    pub bt_stride: usize,
    /// Offsets: token ids `[tokens]`, positions `[tokens]`, sequence of each token
    /// `[tokens]`, selected rows `[rows]`, query starts `[seqs + 1]`, kv lengths `[seqs]`,
    /// block tables `[seqs][bt_stride]`.
    pub ids: usize,
    pub positions: usize,
    pub token_seq: usize,
    pub select: usize,
    pub q_starts: usize,
    pub seqlens: usize,
    pub block_table: usize,
    /// Elements up to the end of the block tables (what one upload copies).
    pub len: usize,
}

impl MetaLayout {
    pub fn new(tokens: usize, rows: usize, seqs: usize, bt_stride: usize) -> Self {
        let mut at = 0;
        let mut part = |n: usize| {
            let start = at;
            at = (at + n).next_multiple_of(META_ALIGN);
            start
        };
        let ids = part(tokens);
        let positions = part(tokens);
        let token_seq = part(tokens);
        let select = part(rows);
        let q_starts = part(seqs + 1);
        let seqlens = part(seqs);
        let block_table = part(0);
        MetaLayout {
            tokens,
            rows,
            seqs,
            bt_stride,
            ids,
            positions,
            token_seq,
            select,
            q_starts,
            seqlens,
            block_table,
            len: block_table + seqs * bt_stride,
        }
    }
}

/// How a graph step pads its batch to its bucket: `seqs` sequences in all, each padding
/// sequence bringing the same number of tokens (and rows) as the real ones at positions
/// `0..`, in the cache page `scratch` that no sequence owns; block tables `bt_stride` wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Padding {
    pub seqs: usize,
    pub tokens_per_seq: usize,
    pub rows_per_seq: usize,
    pub scratch_page: u32,
    pub bt_stride: usize,
}

/// A step's metadata as the kernels see it (host side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct StepMeta {
    pub layout: MetaLayout,
    pub max_q_len: usize,
    /// Tokens and selected rows of the real sequences (the first ones of the layout).
    pub real_tokens: usize,
    pub real_rows: usize,
}

/// Fills `out` with the step's metadata (laid out by the returned layout): the batch's
/// sequences, then any padding sequences. Block-table rows are padded with -1 for real
/// sequences and filled with the scratch page for padding ones.
pub(super) fn fill_meta(batch: &Batch, pad: Option<Padding>, out: &mut Vec<i32>) -> StepMeta {
    let real_seqs = batch.segments.len();
    let real_tokens = batch.tokens.len();
    let selected = batch.selected_rows();
    let (seqs, tokens, rows, bt_stride) = match pad {
        Some(p) => (
            p.seqs,
            p.seqs * p.tokens_per_seq,
            p.seqs * p.rows_per_seq,
            p.bt_stride,
        ),
        None => (
            real_seqs,
            real_tokens,
            selected.len(),
            batch
                .segments
                .iter()
                .map(|s| s.blocks.len())
                .max()
                .unwrap_or(0)
                .max(1),
        ),
    };
    let l = MetaLayout::new(tokens, rows, seqs, bt_stride);
    out.clear();
    out.resize(l.len, 0);
    let padding = pad.map_or(0, |p| p.seqs - real_seqs);
    let pad_q = pad.map_or(0, |p| p.tokens_per_seq);
    let pad_rows = pad.map_or(0, |p| p.rows_per_seq);

    for (i, &t) in batch.tokens.iter().enumerate() {
        out[l.ids + i] = t as i32;
    }
    // Padding tokens are token 0.
    let (mut t, mut q_start, mut max_q_len) = (0usize, 0i32, 0usize);
    out[l.q_starts] = 0;
    for (b, s) in batch.segments.iter().enumerate() {
        for i in 0..s.len {
            out[l.positions + t] = (s.start_pos + i) as i32;
            out[l.token_seq + t] = b as i32;
            t += 1;
        }
        q_start += s.len as i32;
        out[l.q_starts + b + 1] = q_start;
        out[l.seqlens + b] = (s.start_pos + s.len) as i32;
        let row = &mut out[l.block_table + b * bt_stride..][..bt_stride];
        row.fill(-1);
        for (slot, &id) in row.iter_mut().zip(&s.blocks) {
            *slot = id as i32;
        }
        max_q_len = max_q_len.max(s.len);
    }
    for (r, &row) in selected.iter().enumerate() {
        out[l.select + r] = row as i32;
    }
    let (mut r, scratch) = (selected.len(), pad.map_or(0, |p| p.scratch_page as i32));
    for p in 0..padding {
        let b = real_seqs + p;
        for i in 0..pad_q {
            out[l.positions + t] = i as i32;
            out[l.token_seq + t] = b as i32;
            t += 1;
        }
        for row in t - pad_rows..t {
            out[l.select + r] = row as i32;
            r += 1;
        }
        q_start += pad_q as i32;
        out[l.q_starts + b + 1] = q_start;
        out[l.seqlens + b] = pad_q as i32;
        out[l.block_table + b * bt_stride..][..bt_stride].fill(scratch);
        max_q_len = max_q_len.max(pad_q);
    }
    StepMeta {
        layout: l,
        max_q_len,
        real_tokens,
        real_rows: selected.len(),
    }
}

/// The device side of a step's metadata: views of the metadata block.
pub(super) struct MetaViews {
    pub ids: DeviceBuffer<i32>,
    pub select: Option<DeviceBuffer<i32>>,
    pub mla: MlaBatch,
}

impl MetaViews {
    pub fn new(block: &DeviceBuffer<i32>, m: &StepMeta) -> Result<Self> {
        let l = &m.layout;
        let v = |at: usize, len: usize| block.view(at, len);
        Ok(MetaViews {
            ids: v(l.ids, l.tokens)?,
            select: if l.rows == 0 {
                None
            } else {
                Some(v(l.select, l.rows)?)
            },
            mla: MlaBatch {
                block_table: v(l.block_table, l.seqs * l.bt_stride)?,
                bt_stride: l.bt_stride,
                seqlens_k: v(l.seqlens, l.seqs)?,
                q_starts: v(l.q_starts, l.seqs + 1)?,
                positions: v(l.positions, l.tokens)?,
                token_seq: v(l.token_seq, l.tokens)?,
                batch: l.seqs,
                total_q: l.tokens,
                max_q_len: m.max_q_len,
            },
        })
    }
}

// ------------------------------------------------------------------------------------------
// Quantized activations and the MLA split-KV workspace
// ------------------------------------------------------------------------------------------

/// Quantized activations for FP8 Linears: codes `[m][k]` and SA scales `[k / 128][m_pad]`,
/// zeroed when allocated. The SA layout's padding rows (m..m_pad) may then hold finite scales
/// of an earlier act_quant: the GEMMs read them only for rows they never store.
#[derive(Default)]
pub(super) struct QuantSpace {
    pub q: Option<DeviceBuffer<u8>>,
    pub scales: Option<DeviceBuffer<f32>>,
    /// Largest K of any FP8 weight.
    pub max_k: usize,
}

fn quant_lens(m: usize, k: usize) -> (usize, usize) {
    (m * k, k.div_ceil(QUANT_BLOCK) * act_scale_m_pad(m))
}

impl QuantSpace {
    /// Views for `m` rows of K `k`.
    pub fn view(&self, m: usize, k: usize) -> Result<QuantizedActivations> {
        let (nq, ns) = quant_lens(m, k);
        let (Some(q), Some(scales)) = (&self.q, &self.scales) else {
            return Err(super::missing("the quantized-activation buffers"));
        };
        Ok(QuantizedActivations {
            q: q.view(0, nq)?,
            scales: scales.view(0, ns)?,
            m,
            k,
            m_pad: act_scale_m_pad(m),
        })
    }

    /// Room for `m` rows of the largest K.
    pub fn reserve(&mut self, dev: &Device, m: usize) -> Result<()> {
        self.reserve_for(dev, m, self.max_k)
    }

    /// Room for `m` rows of K `k` (grown, never shrunk).
    pub fn reserve_for(&mut self, dev: &Device, m: usize, k: usize) -> Result<()> {
        let (nq, ns) = quant_lens(m, k);
        grow(dev, &mut self.q, nq, "the quantized activations")?;
        if self.scales.as_ref().is_none_or(|s| s.len() < ns) {
            grow(dev, &mut self.scales, ns, "the activation scales")?;
            if let Some(s) = self.scales.as_mut() {
                dev.memset(s, 0)?;
            }
        }
        Ok(())
    }
}

/// The MLA fast path's scratch, one set of buffers that every split plan takes views of.
#[derive(Default)]
pub(super) struct MlaSpace {
    sched: Option<DeviceBuffer<i32>>,
    splits: Option<DeviceBuffer<i32>>,
    o_accum: Option<DeviceBuffer<f32>>,
    lse_accum: Option<DeviceBuffer<f32>>,
}

impl MlaSpace {
    /// A workspace of `parts` splits for `batch` sequences of up to `max_q_len` queries of
    /// `heads` heads, as views of the shared buffers (grown first if they are too small, which
    /// [`Core::reserve`] makes sure they are not during a step).
    pub fn workspace(
        &mut self,
        dev: &Device,
        parts: usize,
        (batch, heads, max_q_len): (usize, usize, usize),
    ) -> Result<MlaWorkspace> {
        let parts = parts.max(1);
        let [s, sp, o, l] = MlaWorkspace::lens(batch, heads, max_q_len, parts);
        self.reserve(dev, [s, sp, o, l])?;
        let view = |b: &Option<DeviceBuffer<f32>>, len| match b {
            Some(b) => b.view(0, len),
            None => Err(crate::cuda::CudaError::OutOfBounds(
                "the MLA workspace was not made".into(),
            )),
        };
        let (Some(sched), Some(splits)) = (&self.sched, &self.splits) else {
            return Err(super::missing("the MLA workspace"));
        };
        Ok(MlaWorkspace {
            sched: sched.view(0, s)?,
            splits: splits.view(0, sp)?,
            o_accum: view(&self.o_accum, o)?,
            lse_accum: view(&self.lse_accum, l)?,
            parts,
            batch,
            heads,
            max_q_len,
        })
    }

    pub fn reserve(&mut self, dev: &Device, [s, sp, o, l]: [usize; 4]) -> Result<()> {
        for (buf, len, what) in [
            (&mut self.sched, s, "the MLA schedule"),
            (&mut self.splits, sp, "the MLA split offsets"),
        ] {
            if buf.as_ref().is_none_or(|b| b.len() < len) {
                grow(dev, buf, len, what)?;
                if let Some(b) = buf.as_mut() {
                    dev.memset(b, 0)?;
                }
            }
        }
        grow(dev, &mut self.o_accum, o, "the MLA partial outputs")?;
        grow(dev, &mut self.lse_accum, l, "the MLA partial lse")
    }
}

/// The largest split-KV workspace any step within the limits needs: per query length q up
/// to `tokens`, at most `min(seqs, tokens - q + 1)` sequences (each brings a token, one
/// brings q) with the plan [`mla_plan_parts`] makes for q.
pub(super) fn mla_lens_bound(
    sm_count: usize,
    heads: usize,
    tokens: usize,
    seqs: usize,
) -> [usize; 4] {
    let mut most = [0usize; 4];
    for q in 1..=tokens.max(1) {
        let batch = seqs.min(tokens + 1 - q).max(1);
        let parts = mla_plan_parts(sm_count, heads, q);
        let lens = MlaWorkspace::lens(batch, heads, q, parts);
        for (m, l) in most.iter_mut().zip(lens) {
            *m = (*m).max(l);
        }
    }
    most
}

// ------------------------------------------------------------------------------------------
// Reservation
// ------------------------------------------------------------------------------------------

/// What one step needs from the workspaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct StepSizes {
    pub tokens: usize,
    pub rows: usize,
    pub seqs: usize,
    pub max_q_len: usize,
    pub meta_len: usize,
}

/// Grows `slot` to hold `len` elements of `storage`.
fn reserve_slot(
    dev: &Device,
    slot: &mut Slot,
    storage: Storage,
    len: usize,
    name: &str,
) -> Result<()> {
    match storage {
        Storage::Activation => grow(dev, &mut slot.bf, len, name),
        Storage::F32 => grow(dev, &mut slot.f, len, name),
    }
}

impl Core {
    /// Makes every workspace hold a step of `sizes` running `graph`: nothing happens when the
    /// step is within the limits the backend was built for (or grew to).
    pub(super) fn reserve(
        &self,
        state: &mut State,
        graph: &Graph,
        plan: &Plan,
        sizes: StepSizes,
    ) -> Result<()> {
        let l = &self.limits;
        if sizes.tokens > l.max_step_tokens || sizes.seqs > l.max_seqs {
            debug_log(|| {
                format!(
                    "a step of {} tokens over {} sequences exceeds the sizes made at load \
                     ({} tokens, {} sequences): the workspaces it needs grow to fit it",
                    sizes.tokens, sizes.seqs, l.max_step_tokens, l.max_seqs
                )
            });
        }
        self.reserve_slots(state, graph, plan, sizes.tokens, sizes.rows)?;
        self.reserve_rest(state, sizes)
    }

    /// Every workspace but the slots.
    pub(super) fn reserve_rest(&self, state: &mut State, sizes: StepSizes) -> Result<()> {
        let dev = &self.dev;
        let c = &self.cfg;
        let (heads, width) = (c.num_attention_heads, c.kv_lora_rank + c.qk_rope_head_dim);
        let t = sizes.tokens;
        grow(
            dev,
            &mut state.q_attn,
            t * heads * width,
            "the latent queries",
        )?;
        grow(
            dev,
            &mut state.o_lat,
            t * heads * c.kv_lora_rank,
            "the latent outputs",
        )?;
        grow(dev, &mut state.lse, t * heads, "the attention lse")?;
        state.scratch_quant.reserve(dev, t)?;
        let parts = mla_plan_parts(dev.info().sm_count, heads, sizes.max_q_len);
        state.mla_space.reserve(
            dev,
            MlaWorkspace::lens(sizes.seqs, heads, sizes.max_q_len, parts),
        )?;
        self.reserve_moe(&mut state.moe, t)?;
        grow(dev, &mut state.sample_rows, sizes.rows, "the draws")?;
        grow(dev, &mut state.sampled, sizes.rows, "the drawn tokens")?;
        grow(
            dev,
            &mut state.meta,
            sizes.meta_len,
            "the step metadata block",
        )
    }

    /// Grows the slots `graph` uses to hold `tokens` (or `rows` selected) rows.
    pub(super) fn reserve_slots(
        &self,
        state: &mut State,
        graph: &Graph,
        plan: &Plan,
        tokens: usize,
        rows: usize,
    ) -> Result<()> {
        state
            .slots
            .resize_with(plan.slots.max(state.slots.len()), Slot::default);
        for (i, desc) in graph.buffers.iter().enumerate() {
            let Some(&s) = plan.slot_of.get(i).filter(|&&s| s < plan.slots) else {
                continue; // a buffer no node touches
            };
            let n = match desc.rows {
                Rows::Tokens => tokens,
                Rows::Selected => rows,
            } * desc.width;
            reserve_slot(&self.dev, &mut state.slots[s], desc.storage, n, &desc.name)?;
        }
        // The act_quant of every FP8 Linear's input, kept in its input's slot.
        for op in &graph.nodes {
            if let Op::Linear { x, weight, .. } = *op {
                if matches!(self.weights.get(&weight), Some(GpuWeight::Fp8(_))) {
                    let desc = graph.desc(x);
                    let m = match desc.rows {
                        Rows::Tokens => tokens,
                        Rows::Selected => rows,
                    };
                    state
                        .quant
                        .reserve(&self.dev, plan.slot(x), m, desc.width)?;
                }
            }
        }
        Ok(())
    }
}

/// The bf16 input rows of `data` (`[rows][width]` f32) followed by zero rows up to
/// `padded_rows` (padding sequences read finite inputs).
pub(super) fn padded_bf16(data: &[f32], width: usize, padded_rows: usize, out: &mut Vec<bf16>) {
    out.clear();
    out.extend(data.iter().map(|&x| bf16::from_f32(x)));
    out.resize(padded_rows * width, bf16::ZERO);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::Segment;

    fn seg(blocks: Vec<u32>, start_pos: usize, len: usize, logit_rows: usize) -> Segment {
        Segment {
            blocks,
            start_pos,
            len,
            logit_rows,
        }
    }

    #[test]
    fn layout_packs_aligned_parts_in_fill_order() {
        let l = MetaLayout::new(5, 2, 2, 3);
        assert_eq!(
            (
                l.ids,
                l.positions,
                l.token_seq,
                l.select,
                l.q_starts,
                l.seqlens
            ),
            (0, 16, 32, 48, 64, 80)
        );
        assert_eq!((l.block_table, l.len), (96, 96 + 6));
        // The same sizes always give the same offsets (a graph bucket's addresses).
        assert_eq!(l, MetaLayout::new(5, 2, 2, 3));
    }

    #[test]
    fn eager_metadata_is_the_batch_as_is() {
        let batch = Batch {
            tokens: vec![7, 8, 9, 4],
            segments: vec![seg(vec![3, 1], 70, 3, 1), seg(vec![0], 5, 1, 1)],
            page_copies: Vec::new(),
        };
        let mut v = Vec::new();
        let m = fill_meta(&batch, None, &mut v);
        let l = m.layout;
        assert_eq!((l.tokens, l.rows, l.seqs, l.bt_stride), (4, 2, 2, 2));
        assert_eq!((m.max_q_len, m.real_tokens, m.real_rows), (3, 4, 2));
        assert_eq!(&v[l.ids..l.ids + 4], &[7, 8, 9, 4]);
        assert_eq!(&v[l.positions..l.positions + 4], &[70, 71, 72, 5]);
        assert_eq!(&v[l.token_seq..l.token_seq + 4], &[0, 0, 0, 1]);
        assert_eq!(&v[l.select..l.select + 2], &[2, 3]);
        assert_eq!(&v[l.q_starts..l.q_starts + 3], &[0, 3, 4]);
        assert_eq!(&v[l.seqlens..l.seqlens + 2], &[73, 6]);
        assert_eq!(&v[l.block_table..l.len], &[3, 1, 0, -1]);
    }

    /// Padding sequences bring the real ones' token count at positions 0.. in the scratch page
    /// only; the real sequences come first, so their rows are a prefix of every output.
    #[test]
    fn padded_metadata_sends_padding_to_the_scratch_page() {
        let batch = Batch {
            tokens: vec![5, 6, 7, 8],
            segments: vec![seg(vec![2], 10, 2, 2), seg(vec![4, 9], 64, 2, 2)],
            page_copies: Vec::new(),
        };
        let pad = Padding {
            seqs: 4,
            tokens_per_seq: 2,
            rows_per_seq: 2,
            scratch_page: 99,
            bt_stride: 3,
        };
        let mut v = Vec::new();
        let m = fill_meta(&batch, Some(pad), &mut v);
        let l = m.layout;
        assert_eq!(l, MetaLayout::new(8, 8, 4, 3));
        assert_eq!((m.real_tokens, m.real_rows, m.max_q_len), (4, 4, 2));
        assert_eq!(&v[l.ids..l.ids + 8], &[5, 6, 7, 8, 0, 0, 0, 0]);
        assert_eq!(
            &v[l.positions..l.positions + 8],
            &[10, 11, 64, 65, 0, 1, 0, 1]
        );
        assert_eq!(&v[l.token_seq..l.token_seq + 8], &[0, 0, 1, 1, 2, 2, 3, 3]);
        assert_eq!(&v[l.select..l.select + 8], &[0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(&v[l.q_starts..l.q_starts + 5], &[0, 2, 4, 6, 8]);
        assert_eq!(&v[l.seqlens..l.seqlens + 4], &[12, 66, 2, 2]);
        assert_eq!(
            &v[l.block_table..l.len],
            &[2, -1, -1, 4, 9, -1, 99, 99, 99, 99, 99, 99]
        );
        // Decode rows: one per sequence, the last token's.
        let batch = Batch {
            tokens: vec![5],
            segments: vec![seg(vec![2], 10, 1, 1)],
            page_copies: Vec::new(),
        };
        let pad = Padding {
            seqs: 2,
            tokens_per_seq: 1,
            rows_per_seq: 1,
            scratch_page: 7,
            bt_stride: 2,
        };
        let m = fill_meta(&batch, Some(pad), &mut v);
        let l = m.layout;
        assert_eq!(&v[l.select..l.select + 2], &[0, 1]);
        assert_eq!(&v[l.block_table..l.len], &[2, -1, 7, 7]);
    }

    #[test]
    fn mla_bound_covers_every_step_within_the_limits() {
        let (sm, heads, tokens, seqs) = (132, 128, 64, 16);
        let bound = mla_lens_bound(sm, heads, tokens, seqs);
        for q in 1..=tokens {
            for batch in 1..=seqs.min(tokens + 1 - q) {
                let lens = MlaWorkspace::lens(batch, heads, q, mla_plan_parts(sm, heads, q));
                for (l, b) in lens.iter().zip(&bound) {
                    assert!(l <= b, "q {q} batch {batch}: {lens:?} > {bound:?}");
                }
            }
        }
    }
}
