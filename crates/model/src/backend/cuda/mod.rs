//! The CUDA backend (cargo feature `cuda`): cuBLAS GEMMs in the weights' stored dtype with f32
//! accumulation, and NVRTC-compiled kernels for everything else. The driver libraries are
//! loaded at run time, so a build with the feature runs anywhere and `--device cuda` fails
//! cleanly where there is no driver.

pub mod kernels;

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
pub use device::{probe, Cuda, CudaWeight};
