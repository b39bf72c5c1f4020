//! The CPU backend: weights stay in their mapped, stored dtype; activations are f32 `Vec`s;
//! parallelism is rayon's global pool (size it with `RAYON_NUM_THREADS` or `--threads`).
//!
//! The linear and attention kernels are hand-written: batch-1 decode must stream bf16 weights
//! against one token at the memory bandwidth, with prefetch tuned per CPU family, and batches
//! must reach AMX tiles and `vdpbf16ps`, none of which a maintained GEMM crate does; the `gemm`
//! crate still serves large f32 batches. Every kernel has a plain twin and a parity test.

pub mod attention;
pub mod linear;
pub mod ops;
#[cfg(target_arch = "x86_64")]
mod simd;

use super::{AttnSeq, AttnShape, Backend, KvDtype};
use crate::{
    weights::{Elems, HostTensor},
    Result,
};

/// Runs `f` on rayon's pool. Every parallel op called from outside the pool pays a cross-thread
/// hand-off and wake-up (tens of µs); a step makes dozens of them, so callers enter the pool once
/// per step and the ops inside run there directly. Inside the pool this is a plain call.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let mut out = None;
    // The step's span (a traced request's) continues on the pool thread.
    let span = tracing::Span::current();
    rayon::scope(|s| s.spawn(|_| out = Some(span.in_scope(f))));
    // `scope` returns only after the spawned job ran, and the job always sets `out`.
    out.expect("rayon scope ran the job")
}

/// A weight on the CPU: the tensor in its stored dtype, used in place from the memory map, and
/// for matrices only linears read ([`Backend::upload_matrix`]) on CPUs with AMX a copy in AMX
/// tile order, which every linear of it reads instead (see `linear/tiles.rs`). Derefs to the
/// tensor.
///
/// A quantized weight (stored so, or quantized at load) lives in [`linear::QTiles`] alone: the
/// tensor it came from keeps only its mapping, released from this process's resident memory.
#[derive(Debug)]
pub struct CpuWeight {
    tensor: HostTensor,
    tiles: Option<linear::Tiles>,
    quant: Option<linear::QTiles>,
}

impl CpuWeight {
    /// The copy in AMX tile order, where one was made.
    #[must_use]
    pub fn tiles(&self) -> Option<&linear::Tiles> {
        self.tiles.as_ref()
    }

    /// The quantized blocks in kernel order, for a quantized weight.
    #[must_use]
    pub fn quant(&self) -> Option<&linear::QTiles> {
        self.quant.as_ref()
    }

    /// Bytes this weight keeps resident for the linears (quantized blocks, AMX tiles, or the
    /// stored tensor).
    #[must_use]
    pub fn resident_bytes(&self) -> usize {
        match (&self.quant, &self.tiles) {
            (Some(q), _) => q.bytes(),
            (None, Some(t)) => t.bytes(),
            (None, None) => self.tensor.bytes().len(),
        }
    }
}

impl std::ops::Deref for CpuWeight {
    type Target = HostTensor;
    fn deref(&self) -> &HostTensor {
        &self.tensor
    }
}

/// One layer's keys or values on the CPU, in the cache's dtype.
#[derive(Debug)]
pub enum CpuKv {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
}

/// The error for a key pool and a value pool of different dtypes (the cache allocates both
/// alike, so only a bug gets here).
fn mixed_kv() -> crate::ModelError {
    crate::ModelError::Input("the KV cache's keys and values differ in dtype (internal)".into())
}

/// An empty tile set, to fill unused slots of a pass.
static NO_TILES: linear::Tiles = linear::Tiles::EMPTY;

/// Runs `parts` (weight, output) through the linears without allocating: weights with tiles
/// through [`linear::linear_tiles`], quantized ones through [`linear::quant::linear_many`]
/// (which quantizes the activations once for all of them), the others through
/// [`linear::linear_many`], up to [`linear::MAX_PARTS`] per pass. Each part's result is the
/// same whichever pass it shares.
pub(crate) fn linear_parts<'a>(
    x: &[f32],
    rows: usize,
    parts: impl Iterator<Item = Result<(&'a CpuWeight, &'a mut [f32])>>,
) -> Result<()> {
    let mut pass: [(Elems<'a>, usize, &'a mut [f32]); linear::MAX_PARTS] =
        std::array::from_fn(|_| (Elems::F32(&[]), 0, <&mut [f32]>::default()));
    let mut tiled: [(&'a linear::Tiles, &'a mut [f32]); linear::MAX_PARTS] =
        std::array::from_fn(|_| (&NO_TILES, <&mut [f32]>::default()));
    let mut quant: [(&'a linear::QTiles, &'a mut [f32]); linear::MAX_PARTS] =
        std::array::from_fn(|_| (&*EMPTY_QUANT, <&mut [f32]>::default()));
    let (mut n, mut nt, mut nq) = (0, 0, 0);
    for part in parts {
        let (w, y) = part?;
        if let Some(q) = w.quant() {
            if nq > 0 && quant[0].0.inp() != q.inp() {
                linear::quant::linear_many(x, rows, &mut quant[..nq]);
                nq = 0;
            }
            quant[nq] = (q, y);
            nq += 1;
            if nq == linear::MAX_PARTS {
                linear::quant::linear_many(x, rows, &mut quant[..nq]);
                nq = 0;
            }
        } else if let Some(t) = w.tiles() {
            tiled[nt] = (t, y);
            nt += 1;
            if nt == linear::MAX_PARTS {
                linear::linear_tiles(x, rows, &mut tiled[..nt]);
                nt = 0;
            }
        } else {
            pass[n] = (w.elems(), w.shape()[0], y);
            n += 1;
            if n == linear::MAX_PARTS {
                linear::linear_many(x, rows, &mut pass[..n]);
                n = 0;
            }
        }
    }
    if nq > 0 {
        linear::quant::linear_many(x, rows, &mut quant[..nq]);
    }
    if nt > 0 {
        linear::linear_tiles(x, rows, &mut tiled[..nt]);
    }
    if n > 0 {
        linear::linear_many(x, rows, &mut pass[..n]);
    }
    Ok(())
}

/// An empty quantized weight, to fill unused slots of a pass.
static EMPTY_QUANT: std::sync::LazyLock<linear::QTiles> =
    std::sync::LazyLock::new(linear::QTiles::empty_placeholder);

/// The CPU backend. Stateless: every op runs on rayon's global pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Weight = CpuWeight;
    type KvBuf = CpuKv;

    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn concurrent_ops(&self) -> bool {
        rayon::current_num_threads() > 1
    }

    fn upload(&self, t: HostTensor) -> Result<CpuWeight> {
        // Weights are used in place from the memory map; touching every page now makes the load
        // (and its progress bar) do the I/O instead of the first request.
        t.prefault();
        // A quantized matrix read by row and by linears (a GGUF file's quantized embedding tied
        // to the LM head, a quantized router): the linears need the packed blocks, the float
        // kernels have no quantized path. Norms and row lookups widen blocks themselves.
        let quant = match (t.dtype().quant(), t.shape()) {
            (Some(_), &[out, _]) => linear::QTiles::from_blocks(t.elems(), out),
            _ => None,
        };
        Ok(CpuWeight {
            tensor: t,
            tiles: None,
            quant,
        })
    }

    fn upload_matrix(
        &self,
        t: HostTensor,
        quantize: Option<crate::weights::QuantFormat>,
    ) -> Result<CpuWeight> {
        let &[out, inp] = t.shape() else {
            return Err(crate::ModelError::Input(format!(
                "a linear's weight must be [out, in], not {:?}",
                t.shape()
            )));
        };
        if quantize.is_some() || t.dtype().quant().is_some() {
            let packed = match quantize {
                Some(f) => linear::QTiles::quantize(t.elems(), out, f),
                None => linear::QTiles::from_blocks(t.elems(), out),
            };
            let Some(q) = packed else {
                return Err(crate::ModelError::Input(format!(
                    "cannot quantize a [{out}, {inp}] {} weight (the input width must be a \
                     multiple of {})",
                    t.dtype(),
                    crate::weights::quant::BLOCK
                )));
            };
            // Only the packed blocks are read from now on.
            t.release_pages();
            return Ok(CpuWeight {
                tensor: t,
                tiles: None,
                quant: Some(q),
            });
        }
        let Some(tiles) = linear::tiles_for(t.elems(), out) else {
            return self.upload(t);
        };
        // Only the tiles are read from now on; the mapped pages go back to the page cache
        // instead of staying resident twice.
        t.release_pages();
        Ok(CpuWeight {
            tensor: t,
            tiles: Some(tiles),
            quant: None,
        })
    }

    fn alloc(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn alloc_kv(&self, len: usize, dtype: KvDtype) -> Result<CpuKv> {
        Ok(match dtype {
            KvDtype::F32 => CpuKv::F32(vec![0.0; len]),
            // Zeroed as u16 so that the allocator hands out untouched zero pages, as it does
            // for the f32 pool, rather than writing every element of a large cache up front.
            KvDtype::Bf16 => CpuKv::Bf16(bytemuck::cast_vec(vec![0u16; len])),
        })
    }

    fn ensure_len(&self, buf: &mut Vec<f32>, len: usize) -> Result<()> {
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        Ok(())
    }

    fn write(&self, dst: &mut Vec<f32>, src: &[f32]) -> Result<()> {
        dst[..src.len()].copy_from_slice(src);
        Ok(())
    }

    fn to_host(&self, src: &Vec<f32>, dst: &mut [f32]) -> Result<()> {
        dst.copy_from_slice(&src[..dst.len()]);
        Ok(())
    }

    fn embedding(&self, table: &CpuWeight, ids: &[u32], out: &mut Vec<f32>) -> Result<()> {
        let width = table.shape()[1];
        ops::embedding(table.elems(), width, ids, &mut out[..ids.len() * width]);
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &Vec<f32>,
        rows: usize,
        w: &CpuWeight,
        eps: f32,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let width = w.shape()[0];
        ops::rms_norm(&x[..rows * width], w.elems(), eps, width, out);
        Ok(())
    }

    fn linear(&self, x: &Vec<f32>, rows: usize, w: &CpuWeight, out: &mut Vec<f32>) -> Result<()> {
        match (w.quant(), w.tiles()) {
            (Some(q), _) => linear::quant::linear_many(x, rows, &mut [(q, out.as_mut_slice())]),
            (None, Some(t)) => linear::linear_tiles(x, rows, &mut [(t, out.as_mut_slice())]),
            (None, None) => linear::linear(x, rows, w.elems(), w.shape()[0], out),
        }
        Ok(())
    }

    fn linear_many(
        &self,
        x: &Vec<f32>,
        rows: usize,
        parts: &mut [(&CpuWeight, &mut Vec<f32>)],
    ) -> Result<()> {
        linear_parts(
            x,
            rows,
            parts.iter_mut().map(|(w, y)| Ok((&**w, y.as_mut_slice()))),
        )
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        width: usize,
        head_dim: usize,
        positions: &[u32],
        cos: &CpuWeight,
        sin: &CpuWeight,
    ) -> Result<()> {
        let (c, s) = (cos.elems(), sin.elems());
        match (c, s) {
            (crate::weights::Elems::F32(c), crate::weights::Elems::F32(s)) => {
                ops::rope(
                    &mut x[..positions.len() * width],
                    width,
                    head_dim,
                    positions,
                    c,
                    s,
                );
                Ok(())
            }
            _ => Err(crate::ModelError::Input("RoPE tables must be f32".into())),
        }
    }

    fn kv_write(
        &self,
        cache: &mut CpuKv,
        src: &Vec<f32>,
        seq: &AttnSeq<'_>,
        kv_dim: usize,
        block_size: usize,
    ) -> Result<()> {
        let (rows, pos0, blocks) = (seq.n_q, seq.pos0, seq.blocks);
        let src = &src[seq.q_row0 * kv_dim..];
        match cache {
            CpuKv::F32(c) => attention::kv_write(c, src, rows, kv_dim, pos0, blocks, block_size),
            CpuKv::Bf16(c) => attention::kv_write(c, src, rows, kv_dim, pos0, blocks, block_size),
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        k_cache: &CpuKv,
        v_cache: &CpuKv,
        seqs: &[AttnSeq<'_>],
        shape: &AttnShape,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        match (k_cache, v_cache) {
            (CpuKv::F32(k), CpuKv::F32(v)) => attention::attention(q, k, v, seqs, shape, out),
            (CpuKv::Bf16(k), CpuKv::Bf16(v)) => attention::attention(q, k, v, seqs, shape, out),
            _ => return Err(mixed_kv()),
        }
        Ok(())
    }

    fn silu_mul(&self, gate: &mut Vec<f32>, up: &Vec<f32>, len: usize) -> Result<()> {
        ops::silu_mul(&mut gate[..len], &up[..len]);
        Ok(())
    }

    fn add_assign(&self, x: &mut Vec<f32>, y: &Vec<f32>, len: usize) -> Result<()> {
        ops::add_assign(&mut x[..len], &y[..len]);
        Ok(())
    }

    fn route(
        &self,
        logits: &Vec<f32>,
        rows: usize,
        n_experts: usize,
        k: usize,
        plan: &mut crate::moe::RoutePlan,
    ) -> Result<()> {
        plan.route_into(&logits[..rows * n_experts], rows, n_experts, k);
        Ok(())
    }
}
