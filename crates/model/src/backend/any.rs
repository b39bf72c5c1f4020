//! The backend chosen at run time from `--device`. The servers hold one concrete model type
//! whatever the device; each op is one `match` away from the real backend, which costs nothing
//! next to the op itself. Without the `cuda` feature the enums have one variant and every match
//! is irrefutable.

use super::{
    cpu::{Cpu, CpuKv},
    AttnSeq, AttnShape, Backend, Device, KvDtype,
};
use crate::{moe::RoutePlan, weights::HostTensor, Result};

#[cfg(feature = "cuda")]
use super::cuda::{Cuda, CudaWeight};

/// A backend picked at run time.
#[derive(Clone)]
pub enum AnyBackend {
    Cpu(Cpu),
    #[cfg(feature = "cuda")]
    Cuda(Cuda),
}

/// Activations on the device of an [`AnyBackend`].
pub enum AnyBuf {
    Cpu(Vec<f32>),
    #[cfg(feature = "cuda")]
    Cuda(cudarc::driver::CudaSlice<f32>),
}

/// A KV-cache pool on the device of an [`AnyBackend`].
pub enum AnyKv {
    Cpu(CpuKv),
    #[cfg(feature = "cuda")]
    Cuda(cudarc::driver::CudaSlice<f32>),
}

/// A weight on the device of an [`AnyBackend`].
pub enum AnyWeight {
    Cpu(crate::backend::cpu::CpuWeight),
    #[cfg(feature = "cuda")]
    Cuda(CudaWeight),
}

impl AnyBackend {
    /// Opens `device` (checking that this build and machine can drive it).
    pub fn new(device: Device) -> Result<Self> {
        match device {
            Device::Cpu => Ok(Self::Cpu(Cpu)),
            // `Cuda::new` probes the libraries and the device before creating a context.
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                if super::cpu::linear::deterministic() {
                    // cuBLAS picks its GEMM algorithm (and split of the sums) by shape.
                    tracing::warn!(
                        "--deterministic covers the CPU kernels: on CUDA a token's last bits \
                         may still depend on its batch"
                    );
                }
                Ok(Self::Cuda(Cuda::new(n)?))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(super::no_cuda_build(device)),
        }
    }
}

#[cfg(feature = "cuda")]
fn mismatch() -> crate::ModelError {
    crate::ModelError::Input("a buffer or weight lives on another device than the op".into())
}

// Accessors that fail (with the feature) when a value belongs to the other device.
macro_rules! accessors {
    ($ty:ident, $cpu:ty, $cuda:ty) => {
        impl $ty {
            #[allow(clippy::unnecessary_wraps, unreachable_patterns)]
            fn cpu(&self) -> Result<&$cpu> {
                match self {
                    Self::Cpu(v) => Ok(v),
                    #[cfg(feature = "cuda")]
                    _ => Err(mismatch()),
                }
            }
            // Weights are never borrowed mutably: the `_mut` accessors serve buffers only.
            #[allow(clippy::unnecessary_wraps, unreachable_patterns, dead_code)]
            fn cpu_mut(&mut self) -> Result<&mut $cpu> {
                match self {
                    Self::Cpu(v) => Ok(v),
                    #[cfg(feature = "cuda")]
                    _ => Err(mismatch()),
                }
            }
            #[cfg(feature = "cuda")]
            fn cuda(&self) -> Result<&$cuda> {
                match self {
                    Self::Cuda(v) => Ok(v),
                    _ => Err(mismatch()),
                }
            }
            #[cfg(feature = "cuda")]
            #[allow(dead_code)]
            fn cuda_mut(&mut self) -> Result<&mut $cuda> {
                match self {
                    Self::Cuda(v) => Ok(v),
                    _ => Err(mismatch()),
                }
            }
        }
    };
}
accessors!(AnyBuf, Vec<f32>, cudarc::driver::CudaSlice<f32>);
accessors!(AnyWeight, crate::backend::cpu::CpuWeight, CudaWeight);
accessors!(AnyKv, CpuKv, cudarc::driver::CudaSlice<f32>);

/// `on!(self, b => expr)`: runs `expr` with `b` bound to the concrete backend; inside, `cpu` /
/// `cuda` name the accessor of that device.
macro_rules! on {
    ($self:expr, |$b:ident, $acc:ident, $acc_mut:ident| $body:expr) => {
        match $self {
            AnyBackend::Cpu($b) => {
                #[allow(unused_macros)]
                macro_rules! $acc {
                    ($v:expr) => {
                        $v.cpu()?
                    };
                }
                #[allow(unused_macros)]
                macro_rules! $acc_mut {
                    ($v:expr) => {
                        $v.cpu_mut()?
                    };
                }
                $body
            }
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda($b) => {
                #[allow(unused_macros)]
                macro_rules! $acc {
                    ($v:expr) => {
                        $v.cuda()?
                    };
                }
                #[allow(unused_macros)]
                macro_rules! $acc_mut {
                    ($v:expr) => {
                        $v.cuda_mut()?
                    };
                }
                $body
            }
        }
    };
}

impl Backend for AnyBackend {
    type Buf = AnyBuf;
    type Weight = AnyWeight;
    type KvBuf = AnyKv;

    fn describe(&self) -> String {
        on!(self, |b, r, m| b.describe())
    }

    fn concurrent_ops(&self) -> bool {
        on!(self, |b, r, m| b.concurrent_ops())
    }

    fn upload(&self, t: HostTensor) -> Result<AnyWeight> {
        match self {
            Self::Cpu(b) => b.upload(t).map(AnyWeight::Cpu),
            #[cfg(feature = "cuda")]
            Self::Cuda(b) => b.upload(t).map(AnyWeight::Cuda),
        }
    }

    fn upload_matrix(
        &self,
        t: HostTensor,
        quantize: Option<crate::weights::QuantFormat>,
    ) -> Result<AnyWeight> {
        match self {
            Self::Cpu(b) => b.upload_matrix(t, quantize).map(AnyWeight::Cpu),
            #[cfg(feature = "cuda")]
            Self::Cuda(b) => b.upload_matrix(t, quantize).map(AnyWeight::Cuda),
        }
    }

    fn alloc(&self, len: usize) -> Result<AnyBuf> {
        match self {
            Self::Cpu(b) => b.alloc(len).map(AnyBuf::Cpu),
            #[cfg(feature = "cuda")]
            Self::Cuda(b) => b.alloc(len).map(AnyBuf::Cuda),
        }
    }

    fn alloc_kv(&self, len: usize, dtype: KvDtype) -> Result<AnyKv> {
        match self {
            Self::Cpu(b) => b.alloc_kv(len, dtype).map(AnyKv::Cpu),
            #[cfg(feature = "cuda")]
            Self::Cuda(b) => b.alloc_kv(len, dtype).map(AnyKv::Cuda),
        }
    }

    fn ensure_len(&self, buf: &mut AnyBuf, len: usize) -> Result<()> {
        on!(self, |b, r, m| b.ensure_len(m!(buf), len))
    }

    fn write(&self, dst: &mut AnyBuf, src: &[f32]) -> Result<()> {
        on!(self, |b, r, m| b.write(m!(dst), src))
    }

    fn to_host(&self, src: &AnyBuf, dst: &mut [f32]) -> Result<()> {
        on!(self, |b, r, m| b.to_host(r!(src), dst))
    }

    fn embedding(&self, table: &AnyWeight, ids: &[u32], out: &mut AnyBuf) -> Result<()> {
        on!(self, |b, r, m| b.embedding(r!(table), ids, m!(out)))
    }

    fn rms_norm(
        &self,
        x: &AnyBuf,
        rows: usize,
        w: &AnyWeight,
        eps: f32,
        out: &mut AnyBuf,
    ) -> Result<()> {
        on!(self, |b, r, m| b.rms_norm(r!(x), rows, r!(w), eps, m!(out)))
    }

    fn linear(&self, x: &AnyBuf, rows: usize, w: &AnyWeight, out: &mut AnyBuf) -> Result<()> {
        on!(self, |b, r, m| b.linear(r!(x), rows, r!(w), m!(out)))
    }

    fn linear_many(
        &self,
        x: &AnyBuf,
        rows: usize,
        parts: &mut [(&AnyWeight, &mut AnyBuf)],
    ) -> Result<()> {
        match self {
            Self::Cpu(_) => crate::backend::cpu::linear_parts(
                x.cpu()?,
                rows,
                parts
                    .iter_mut()
                    .map(|(w, y)| Ok((w.cpu()?, y.cpu_mut()?.as_mut_slice()))),
            ),
            #[cfg(feature = "cuda")]
            Self::Cuda(b) => {
                for (w, y) in parts.iter_mut() {
                    b.linear(x.cuda()?, rows, w.cuda()?, y.cuda_mut()?)?;
                }
                Ok(())
            }
        }
    }

    fn rope(
        &self,
        x: &mut AnyBuf,
        width: usize,
        head_dim: usize,
        positions: &[u32],
        cos: &AnyWeight,
        sin: &AnyWeight,
    ) -> Result<()> {
        on!(self, |b, r, m| b.rope(
            m!(x),
            width,
            head_dim,
            positions,
            r!(cos),
            r!(sin)
        ))
    }

    fn kv_write(
        &self,
        cache: &mut AnyKv,
        src: &AnyBuf,
        seq: &AttnSeq<'_>,
        kv_dim: usize,
        block_size: usize,
    ) -> Result<()> {
        on!(self, |b, r, m| b.kv_write(
            m!(cache),
            r!(src),
            seq,
            kv_dim,
            block_size
        ))
    }

    fn attention(
        &self,
        q: &AnyBuf,
        k_cache: &AnyKv,
        v_cache: &AnyKv,
        seqs: &[AttnSeq<'_>],
        shape: &AttnShape,
        out: &mut AnyBuf,
    ) -> Result<()> {
        on!(self, |b, r, m| b.attention(
            r!(q),
            r!(k_cache),
            r!(v_cache),
            seqs,
            shape,
            m!(out)
        ))
    }

    fn silu_mul(&self, gate: &mut AnyBuf, up: &AnyBuf, len: usize) -> Result<()> {
        on!(self, |b, r, m| b.silu_mul(m!(gate), r!(up), len))
    }

    fn add_assign(&self, x: &mut AnyBuf, y: &AnyBuf, len: usize) -> Result<()> {
        on!(self, |b, r, m| b.add_assign(m!(x), r!(y), len))
    }

    fn route(
        &self,
        logits: &AnyBuf,
        rows: usize,
        n_experts: usize,
        k: usize,
        plan: &mut RoutePlan,
    ) -> Result<()> {
        on!(self, |b, r, m| b.route(
            r!(logits),
            rows,
            n_experts,
            k,
            plan
        ))
    }
}
