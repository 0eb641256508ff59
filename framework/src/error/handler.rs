//! [`HandlerError`]: what a projection's, an inline handler's or a sink's
//! code returns, with the classification it declares.

use std::fmt;

use super::chain::{causes, error_chain, BoxError};
use super::kind::ErrorKind;

/// The error of a handler (projection, inline handler, message handler): any
/// error, with its chain of causes, and optionally a classification.
///
/// `?` converts any error into it inside handlers: every
/// `std::error::Error + Send + Sync` (sqlx, serde, Outflow's own),
/// `anyhow::Error`, `Box<dyn Error + Send + Sync>`, and plain messages. Out
/// of a handler, `?` turns it into `anyhow::Error` or `Box<dyn Error>`, and
/// [`into_error`](Self::into_error) into `Box<dyn Error + Send + Sync>`; the
/// causes are kept either way.
///
/// ```
/// use outflow::error::HandlerError;
///
/// fn with_anyhow() -> Result<(), HandlerError> {
///     Err(anyhow::anyhow!("remote said no"))?;
///     Ok(())
/// }
/// fn with_box() -> Result<(), HandlerError> {
///     let boxed: Box<dyn std::error::Error + Send + Sync> = "bad amount".into();
///     Err(boxed)?;
///     Ok(())
/// }
/// fn caller() -> anyhow::Result<()> {
///     with_anyhow()?;
///     Ok(())
/// }
/// assert_eq!(with_box().unwrap_err().to_string(), "bad amount");
/// assert_eq!(caller().unwrap_err().to_string(), "remote said no");
/// ```
///
/// Whose fault a failure is decides what the runner does: the backend that
/// ran the handler's transaction classifies its own errors (a missing table
/// is the infrastructure's, a lost connection is transient), and a handler
/// can say so itself with [`transient`](Self::transient) or
/// [`infrastructure`](Self::infrastructure). Only errors left as the data's
/// fault may get an event parked.
///
/// ```
/// use outflow::error::{ErrorKind, HandlerError};
/// let e = HandlerError::msg("amount is negative");
/// assert_eq!(e.declared_kind(), None);
/// let e = HandlerError::transient(std::io::Error::other("broker down"));
/// assert_eq!(e.declared_kind(), Some(ErrorKind::Transient));
/// assert_eq!(e.to_string(), "broker down");
/// ```
pub struct HandlerError {
    pub(super) source: BoxError,
    pub(super) kind: Option<ErrorKind>,
}

impl HandlerError {
    /// Wraps any boxed error (an `anyhow::Error` converts with `.into()`).
    pub fn new(error: impl Into<BoxError>) -> Self {
        HandlerError {
            source: error.into(),
            kind: None,
        }
    }

    /// An error with a message.
    pub fn msg(message: impl Into<String>) -> Self {
        HandlerError {
            source: message.into().into(),
            kind: None,
        }
    }

    /// An error the handler marks as passing by itself (a broker that is
    /// down, an acknowledgement that timed out): the runner retries the batch
    /// with backoff for as long as it takes, never parks its events, and never
    /// moves the checkpoint past them.
    pub fn transient(error: impl Into<BoxError>) -> Self {
        HandlerError {
            source: error.into(),
            kind: Some(ErrorKind::Transient),
        }
    }

    /// An error the handler marks as the environment's (a service it needs
    /// is misconfigured): like [`transient`](Self::transient), the events are
    /// never parked for it, and the status shows it until it is fixed.
    pub fn infrastructure(error: impl Into<BoxError>) -> Self {
        HandlerError {
            source: error.into(),
            kind: Some(ErrorKind::Infrastructure),
        }
    }

    /// An error the handler marks as the event's fault.
    pub fn data(error: impl Into<BoxError>) -> Self {
        HandlerError {
            source: error.into(),
            kind: Some(ErrorKind::Data),
        }
    }

    /// The underlying error.
    pub fn source(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// Turns it back into the boxed error it wraps (without the kind).
    pub fn into_inner(self) -> BoxError {
        self.source
    }

    /// Turns it into a boxed `std::error::Error` whose causes are the
    /// wrapped error's: for functions that return
    /// `Box<dyn Error + Send + Sync>`. (`?` converts it into `anyhow::Error`
    /// and `Box<dyn Error>` directly.)
    pub fn into_error(self) -> BoxError {
        Box::new(HandlerErrorChain(self))
    }

    /// The error and its causes, outermost first, joined with `: `.
    pub fn chain(&self) -> String {
        error_chain(&*self.source)
    }

    /// The classification: the handler's own, else an Outflow error's in the
    /// chain, else what `classify` (the backend) says of any error in the
    /// chain, else [`ErrorKind::Data`].
    pub fn kind_with(
        &self,
        classify: impl Fn(&(dyn std::error::Error + 'static)) -> Option<ErrorKind>,
    ) -> ErrorKind {
        self.declared_kind()
            .or_else(|| causes(&*self.source).find_map(classify))
            .unwrap_or(ErrorKind::Data)
    }

    /// `true` when the handler or an Outflow error in the chain says the
    /// failure passes by itself.
    pub fn is_transient(&self) -> bool {
        self.declared_kind() == Some(ErrorKind::Transient)
    }
}

impl<E: Into<BoxError>> From<E> for HandlerError {
    /// Any error converts: `std::error::Error` types, `anyhow::Error`,
    /// `Box<dyn Error + Send + Sync>`, and messages (`String`, `&str`).
    fn from(error: E) -> Self {
        HandlerError {
            source: error.into(),
            kind: None,
        }
    }
}

impl From<HandlerError> for anyhow::Error {
    fn from(error: HandlerError) -> Self {
        anyhow::Error::from_boxed(error.into_error())
    }
}

impl From<HandlerError> for Box<dyn std::error::Error + 'static> {
    fn from(error: HandlerError) -> Self {
        error.into_error()
    }
}

/// [`HandlerError`] as a `std::error::Error`, for `?` into
/// `Box<dyn Error + Send + Sync>` and `anyhow::Error`.
#[derive(Debug)]
pub(crate) struct HandlerErrorChain(HandlerError);

impl fmt::Display for HandlerErrorChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.source, f)
    }
}

impl std::error::Error for HandlerErrorChain {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source.source()
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HandlerError({})", self.chain())
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.chain())
    }
}
