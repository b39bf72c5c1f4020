//! The CUDA device: one context and stream per `Cuda`, cuBLAS for the linear layers, the NVRTC
//! kernels of `kernels.cu` for the rest. Every op is enqueued on the one stream, so ops from
//! several threads stay ordered without host synchronisation; only `to_host` waits.

use super::kernels::{self, AttnRows, Launch};
use crate::{
    backend::{AttnSeq, AttnShape, Backend, KvDtype},
    weights::{Elems, HostTensor},
    ModelError, Result,
};
use cudarc::{
    cublas::{sys as blas_sys, CudaBlas},
    driver::{
        CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchArgs,
        LaunchConfig, PushKernelArg,
    },
};
use std::{
    collections::HashMap,
    ffi::c_void,
    sync::{Arc, Mutex},
};

fn dev_err(ordinal: usize, e: impl std::fmt::Display) -> ModelError {
    ModelError::Device(format!("cuda:{ordinal}"), e.to_string())
}

/// Checks that the CUDA libraries load and that device `ordinal` exists, without creating a
/// context (cudarc panics where the driver library is missing, so this runs first).
pub fn probe(ordinal: usize) -> Result<()> {
    // SAFETY: each check only tries to dlopen a library.
    let (driver, nvrtc, cublas) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
        )
    };
    if !driver {
        return Err(dev_err(
            ordinal,
            "no CUDA driver (libcuda.so) on this machine",
        ));
    }
    if !nvrtc {
        return Err(dev_err(ordinal, "NVRTC (libnvrtc.so) is missing"));
    }
    if !cublas {
        return Err(dev_err(ordinal, "cuBLAS (libcublas.so) is missing"));
    }
    let count = CudaContext::device_count().map_err(|e| dev_err(ordinal, e))?;
    if ordinal >= count.max(0) as usize {
        return Err(dev_err(
            ordinal,
            format!("this machine has {count} CUDA device(s)"),
        ));
    }
    Ok(())
}

/// A weight in its stored dtype; 16-bit formats are kept as raw bits.
pub enum CudaWeight {
    F32 {
        data: CudaSlice<f32>,
        shape: Vec<usize>,
    },
    Bf16 {
        data: CudaSlice<u16>,
        shape: Vec<usize>,
    },
    F16 {
        data: CudaSlice<u16>,
        shape: Vec<usize>,
    },
}

impl CudaWeight {
    fn shape(&self) -> &[usize] {
        match self {
            Self::F32 { shape, .. } | Self::Bf16 { shape, .. } | Self::F16 { shape, .. } => shape,
        }
    }
    /// The one of `[f32, bf16, f16]` kernel names that matches this weight's dtype.
    fn by_dtype(&self, names: [&'static str; 3]) -> &'static str {
        match self {
            Self::F32 { .. } => names[0],
            Self::Bf16 { .. } => names[1],
            Self::F16 { .. } => names[2],
        }
    }

    /// Passes the weight's data as the next kernel argument.
    fn push_data<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        match self {
            Self::F32 { data, .. } => b.arg(data),
            Self::Bf16 { data, .. } | Self::F16 { data, .. } => b.arg(data),
        };
    }
}

/// Device and host buffers reused across calls, so the step loop allocates nothing once they
/// have grown to its largest step: the GEMM input cast to the weight dtype, the small index
/// tables each op uploads (token ids, positions, block tables) and the router's output.
///
/// Every op runs on the one stream, so refilling a buffer is ordered after the kernels that
/// read its previous contents.
struct Scratch {
    half_x: CudaSlice<u16>,
    rows: AttnRows,
    tables: [CudaSlice<u32>; 3],
    topk_ids: CudaSlice<u32>,
    topk_weights: CudaSlice<f32>,
    host_ids: Vec<u32>,
    host_weights: Vec<f32>,
}

impl Scratch {
    fn new(stream: &Arc<CudaStream>) -> std::result::Result<Self, cudarc::driver::DriverError> {
        Ok(Self {
            half_x: stream.alloc_zeros(1)?,
            rows: AttnRows::default(),
            tables: [
                stream.alloc_zeros(1)?,
                stream.alloc_zeros(1)?,
                stream.alloc_zeros(1)?,
            ],
            topk_ids: stream.alloc_zeros(1)?,
            topk_weights: stream.alloc_zeros(1)?,
            host_ids: Vec::new(),
            host_weights: Vec::new(),
        })
    }
}

/// Makes `buf` hold at least `len` elements (contents are lost when it grows).
fn grow<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    buf: &mut CudaSlice<T>,
    len: usize,
) -> std::result::Result<(), cudarc::driver::DriverError> {
    if buf.len() < len {
        *buf = stream.alloc_zeros(len)?;
    }
    Ok(())
}

/// Copies `v` into the start of `buf`, growing it first if needed.
fn stage(
    stream: &Arc<CudaStream>,
    buf: &mut CudaSlice<u32>,
    v: &[u32],
) -> std::result::Result<(), cudarc::driver::DriverError> {
    grow(stream, buf, v.len())?;
    if !v.is_empty() {
        stream.memcpy_htod(v, &mut buf.slice_mut(..v.len()))?;
    }
    Ok(())
}

struct Inner {
    ordinal: usize,
    name: String,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    functions: HashMap<&'static str, CudaFunction>,
    scratch: Mutex<Scratch>,
}

/// A CUDA device. Cheap to clone (shared context, stream and kernels).
#[derive(Clone)]
pub struct Cuda {
    inner: Arc<Inner>,
}

impl Cuda {
    /// Opens device `ordinal`, compiles the kernels and creates the cuBLAS handle.
    ///
    /// Checks for the driver library first: cudarc panics when it cannot load it.
    pub fn new(ordinal: usize) -> Result<Self> {
        probe(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| dev_err(ordinal, e))?;
        let name = ctx.name().map_err(|e| dev_err(ordinal, e))?;
        let stream = ctx.new_stream().map_err(|e| dev_err(ordinal, e))?;
        let ptx = cudarc::nvrtc::compile_ptx(kernels::SOURCE)
            .map_err(|e| dev_err(ordinal, format!("compiling the kernels: {e}")))?;
        let module = ctx.load_module(ptx).map_err(|e| dev_err(ordinal, e))?;
        let mut functions = HashMap::new();
        for &k in kernels::KERNELS {
            let f = module.load_function(k).map_err(|e| dev_err(ordinal, e))?;
            functions.insert(k, f);
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| dev_err(ordinal, e))?;
        let scratch = Scratch::new(&stream).map_err(|e| dev_err(ordinal, e))?;
        tracing::info!(ordinal, %name, "CUDA device ready");
        Ok(Self {
            inner: Arc::new(Inner {
                ordinal,
                name,
                stream,
                blas,
                functions,
                scratch: Mutex::new(scratch),
            }),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> ModelError {
        dev_err(self.inner.ordinal, e)
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.inner
            .functions
            .get(name)
            .ok_or_else(|| self.err(format!("kernel {name} is not loaded")))
    }

    fn scratch(&self) -> std::sync::MutexGuard<'_, Scratch> {
        // The scratch holds no invariants across calls; a panic elsewhere leaves it usable.
        self.inner.scratch.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn config(l: Launch) -> LaunchConfig {
        LaunchConfig {
            grid_dim: l.grid,
            block_dim: l.block,
            shared_mem_bytes: 0,
        }
    }

    fn check_len(&self, what: &str, have: usize, need: usize) -> Result<()> {
        if have < need {
            return Err(ModelError::Input(format!(
                "{what}: buffer of {have} values, {need} needed"
            )));
        }
        Ok(())
    }

    /// `out = x · wᵀ` through cublasGemmEx: 16-bit weights take the input cast to their dtype
    /// (f32 accumulation and output); f32 weights run in f32.
    fn gemm(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        w: &CudaWeight,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let shape = w.shape();
        let (n_out, n_in) = (shape[0], shape[1]);
        self.check_len("linear input", x.len(), rows * n_in)?;
        self.check_len("linear output", out.len(), rows * n_out)?;
        if rows == 0 {
            return Ok(());
        }
        let d = kernels::gemm_dims(rows, n_out, n_in)?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let stream = self.stream().clone();
        let handle = *self.inner.blas.handle();
        let (c_ptr, _c) = out.device_ptr_mut(&stream);
        let mut scratch = self.scratch();
        let (a_ptr, b_ptr, dtype, _guards) = match w {
            CudaWeight::F32 { data, .. } => {
                let (a, ga) = data.device_ptr(&stream);
                let (b, gb) = x.device_ptr(&stream);
                (a, b, blas_sys::cudaDataType::CUDA_R_32F, (ga, gb))
            }
            CudaWeight::Bf16 { data, .. } | CudaWeight::F16 { data, .. } => {
                let n = rows * n_in;
                grow(&stream, &mut scratch.half_x, n).map_err(|e| self.err(e))?;
                let (kernel, dtype) = if matches!(w, CudaWeight::Bf16 { .. }) {
                    ("cast_f32_bf16", blas_sys::cudaDataType::CUDA_R_16BF)
                } else {
                    ("cast_f32_f16", blas_sys::cudaDataType::CUDA_R_16F)
                };
                let f = self.function(kernel)?;
                let n64 = n as i64;
                let mut b = stream.launch_builder(f);
                b.arg(x).arg(&mut scratch.half_x).arg(&n64);
                // SAFETY: the kernel reads n f32 and writes n u16; both buffers hold ≥ n.
                unsafe { b.launch(Self::config(kernels::elementwise(n))) }
                    .map_err(|e| self.err(e))?;
                let (a, ga) = data.device_ptr(&stream);
                let (b, gb) = scratch.half_x.device_ptr(&stream);
                (a, b, dtype, (ga, gb))
            }
        };
        // SAFETY: pointers come from live allocations sized above; cuBLAS runs on `stream`.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                handle,
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                d.m,
                d.n,
                d.k,
                (&raw const alpha).cast::<c_void>(),
                a_ptr as *const c_void,
                dtype,
                d.lda,
                b_ptr as *const c_void,
                dtype,
                d.ldb,
                (&raw const beta).cast::<c_void>(),
                c_ptr as *mut c_void,
                blas_sys::cudaDataType::CUDA_R_32F,
                d.ldc,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| self.err(e))
    }

    /// Runs an elementwise kernel `x[i] = f(x[i], y[i])` over `len` values.
    fn binary_in_place(
        &self,
        kernel: &str,
        x: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        len: usize,
    ) -> Result<()> {
        self.check_len(kernel, x.len().min(y.len()), len)?;
        let n = len as i64;
        let s = self.stream();
        let mut b = s.launch_builder(self.function(kernel)?);
        b.arg(x).arg(y).arg(&n);
        // SAFETY: both buffers hold ≥ len.
        unsafe { b.launch(Self::config(kernels::elementwise(len))) }.map_err(|e| self.err(e))?;
        Ok(())
    }
}

impl Backend for Cuda {
    type Buf = CudaSlice<f32>;
    type Weight = CudaWeight;
    /// f32 only: the kernels in `kernels.cu` read an f32 cache.
    type KvBuf = CudaSlice<f32>;

    fn describe(&self) -> String {
        format!("cuda:{} ({})", self.inner.ordinal, self.inner.name)
    }

    fn upload_matrix(
        &self,
        t: HostTensor,
        quantize: Option<crate::weights::QuantFormat>,
    ) -> Result<CudaWeight> {
        if quantize.is_some() {
            return Err(quantized_unsupported());
        }
        self.upload(t)
    }

    fn upload(&self, t: HostTensor) -> Result<CudaWeight> {
        let shape = t.shape().to_vec();
        let s = self.stream();
        Ok(match t.elems() {
            Elems::F32(v) => CudaWeight::F32 {
                data: s.clone_htod(v).map_err(|e| self.err(e))?,
                shape,
            },
            Elems::BF16(v) => CudaWeight::Bf16 {
                data: s
                    .clone_htod(bytemuck::cast_slice::<_, u16>(v))
                    .map_err(|e| self.err(e))?,
                shape,
            },
            Elems::F16(v) => CudaWeight::F16 {
                data: s
                    .clone_htod(bytemuck::cast_slice::<_, u16>(v))
                    .map_err(|e| self.err(e))?,
                shape,
            },
            Elems::Q8_0(_) | Elems::Q4_0(_) => return Err(quantized_unsupported()),
        })
    }

    fn alloc(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.stream()
            .alloc_zeros(len.max(1))
            .map_err(|e| self.err(e))
    }

    fn alloc_kv(&self, len: usize, dtype: KvDtype) -> Result<CudaSlice<f32>> {
        match dtype {
            KvDtype::F32 => self.alloc(len),
            KvDtype::Bf16 => Err(ModelError::Unsupported {
                device: self.describe(),
                what: "a bf16 KV cache: its kernels read f32 (--kv-cache-dtype f32)".into(),
            }),
        }
    }

    fn ensure_len(&self, buf: &mut CudaSlice<f32>, len: usize) -> Result<()> {
        if buf.len() < len {
            *buf = self.alloc(len)?;
        }
        Ok(())
    }

    fn write(&self, dst: &mut CudaSlice<f32>, src: &[f32]) -> Result<()> {
        self.check_len("write", dst.len(), src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        self.stream()
            .memcpy_htod(src, &mut dst.slice_mut(..src.len()))
            .map_err(|e| self.err(e))
    }

    fn to_host(&self, src: &CudaSlice<f32>, dst: &mut [f32]) -> Result<()> {
        self.check_len("to_host", src.len(), dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        let n = dst.len();
        let s = self.stream();
        s.memcpy_dtoh(&src.slice(..n), dst)
            .map_err(|e| self.err(e))?;
        s.synchronize().map_err(|e| self.err(e))
    }

    fn embedding(&self, table: &CudaWeight, ids: &[u32], out: &mut CudaSlice<f32>) -> Result<()> {
        let (vocab, width) = (table.shape()[0], table.shape()[1]);
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(ModelError::Input(format!(
                "token id {bad} outside the vocabulary ({vocab})"
            )));
        }
        self.check_len("embedding", out.len(), ids.len() * width)?;
        let s = self.stream();
        let mut guard = self.scratch();
        let sc = &mut *guard;
        stage(s, &mut sc.tables[0], ids).map_err(|e| self.err(e))?;
        let (rows, w) = (ids.len() as i32, width as i32);
        let name = table.by_dtype(["embedding_f32", "embedding_bf16", "embedding_f16"]);
        let mut b = s.launch_builder(self.function(name)?);
        table.push_data(&mut b);
        b.arg(&sc.tables[0]).arg(out).arg(&rows).arg(&w);
        // SAFETY: ids were checked against the table; out holds rows × width.
        unsafe { b.launch(Self::config(kernels::elementwise(ids.len() * width))) }
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        w: &CudaWeight,
        eps: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let width = w.shape()[0];
        self.check_len("rms_norm input", x.len(), rows * width)?;
        self.check_len("rms_norm output", out.len(), rows * width)?;
        if rows == 0 {
            return Ok(());
        }
        let name = w.by_dtype(["rms_norm_f32", "rms_norm_bf16", "rms_norm_f16"]);
        let wi = width as i32;
        let s = self.stream();
        let mut b = s.launch_builder(self.function(name)?);
        b.arg(x);
        w.push_data(&mut b);
        b.arg(out).arg(&wi).arg(&eps);
        // SAFETY: one block per row of `width`, all within the checked lengths.
        unsafe { b.launch(Self::config(kernels::per_row(rows, width))) }
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn linear(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        w: &CudaWeight,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.gemm(x, rows, w, out)
    }

    fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        width: usize,
        head_dim: usize,
        positions: &[u32],
        cos: &CudaWeight,
        sin: &CudaWeight,
    ) -> Result<()> {
        let (CudaWeight::F32 { data: c, shape }, CudaWeight::F32 { data: sn, .. }) = (cos, sin)
        else {
            return Err(ModelError::Input("RoPE tables must be f32".into()));
        };
        if let Some(&p) = positions.iter().find(|&&p| p as usize >= shape[0]) {
            return Err(ModelError::Input(format!(
                "position {p} beyond the RoPE table ({})",
                shape[0]
            )));
        }
        let rows = positions.len();
        self.check_len("rope", x.len(), rows * width)?;
        if rows == 0 {
            return Ok(());
        }
        let s = self.stream();
        let mut guard = self.scratch();
        let sc = &mut *guard;
        stage(s, &mut sc.tables[0], positions).map_err(|e| self.err(e))?;
        let (r, w, hd) = (rows as i32, width as i32, head_dim as i32);
        let mut b = s.launch_builder(self.function("rope")?);
        b.arg(x)
            .arg(c)
            .arg(sn)
            .arg(&sc.tables[0])
            .arg(&r)
            .arg(&w)
            .arg(&hd);
        // SAFETY: positions were checked against the tables; x holds rows × width.
        unsafe { b.launch(Self::config(kernels::elementwise(rows * width / 2))) }
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn kv_write(
        &self,
        cache: &mut CudaSlice<f32>,
        src: &CudaSlice<f32>,
        seq: &AttnSeq<'_>,
        kv_dim: usize,
        block_size: usize,
    ) -> Result<()> {
        let (src_row0, rows, pos0, blocks) = (seq.q_row0, seq.n_q, seq.pos0, seq.blocks);
        if rows == 0 {
            return Ok(());
        }
        let last = pos0 + rows - 1;
        if last / block_size >= blocks.len() {
            return Err(ModelError::Input(format!(
                "position {last} beyond the sequence's {} cache blocks",
                blocks.len()
            )));
        }
        let slots = cache.len() / kv_dim.max(1);
        if blocks
            .iter()
            .any(|&b| (b as usize + 1) * block_size > slots)
        {
            return Err(ModelError::Input(
                "a block id is outside the KV cache".into(),
            ));
        }
        self.check_len("kv_write source", src.len(), (src_row0 + rows) * kv_dim)?;
        let s = self.stream();
        let mut guard = self.scratch();
        let sc = &mut *guard;
        stage(s, &mut sc.tables[0], blocks).map_err(|e| self.err(e))?;
        let view = src.slice(src_row0 * kv_dim..(src_row0 + rows) * kv_dim);
        let (r, kd, p0, bs) = (rows as i32, kv_dim as i32, pos0 as i32, block_size as i32);
        let mut b = s.launch_builder(self.function("kv_write")?);
        b.arg(cache)
            .arg(&view)
            .arg(&sc.tables[0])
            .arg(&r)
            .arg(&kd)
            .arg(&p0)
            .arg(&bs);
        // SAFETY: every written slot lies in a checked block; the source view holds rows × kv_dim.
        unsafe { b.launch(Self::config(kernels::elementwise(rows * kv_dim))) }
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn attention(
        &self,
        q: &CudaSlice<f32>,
        k_cache: &CudaSlice<f32>,
        v_cache: &CudaSlice<f32>,
        seqs: &[AttnSeq<'_>],
        shape: &AttnShape,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let rows: usize = seqs.iter().map(|s| s.n_q).sum();
        if rows == 0 {
            return Ok(());
        }
        let launch = kernels::attention(rows, shape)?;
        let q_dim = shape.heads * shape.head_dim;
        self.check_len("attention q", q.len(), rows * q_dim)?;
        self.check_len("attention out", out.len(), rows * q_dim)?;
        for s in seqs {
            if (s.pos0 + s.n_q).div_ceil(shape.block_size) > s.blocks.len() {
                return Err(ModelError::Input(
                    "a sequence's keys are not all in the cache".into(),
                ));
            }
        }
        let s = self.stream();
        let mut guard = self.scratch();
        let sc = &mut *guard;
        sc.rows.fill(seqs)?;
        let [pos, blk, tab] = &mut sc.tables;
        for (buf, v) in [
            (&mut *pos, &sc.rows.row_pos),
            (&mut *blk, &sc.rows.row_blocks),
            (&mut *tab, &sc.rows.blocks),
        ] {
            stage(s, buf, v).map_err(|e| self.err(e))?;
        }
        let (h, kvh, hd, bs) = (
            shape.heads as i32,
            shape.kv_heads as i32,
            shape.head_dim as i32,
            shape.block_size as i32,
        );
        let window = shape.window.map_or(0, |w| w as i32);
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let mut b = s.launch_builder(self.function("attention")?);
        b.arg(q)
            .arg(k_cache)
            .arg(v_cache)
            .arg(out)
            .arg(&*pos)
            .arg(&*blk)
            .arg(&*tab)
            .arg(&h)
            .arg(&kvh)
            .arg(&hd)
            .arg(&bs)
            .arg(&window)
            .arg(&scale);
        // SAFETY: block tables were checked to cover every key; q and out hold rows × q_dim.
        unsafe { b.launch(Self::config(launch)) }.map_err(|e| self.err(e))?;
        Ok(())
    }

    fn silu_mul(&self, gate: &mut CudaSlice<f32>, up: &CudaSlice<f32>, len: usize) -> Result<()> {
        self.binary_in_place("silu_mul", gate, up, len)
    }

    fn add_assign(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, len: usize) -> Result<()> {
        self.binary_in_place("add_assign", x, y, len)
    }

    fn route(
        &self,
        logits: &CudaSlice<f32>,
        rows: usize,
        n_experts: usize,
        k: usize,
        plan: &mut crate::moe::RoutePlan,
    ) -> Result<()> {
        // Softmax, top-k and renormalisation on the device; k ids and weights per row come back
        // to the host, where the expert scatter needs the plan.
        let l = kernels::router(rows, n_experts, k)?;
        self.check_len("router logits", logits.len(), rows * n_experts)?;
        let n = rows * k;
        let stream = self.stream();
        let mut guard = self.scratch();
        let sc = &mut *guard;
        grow(stream, &mut sc.topk_ids, n).map_err(|e| self.err(e))?;
        grow(stream, &mut sc.topk_weights, n).map_err(|e| self.err(e))?;
        let (r, ne, kk) = (rows as i32, n_experts as i32, k as i32);
        let mut b = stream.launch_builder(self.function("router_topk")?);
        b.arg(logits)
            .arg(&mut sc.topk_ids)
            .arg(&mut sc.topk_weights)
            .arg(&r)
            .arg(&ne)
            .arg(&kk);
        // SAFETY: one thread per row reads n_experts logits and writes k ids and weights, within
        // the buffers grown to rows × k.
        unsafe { b.launch(Self::config(l)) }.map_err(|e| self.err(e))?;
        sc.host_ids.resize(n, 0);
        sc.host_weights.resize(n, 0.0);
        if n > 0 {
            stream
                .memcpy_dtoh(&sc.topk_ids.slice(..n), sc.host_ids.as_mut_slice())
                .map_err(|e| self.err(e))?;
            stream
                .memcpy_dtoh(&sc.topk_weights.slice(..n), sc.host_weights.as_mut_slice())
                .map_err(|e| self.err(e))?;
        }
        stream.synchronize().map_err(|e| self.err(e))?;
        plan.fill_topk(&sc.host_ids, &sc.host_weights, rows, k);
        Ok(())
    }
}

/// The CUDA backend's answer to quantized weights, which it has no kernels for yet.
fn quantized_unsupported() -> crate::ModelError {
    crate::ModelError::Unsupported {
        device: "the CUDA backend".into(),
        what: "quantized weights (q8_0, q4_0) yet; serve them on the CPU (--device cpu)".into(),
    }
}
