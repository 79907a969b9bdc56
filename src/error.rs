//! The crate's error type: every message names the file, tensor or field at fault and, where
//! possible, what the user can do about it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("config.json ({path}): {message}")]
    Config { path: PathBuf, message: String },

    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    #[error("tensor `{tensor}` ({file}): {message}")]
    Tensor {
        tensor: String,
        file: PathBuf,
        message: String,
    },

    #[error("tensor `{tensor}` is not in the checkpoint ({dir}){hint}")]
    MissingTensor {
        tensor: String,
        dir: PathBuf,
        hint: String,
    },

    #[error("invalid input: {0}")]
    Input(String),

    #[error("unsupported: {0}")]
    Unsupported(String),

    #[error("backend `{backend}`: {message}")]
    Backend { backend: String, message: String },

    /// The CUDA backend's typed error (what failed and why stays inspectable).
    #[error("backend `cuda`: {0}")]
    Cuda(#[from] crate::cuda::error::CudaError),

    #[error("cannot write {path}: {message}")]
    Output { path: PathBuf, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::error::CudaError;
    use cudarc::driver::{sys::CUresult, DriverError};

    /// A CUDA failure stays typed inside the crate error and reads as the backend's message.
    #[test]
    fn cuda_errors_keep_their_cause() {
        let e = CudaError::driver(
            "cuLaunchKernel(fp8_gemm_wgmma)",
            DriverError(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS),
        );
        let top = Error::from(e.clone());
        assert!(matches!(&top, Error::Cuda(c) if *c == e));
        assert_eq!(top.to_string(), format!("backend `cuda`: {e}"));
    }
}
