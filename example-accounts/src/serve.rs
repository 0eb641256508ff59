//! `serve`: the projections in the background and the HTTP API in front,
//! until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use example_accounts::app::{App, AppStore};
use example_accounts::http::{router, ApiState};
use outflow::CancellationToken;

pub async fn run<S: AppStore>(app: Arc<App<S>>, bind: SocketAddr) -> anyhow::Result<()> {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    outflow::telemetry::describe_metrics();
    let admin_token = std::env::var("OUTFLOW_ADMIN_TOKEN")
        .ok()
        .filter(|token| !token.is_empty());
    if admin_token.is_none() {
        tracing::info!("OUTFLOW_ADMIN_TOKEN is not set: the operators' console at /admin is off");
    }

    // The mail stand-in refuses these domains (comma-separated): a welcome
    // e-mail to one is parked, for an operator to retry or discard.
    for domain in std::env::var("OUTFLOW_REFUSE_MAIL")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
    {
        app.mail.refuse(domain);
    }
    // And those listed in this file, read at every e-mail (edit it to let
    // a parked e-mail through on its retry).
    if let Some(path) = std::env::var_os("OUTFLOW_REFUSE_MAIL_FILE") {
        app.mail.refuse_listed_in(path);
    }

    let shutdown = CancellationToken::new();
    let projections = tokio::spawn({
        let runner = app.runner.clone();
        let shutdown = shutdown.clone();
        async move { runner.run(shutdown).await }
    });

    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .with_context(|| format!("binding {bind}"))?;
    let address = listener.local_addr().context("reading the bound address")?;
    // Tests and scripts wait for this line.
    println!("listening on http://{address}");
    tracing::info!(%address, "serving");

    let routes = router(ApiState {
        app: app.clone(),
        admin_token,
        metrics: Some(metrics),
        shutdown: shutdown.clone(),
    });
    axum::serve(listener, routes)
        .with_graceful_shutdown({
            let shutdown = shutdown.clone();
            async move {
                stop_signal().await;
                tracing::info!("stopping");
                shutdown.cancel();
            }
        })
        .await
        .context("serving HTTP")?;
    shutdown.cancel();
    projections
        .await
        .context("the projections' task")?
        .context("running the projections")?;
    Ok(())
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn stop_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; stopping on Ctrl-C only");
                let _ = interrupt.await;
                return;
            }
        };
    tokio::select! {
        _ = interrupt => {}
        _ = terminate.recv() => {}
    }
}
