//! The operators' console any service mounts (feature `admin`): a JSON API
//! and a page over a [`ProjectionRunner`] — status of every unit with its
//! lag and error, plots of lag and throughput over the last hour, rebuilds
//! with live progress, pause, resume, restart, dead letters retried or
//! discarded, and a browser of the log (by stream, position, correlation,
//! and a live tail).
//!
//! **Off unless configured**: with no token and no authorization hook,
//! every route answers `403 disabled`. A caller is a [`Principal`] with a
//! [`Role`]: readers see, operators also act. Actions are `POST` with a
//! bearer token in the `Authorization` header (no cookies, so no cross-site
//! request can act); payloads are hidden from readers unless allowed; every
//! action is logged (target `outflow::admin`) with who did it.
//!
//! ```no_run
//! # async fn mount(runner: outflow::runner::ProjectionRunner<outflow::PostgresStore>) {
//! let admin = outflow::admin::Admin::new(runner)
//!     .operator_token(std::env::var("ADMIN_TOKEN").unwrap_or_default())
//!     .router();
//! let app: axum::Router = axum::Router::new().nest("/admin", admin);
//! # let _ = app;
//! # }
//! ```

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::Router;

use crate::port::events::EventStore;
use crate::port::projections::ProjectionStore;
use crate::runner::ProjectionRunner;

mod api;
mod auth;
mod events;
mod samples;
mod subjects;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod timers;

pub use auth::{Principal, Role};

/// Decides who a request comes from, from its headers (`None`: nobody
/// known, answered `401`).
pub type Authorizer = Arc<dyn Fn(&HeaderMap) -> Option<Principal> + Send + Sync>;

/// The console over one runner: configure, then [`router`](Self::router).
pub struct Admin<S: ProjectionStore> {
    runner: ProjectionRunner<S>,
    tokens: Vec<(String, Principal)>,
    authorizer: Option<Authorizer>,
    events: Option<Arc<dyn EventStore>>,
    payloads_for_readers: bool,
    sample_every: Duration,
    outbox: Option<OutboxWatch>,
    keys: Option<crate::personal::KeyRing>,
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    timers: Option<Arc<dyn timers::TimerOps>>,
    #[cfg(feature = "nats")]
    jetstream: Option<crate::store::jetstream::JetStreamStore>,
}

impl<S: ProjectionStore> std::fmt::Debug for Admin<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("runner", &self.runner)
            .field("tokens", &self.tokens.len())
            .field("authorizer", &self.authorizer.is_some())
            .field("payloads_for_readers", &self.payloads_for_readers)
            .field("outbox", &self.outbox.as_ref().map(|o| o.table.as_str()))
            .finish()
    }
}

/// What the handlers share.
pub(crate) struct Inner<S: ProjectionStore> {
    pub(crate) runner: ProjectionRunner<S>,
    pub(crate) tokens: Vec<(String, Principal)>,
    pub(crate) authorizer: Option<Authorizer>,
    pub(crate) events: Option<Arc<dyn EventStore>>,
    pub(crate) payloads_for_readers: bool,
    pub(crate) samples: samples::Samples,
    pub(crate) outbox: Option<OutboxWatch>,
    pub(crate) keys: Option<crate::personal::KeyRing>,
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub(crate) timers: Option<Arc<dyn timers::TimerOps>>,
    #[cfg(feature = "nats")]
    pub(crate) jetstream: Option<crate::store::jetstream::JetStreamStore>,
}

/// What the console plots of an outbox.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutboxFigures {
    pub(crate) pending: u64,
    pub(crate) oldest: Option<Duration>,
    pub(crate) delivered: u64,
}

/// How the console reads an outbox's figures, whatever its store.
#[derive(Clone)]
pub(crate) struct OutboxWatch {
    pub(crate) table: String,
    #[allow(clippy::type_complexity)]
    pub(crate) status: Arc<
        dyn Fn() -> futures::future::BoxFuture<
                'static,
                Result<OutboxFigures, crate::error::StoreError>,
            > + Send
            + Sync,
    >,
}

impl<S: ProjectionStore> Admin<S> {
    /// A console over `runner`, off until a token or a hook is given.
    pub fn new(runner: ProjectionRunner<S>) -> Self {
        Admin {
            runner,
            tokens: Vec::new(),
            authorizer: None,
            events: None,
            payloads_for_readers: false,
            sample_every: Duration::from_secs(10),
            outbox: None,
            keys: None,
            #[cfg(any(feature = "postgres", feature = "sqlite"))]
            timers: None,
            #[cfg(feature = "nats")]
            jetstream: None,
        }
    }

    /// A bearer token that may act (an empty token is ignored, so an unset
    /// variable leaves the console off).
    pub fn operator_token(mut self, token: impl Into<String>) -> Self {
        let token = token.into();
        if !token.is_empty() {
            self.tokens
                .push((token, Principal::new("operator token", Role::Operator)));
        }
        self
    }

    /// A bearer token that may only look (empty: ignored).
    pub fn reader_token(mut self, token: impl Into<String>) -> Self {
        let token = token.into();
        if !token.is_empty() {
            self.tokens
                .push((token, Principal::new("reader token", Role::Reader)));
        }
        self
    }

    /// The service's own check instead of tokens: who the headers say the
    /// caller is (a session, a header set by a proxy that authenticated).
    pub fn authorize(
        mut self,
        hook: impl Fn(&HeaderMap) -> Option<Principal> + Send + Sync + 'static,
    ) -> Self {
        self.authorizer = Some(Arc::new(hook));
        self
    }

    /// The event store, so the browser reads one stream directly (without
    /// it, a stream is found by reading its type's events in the log).
    ///
    /// The store's key ring, if it has one, also lets operators forget a
    /// data subject (see [`keys`](Self::keys)).
    pub fn events(mut self, store: impl EventStore) -> Self {
        if self.keys.is_none() {
            self.keys = store.key_ring();
        }
        self.events = Some(Arc::new(store));
        self
    }

    /// The key ring operators forget data subjects with:
    /// `POST /api/subjects/forget?subject=…` (operators only) deletes the
    /// subject's key, so its personal data reads as forgotten everywhere
    /// (see [`crate::personal`]). Given [`events`](Self::events), the
    /// console uses that store's ring unless told another here.
    pub fn keys(mut self, ring: crate::personal::KeyRing) -> Self {
        self.keys = Some(ring);
        self
    }

    /// Whether readers see payloads and metadata (default: hidden; operators
    /// always see them).
    pub fn payloads_for_readers(mut self, allowed: bool) -> Self {
        self.payloads_for_readers = allowed;
        self
    }

    /// An outbox to watch: its backlog (pending, oldest) and deliveries per
    /// second are plotted and shown.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub fn outbox<O: crate::outbox::OutboxStore>(
        mut self,
        outbox: crate::outbox::Outbox<O>,
    ) -> Self {
        let table = outbox.table().to_owned();
        self.outbox = Some(OutboxWatch {
            table,
            status: Arc::new(move || {
                let outbox = outbox.clone();
                Box::pin(async move {
                    let status = outbox.status().await?;
                    Ok(OutboxFigures {
                        pending: status.pending,
                        oldest: status.oldest_pending_age,
                        delivered: status.delivered,
                    })
                })
            }),
        });
        self
    }

    /// The timers to show (counts, pending and refused timers by key and
    /// due time, at `/api/timers`) and let operators retry or cancel
    /// (`POST /api/timers/retry?key=…`, `POST /api/timers/cancel?key=…`).
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub fn timers<T: crate::timer::TimerStore>(mut self, timers: crate::timer::Timers<T>) -> Self {
        self.timers = Some(Arc::new(timers));
        self
    }

    /// The JetStream store whose partitions to show: each partition's
    /// stream, the server leading it, its replicas and how far behind they
    /// are, at `/api/partitions` and on the page.
    #[cfg(feature = "nats")]
    pub fn jetstream(mut self, store: crate::store::jetstream::JetStreamStore) -> Self {
        self.jetstream = Some(store);
        self
    }

    /// How often the plots' figures are taken (default 10 s; an hour of
    /// them is kept).
    pub fn sample_every(mut self, every: Duration) -> Self {
        self.sample_every = every.max(Duration::from_millis(100));
        self
    }

    /// The routes, to nest under a path of the service's choosing (the page
    /// answers at that path itself, `/admin` rather than `/admin/`). Built
    /// inside a Tokio runtime, it starts the task that takes the plots'
    /// figures (it ends when the router is dropped).
    pub fn router(self) -> Router {
        let inner = Arc::new(Inner {
            runner: self.runner,
            tokens: self.tokens,
            authorizer: self.authorizer,
            events: self.events,
            payloads_for_readers: self.payloads_for_readers,
            samples: samples::Samples::default(),
            outbox: self.outbox,
            keys: self.keys,
            #[cfg(any(feature = "postgres", feature = "sqlite"))]
            timers: self.timers,
            #[cfg(feature = "nats")]
            jetstream: self.jetstream,
        });
        samples::start(Arc::downgrade(&inner), self.sample_every);
        let router = Router::new();
        #[cfg(any(feature = "postgres", feature = "sqlite"))]
        let router = router
            .route("/api/timers", get(timers::list::<S>))
            .route("/api/timers/retry", post(timers::retry::<S>))
            .route("/api/timers/cancel", post(timers::cancel::<S>));
        router
            .route("/", get(api::page::<S>))
            .route("/api/whoami", get(api::whoami::<S>))
            .route("/api/subjects/forget", post(subjects::forget::<S>))
            .route("/api/status", get(api::status::<S>))
            .route("/api/samples", get(api::samples::<S>))
            .route("/api/activity", get(api::activity::<S>))
            .route("/api/partitions", get(api::partitions::<S>))
            .route("/api/events", get(events::browse::<S>))
            .route("/api/tail", get(events::tail::<S>))
            .route(
                "/api/projections/{name}/dead-letters",
                get(api::dead_letters::<S>),
            )
            .route(
                "/api/projections/{name}/rebuild",
                post(api::rebuild::<S>).get(api::rebuild_progress::<S>),
            )
            .route("/api/projections/{name}/pause", post(api::pause::<S>))
            .route("/api/projections/{name}/resume", post(api::resume::<S>))
            .route("/api/projections/{name}/restart", post(api::restart::<S>))
            .route("/api/projections/{name}/reset", post(api::reset::<S>))
            .route(
                "/api/projections/{name}/dead-letters/retry",
                post(api::retry_all::<S>),
            )
            .route(
                "/api/projections/{name}/dead-letters/discard",
                post(api::discard_all::<S>),
            )
            .route(
                "/api/projections/{name}/dead-letters/{id}/retry",
                post(api::retry::<S>),
            )
            .route(
                "/api/projections/{name}/dead-letters/{id}/discard",
                post(api::discard::<S>),
            )
            .fallback(api::not_found)
            .with_state(inner)
    }
}
