//! What the handlers share, and the limits every request is held to.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::app::{App, AppStore};

/// The page at `/`.
pub(super) const PAGE: &str = include_str!("../../static/index.html");

/// The largest request body accepted, in bytes.
pub const MAX_BODY: usize = 64 * 1024;

/// The longest id accepted in a path or a body.
pub const MAX_ID: usize = 64;

/// How long a strong read waits for the projections.
pub(super) const STRONG_WAIT: Duration = Duration::from_secs(5);

/// What the handlers share.
pub struct ApiState<S: AppStore> {
    /// The application.
    pub app: Arc<App<S>>,
    /// The operators' token; `None` turns the console at `/admin` off.
    pub admin_token: Option<String>,
    /// Renders `/metrics`.
    pub metrics: Option<PrometheusHandle>,
    /// Ends the live feeds when the server stops (a graceful shutdown waits
    /// for open connections).
    pub shutdown: outflow::CancellationToken,
}

pub(super) type Shared<S> = State<Arc<ApiState<S>>>;
