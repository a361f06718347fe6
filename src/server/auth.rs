//! Bearer-token authentication: with `--auth-token-file`, every route except the health probes
//! (`/v2/health/*`, which load balancers and KServe call unauthenticated) needs
//! `Authorization: Bearer <token>`, compared in constant time.

use std::path::Path;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::state::AppState;
use super::ServerError;
use crate::files::{self, FileKind};

const TOKEN_FILE: FileKind = FileKind {
    role: "auth token file",
    max_bytes: 4096,
};

/// The token in `path` (surrounding whitespace removed), or None without a file.
pub fn read_token(path: Option<&Path>) -> Result<Option<Vec<u8>>, ServerError> {
    let Some(path) = path else { return Ok(None) };
    let bytes = files::read_capped(path, TOKEN_FILE).map_err(|e| ServerError::AuthToken {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let token = String::from_utf8_lossy(&bytes).trim().as_bytes().to_vec();
    if token.len() < 16 {
        return Err(ServerError::AuthToken {
            path: path.to_path_buf(),
            message: format!(
                "the token is {} bytes; use at least 16 (e.g. `openssl rand -hex 32`)",
                token.len()
            ),
        });
    }
    Ok(Some(token))
}

pub async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = &state.token else {
        return next.run(request).await;
    };
    if request.uri().path().starts_with("/v2/health") {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    if bool::from(given.ct_eq(token)) {
        next.run(request).await
    } else {
        ApiError::unauthorized().into_response()
    }
}
