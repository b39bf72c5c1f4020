//! `HostTensor`: a tensor in its stored dtype, backed by the checkpoint's memory map when the bytes
//! are aligned for the dtype, else by an owned copy.

use super::quant::{self, BlockQ4_0, BlockQ8_0, QuantFormat};
use half::{bf16, f16};
use memmap2::Mmap;
use std::{ops::Range, sync::Arc};

/// Element types switchyard keeps weights in. Weights stay in the stored dtype: decode is memory
/// bound, so widening bf16 to f32 in memory would halve the speed. The block-quantized types
/// ([`quant`](super::quant)) hold linears' weights only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
}

impl DType {
    /// Bytes per element of the float types; the quantized ones store blocks
    /// ([`DType::bytes_for`]).
    #[must_use]
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 | Self::Q8_0 | Self::Q4_0 => 2,
        }
    }

    /// Bytes of `elems` elements (for the quantized types, a multiple of the block).
    #[must_use]
    pub fn bytes_for(self, elems: usize) -> usize {
        match self.quant() {
            Some(q) => q.bytes_for(elems),
            None => elems * self.size(),
        }
    }

    /// The block format of a quantized type.
    #[must_use]
    pub fn quant(self) -> Option<QuantFormat> {
        match self {
            Self::Q8_0 => Some(QuantFormat::Q8_0),
            Self::Q4_0 => Some(QuantFormat::Q4_0),
            _ => None,
        }
    }

    /// The name of a type (safetensors' spelling for the float ones).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q8_0 => "Q8_0",
            Self::Q4_0 => "Q4_0",
        }
    }
}

impl From<QuantFormat> for DType {
    fn from(q: QuantFormat) -> Self {
        match q {
            QuantFormat::Q8_0 => Self::Q8_0,
            QuantFormat::Q4_0 => Self::Q4_0,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            other => Err(format!("unknown dtype {other:?} (f32, f16 or bf16)")),
        }
    }
}

/// Borrowed typed view of a tensor's elements.
#[derive(Clone, Copy, Debug)]
pub enum Elems<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    /// Blocks of 32 elements each.
    Q8_0(&'a [BlockQ8_0]),
    Q4_0(&'a [BlockQ4_0]),
}

impl Elems<'_> {
    /// Number of elements.
    #[must_use]
    pub fn len(&self) -> usize {
        match self {
            Self::F32(s) => s.len(),
            Self::F16(s) => s.len(),
            Self::BF16(s) => s.len(),
            Self::Q8_0(b) => b.len() * quant::BLOCK,
            Self::Q4_0(b) => b.len() * quant::BLOCK,
        }
    }

    /// Whether these are quantized blocks.
    #[must_use]
    pub fn is_quantized(&self) -> bool {
        matches!(self, Self::Q8_0(_) | Self::Q4_0(_))
    }

    /// Whether there are no elements.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` widened to f32 (exact for every supported dtype; for the quantized ones,
    /// the value the block stands for).
    #[must_use]
    #[inline]
    pub fn get_f32(&self, i: usize) -> f32 {
        match self {
            Self::F32(s) => s[i],
            Self::F16(s) => s[i].to_f32(),
            Self::BF16(s) => s[i].to_f32(),
            Self::Q8_0(_) | Self::Q4_0(_) => quant::dequantize_at(self, i),
        }
    }

    /// Widens `range` to f32 into `out` (`out.len() == range.len()`).
    pub fn to_f32_into(&self, range: Range<usize>, out: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        match self {
            Self::F32(s) => out.copy_from_slice(&s[range]),
            Self::F16(s) => s[range].convert_to_f32_slice(out),
            Self::BF16(s) => s[range].convert_to_f32_slice(out),
            Self::Q8_0(_) | Self::Q4_0(_) => {
                for (o, i) in out.iter_mut().zip(range) {
                    *o = quant::dequantize_at(self, i);
                }
            }
        }
    }

    /// The elements' bytes as stored.
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        match *self {
            Self::F32(s) => bytemuck::cast_slice(s),
            Self::F16(s) => bytemuck::cast_slice(s),
            Self::BF16(s) => bytemuck::cast_slice(s),
            Self::Q8_0(b) => bytemuck::cast_slice(b),
            Self::Q4_0(b) => bytemuck::cast_slice(b),
        }
    }

    /// A sub-range of the elements (for the quantized types, whole blocks).
    #[must_use]
    pub fn slice(&self, range: Range<usize>) -> Self {
        let blocks = || {
            debug_assert!(
                range.start.is_multiple_of(quant::BLOCK) && range.end.is_multiple_of(quant::BLOCK)
            );
            range.start / quant::BLOCK..range.end / quant::BLOCK
        };
        match *self {
            Self::F32(s) => Elems::F32(&s[range]),
            Self::F16(s) => Elems::F16(&s[range]),
            Self::BF16(s) => Elems::BF16(&s[range]),
            Self::Q8_0(b) => Elems::Q8_0(&b[blocks()]),
            Self::Q4_0(b) => Elems::Q4_0(&b[blocks()]),
        }
    }
}

#[derive(Debug)]
enum Storage {
    /// Zero-copy: a byte range of a mapped shard, aligned for the dtype.
    Mapped { map: Arc<Mmap>, range: Range<usize> },
    /// An owned, 8-byte aligned copy (unaligned source data, or a tensor built in memory).
    Owned { words: Vec<u64>, len: usize },
}

/// A tensor on the host in its stored dtype.
#[derive(Debug)]
pub struct HostTensor {
    dtype: DType,
    shape: Vec<usize>,
    storage: Storage,
}

impl HostTensor {
    /// Wraps a range of a mapped file. Copies when the range is not aligned for `dtype`, so
    /// that typed access never needs an unaligned read.
    pub(crate) fn mapped(
        map: Arc<Mmap>,
        range: Range<usize>,
        dtype: DType,
        shape: Vec<usize>,
    ) -> Self {
        let aligned = (map.as_ptr() as usize + range.start).is_multiple_of(dtype.size());
        if aligned {
            Self {
                dtype,
                shape,
                storage: Storage::Mapped { map, range },
            }
        } else {
            Self::from_bytes(&map[range], dtype, shape)
        }
    }

    /// Copies raw little-endian bytes into an owned tensor.
    #[must_use]
    pub fn from_bytes(bytes: &[u8], dtype: DType, shape: Vec<usize>) -> Self {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Self {
            dtype,
            shape,
            storage: Storage::Owned {
                words,
                len: bytes.len(),
            },
        }
    }

    /// An owned f32 tensor.
    #[must_use]
    pub fn from_f32(data: &[f32], shape: Vec<usize>) -> Self {
        Self::from_bytes(bytemuck::cast_slice(data), DType::F32, shape)
    }

    /// The stored dtype.
    #[must_use]
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The shape, outermost first.
    #[must_use]
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Raw little-endian bytes.
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Mapped { map, range } => &map[range.clone()],
            Storage::Owned { words, len } => &bytemuck::cast_slice::<u64, u8>(words)[..*len],
        }
    }

    /// Typed view of the elements.
    #[must_use]
    pub fn elems(&self) -> Elems<'_> {
        // Alignment was established at construction (mapped ranges are checked, owned storage is
        // u64-aligned) and lengths are multiples of the element size (checked by the loader), so
        // these casts cannot fail.
        let b = self.bytes();
        match self.dtype {
            DType::F32 => Elems::F32(bytemuck::cast_slice(b)),
            DType::F16 => Elems::F16(bytemuck::cast_slice(b)),
            DType::BF16 => Elems::BF16(bytemuck::cast_slice(b)),
            DType::Q8_0 => Elems::Q8_0(bytemuck::cast_slice(b)),
            DType::Q4_0 => Elems::Q4_0(bytemuck::cast_slice(b)),
        }
    }

    /// Whether the data lives in the memory map (no copy was made).
    #[must_use]
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }

    /// Reads one byte per page so the data is resident before the first request needs it.
    /// Returns the number of bytes touched.
    pub fn prefault(&self) -> usize {
        let b = self.bytes();
        let mut sink = 0u8;
        for chunk in b.chunks(4096) {
            sink = sink.wrapping_add(chunk[0]);
        }
        std::hint::black_box(sink);
        b.len()
    }

    /// Drops this process's mappings of the pages that lie wholly inside a mapped tensor, for a
    /// tensor whose bytes were copied elsewhere and will rarely be read again: the pages stay
    /// in the page cache (reclaimable) instead of in this process's resident memory, and a
    /// later read maps them again. Does nothing to owned tensors or where the OS refuses.
    pub fn release_pages(&self) {
        #[cfg(target_os = "linux")]
        if let Storage::Mapped { map, range } = &self.storage {
            // SAFETY: sysconf has no preconditions.
            let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(0);
            if page == 0 {
                return;
            }
            let base = map.as_ptr() as usize;
            let start = (base + range.start).next_multiple_of(page) - base;
            let end = (base + range.end) / page * page - base;
            if end > start {
                // SAFETY: the map is read-only and shared, so MADV_DONTNEED discards no data:
                // the range only loses its page-table entries, and the next read refaults the
                // same bytes from the file. No other tensor's pages are in the range.
                if let Err(e) = unsafe {
                    map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                } {
                    tracing::debug!(error = %e, "could not release a copied tensor's pages");
                }
            }
        }
    }

    /// All elements widened to f32 (used for small vectors such as norms, and by tests).
    #[must_use]
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let e = self.elems();
        let mut out = vec![0.0; e.len()];
        e.to_f32_into(0..e.len(), &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_roundtrip_and_widening() {
        let vals = [1.5f32, -2.25, 0.0, 3.0];
        let t = HostTensor::from_f32(&vals, vec![2, 2]);
        assert_eq!(t.to_f32_vec(), vals);
        let b: Vec<bf16> = vals.iter().map(|v| bf16::from_f32(*v)).collect();
        let t = HostTensor::from_bytes(bytemuck::cast_slice(&b), DType::BF16, vec![4]);
        assert_eq!(t.to_f32_vec(), vals);
        assert_eq!(t.elems().get_f32(1), -2.25);
    }
}
