//! OpenAI-style error responses: `{"error": {"message", "type", "param", "code"}}` with the
//! matching HTTP status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 invalid_request_error.
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    pub fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 404 for a model this server does not serve.
    pub fn unknown_model(model: &str, served: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist (this server serves `{served}`)"),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
        }
    }

    pub fn not_found(path: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("no route for {path}"),
            kind: "invalid_request_error",
            param: None,
            code: Some("not_found"),
        }
    }

    /// 500 for a failure inside the engine.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// 503 when the engine is gone.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
        match e {
            crate::Error::Input(m) => ApiError::invalid(m),
            crate::Error::Unsupported(m) => ApiError::invalid(m),
            crate::Error::Backend { .. } => ApiError::unavailable(e.to_string()),
            // A broken kernel requirement or register budget is a bug here (500); device
            // memory running out is a state that may pass (503), like any other device error.
            crate::Error::Cuda(ref c) if c.is_broken_requirement() => {
                ApiError::internal(e.to_string())
            }
            crate::Error::Cuda(ref c) if c.is_out_of_memory() => {
                ApiError::unavailable(e.to_string()).code("out_of_memory")
            }
            crate::Error::Cuda(_) => ApiError::unavailable(e.to_string()),
            other => ApiError::internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::CudaError;
    use cudarc::driver::{sys::CUresult, DriverError};

    fn status(e: crate::Error) -> StatusCode {
        ApiError::from(e).status
    }

    #[test]
    fn errors_map_to_statuses() {
        let cuda = |c: CudaError| status(crate::Error::Cuda(c));
        // Our bugs: 500.
        assert_eq!(
            cuda(CudaError::Requirement {
                kernel: "fp8_gemm_wgmma",
                requirement: "K must be a multiple of 128 (K = 100)".into(),
            }),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            cuda(CudaError::RegisterBudget {
                kernel: "mla_decode_wgmma".into(),
                registers: 128,
                needed: 168,
            }),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        // Device out of memory, from an allocation or any driver call: 503.
        let oom = ApiError::from(crate::Error::Cuda(CudaError::OutOfMemory {
            bytes: 1 << 30,
        }));
        assert_eq!(oom.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(oom.code, Some("out_of_memory"));
        assert!(
            oom.message.contains("out of device memory"),
            "{}",
            oom.message
        );
        assert_eq!(
            cuda(CudaError::driver(
                "cuModuleLoadData(mla.cubin)",
                DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY),
            )),
            StatusCode::SERVICE_UNAVAILABLE
        );
        // Other device failures stay 503, as every backend error was.
        assert_eq!(
            cuda(CudaError::driver(
                "cuLaunchKernel(mla_decode_wgmma)",
                DriverError(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS),
            )),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            cuda(CudaError::NoDevice {
                ordinal: 0,
                count: 0
            }),
            StatusCode::SERVICE_UNAVAILABLE
        );
        // The existing mappings.
        assert_eq!(
            status(crate::Error::Input("empty".into())),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(crate::Error::Unsupported("x".into())),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(crate::Error::Backend {
                backend: "scheduler".into(),
                message: "gone".into(),
            }),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status(crate::Error::Config {
                path: "config.json".into(),
                message: "bad".into(),
            }),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
