//! The device contract: one `Backend` trait that the layer loop and the experts are written
//! against. The CPU backend is always built; a CUDA backend (issue: CUDA backend) implements the
//! same trait behind the `cuda` feature, and is the only place `cfg(feature = "cuda")` may appear.
//!
//! Ops work on prefixes of buffers (`rows` × width), so callers size scratch buffers once for the
//! largest step and reuse them: nothing in the step loop allocates.

pub mod any;
pub mod cpu;
pub mod cuda;

use crate::{weights::HostTensor, Result};

/// A compute device. Activations are `Buf`s of f32; weights are `Weight`s in their stored dtype.
///
/// Device-to-host copies go through [`Backend::to_host`] alone, so they are easy to find.
pub trait Backend: Send + Sync + 'static {
    /// Device-resident f32 activations.
    type Buf: Send + Sync;
    /// A device-resident weight tensor in its stored dtype (shape `[out, in]` for matrices).
    type Weight: Send + Sync;
    /// One layer's keys or values in the KV cache, in the cache's [`KvDtype`].
    type KvBuf: Send + Sync;

    /// A human-readable description for logs ("cpu (2 threads)").
    fn describe(&self) -> String;
    /// Whether independent ops (one expert's FFN and another's) may run at once from several
    /// host threads. On the CPU each op is itself a fork-join over the same pool, and running
    /// whole experts side by side saves a join, and a sleeping thread's wake-up, per op.
    fn concurrent_ops(&self) -> bool {
        false
    }
    /// Makes a host tensor resident on the device (and pays its I/O now).
    fn upload(&self, t: HostTensor) -> Result<Self::Weight>;
    /// [`Backend::upload`] for a `[out, in]` matrix that is only ever a linear's weight (the
    /// experts', the attention projections, an untied LM head): a backend may keep it in
    /// another layout that its linears read faster (the CPU's AMX tile order). With
    /// `quantize`, a float `t` is quantized to that format first; `t` may also be stored
    /// quantized. A backend without quantized kernels refuses both.
    fn upload_matrix(
        &self,
        t: HostTensor,
        quantize: Option<crate::weights::QuantFormat>,
    ) -> Result<Self::Weight> {
        if quantize.is_some() || t.dtype().quant().is_some() {
            return Err(crate::ModelError::Unsupported {
                device: self.describe(),
                what: "quantized weights".into(),
            });
        }
        self.upload(t)
    }
    /// A zeroed buffer of `len` f32.
    fn alloc(&self, len: usize) -> Result<Self::Buf>;
    /// Grows `buf` to at least `len` elements (contents may be lost).
    fn ensure_len(&self, buf: &mut Self::Buf, len: usize) -> Result<()>;
    /// A zeroed KV-cache pool of `len` elements of `dtype`; an error where this backend has no
    /// kernels for that dtype.
    fn alloc_kv(&self, len: usize, dtype: KvDtype) -> Result<Self::KvBuf>;
    /// Copies `src` into the start of `dst`.
    fn write(&self, dst: &mut Self::Buf, src: &[f32]) -> Result<()>;
    /// Copies the first `dst.len()` elements of `src` to the host: the one way off the device.
    fn to_host(&self, src: &Self::Buf, dst: &mut [f32]) -> Result<()>;

    /// `out[i] = table[ids[i]]` widened to f32.
    fn embedding(&self, table: &Self::Weight, ids: &[u32], out: &mut Self::Buf) -> Result<()>;
    /// Row-wise RMSNorm of `rows` rows, weight `w` `[width]`.
    fn rms_norm(
        &self,
        x: &Self::Buf,
        rows: usize,
        w: &Self::Weight,
        eps: f32,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// `out = x · wᵀ` for `rows` rows; `w` is `[out, in]`.
    fn linear(
        &self,
        x: &Self::Buf,
        rows: usize,
        w: &Self::Weight,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// `out_i = x · w_iᵀ` for several weights that read the same input (q/k/v, an expert's
    /// w1/w3). Backends that fork and join per op run them as one pass; the default runs them
    /// in turn.
    fn linear_many(
        &self,
        x: &Self::Buf,
        rows: usize,
        parts: &mut [(&Self::Weight, &mut Self::Buf)],
    ) -> Result<()> {
        for (w, out) in parts.iter_mut() {
            self.linear(x, rows, w, out)?;
        }
        Ok(())
    }
    /// Rotates the heads of `positions.len()` rows of `width` in place (HF rotate-half layout).
    fn rope(
        &self,
        x: &mut Self::Buf,
        width: usize,
        head_dim: usize,
        positions: &[u32],
        cos: &Self::Weight,
        sin: &Self::Weight,
    ) -> Result<()>;
    /// Writes `seq`'s rows of `src` (`q_row0..q_row0 + n_q`, each `kv_dim` wide) into a paged
    /// cache at its positions `pos0..pos0 + n_q` through its block table, rounded to the
    /// cache's dtype.
    fn kv_write(
        &self,
        cache: &mut Self::KvBuf,
        src: &Self::Buf,
        seq: &AttnSeq<'_>,
        kv_dim: usize,
        block_size: usize,
    ) -> Result<()>;
    /// Causal GQA attention for the query rows of every sequence in `seqs`.
    fn attention(
        &self,
        q: &Self::Buf,
        k_cache: &Self::KvBuf,
        v_cache: &Self::KvBuf,
        seqs: &[AttnSeq<'_>],
        shape: &AttnShape,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// `gate[..len] = silu(gate) ⊙ up`.
    fn silu_mul(&self, gate: &mut Self::Buf, up: &Self::Buf, len: usize) -> Result<()>;
    /// `x[..len] += y`.
    fn add_assign(&self, x: &mut Self::Buf, y: &Self::Buf, len: usize) -> Result<()>;
    /// Routes `rows` tokens from their router logits `[rows, n_experts]`: softmax, top-`k`,
    /// renormalised (Mixtral), into `plan` on the host, where the expert scatter needs it.
    fn route(
        &self,
        logits: &Self::Buf,
        rows: usize,
        n_experts: usize,
        k: usize,
        plan: &mut crate::moe::RoutePlan,
    ) -> Result<()>;
}

/// One sequence's share of an attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnSeq<'a> {
    /// First query row of this sequence in the step's batch.
    pub q_row0: usize,
    /// Number of query rows (new tokens) of this sequence.
    pub n_q: usize,
    /// Position of the first query row; keys `0..pos0 + n_q` are in the cache.
    pub pos0: usize,
    /// The sequence's KV block table.
    pub blocks: &'a [u32],
}

/// Attention geometry shared by all sequences of a call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Keys a query may see, itself included (`None`: all earlier positions).
    pub window: Option<usize>,
}

/// The element type of the KV cache, from `--kv-cache-dtype`.
///
/// f32 keeps attention within the reference's tolerances. bf16 halves the cache: twice the
/// positions in the same memory, and half the bytes that decode attention reads per key, which
/// is what it waits on at long contexts. Keys and values are rounded to bf16 once, when
/// written; attention widens them back and computes in f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvDtype {
    #[default]
    F32,
    Bf16,
}

impl KvDtype {
    /// Bytes per element.
    #[must_use]
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 => 2,
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            _ => Err(format!("unknown KV-cache dtype {s:?} (f32 or bf16)")),
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a process runs its math, parsed from `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device {s:?} (cpu, cuda or cuda:N)")),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The error for a CUDA device in a build without the `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub(crate) fn no_cuda_build(device: Device) -> crate::ModelError {
    crate::ModelError::Device(
        device.to_string(),
        "this build has no CUDA backend (build with --features cuda)".into(),
    )
}
