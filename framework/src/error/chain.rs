//! An error's chain of causes, and the boxed error type backends keep as a
//! source.

/// A boxed error from a storage backend, kept as the source of a [`StoreError`](crate::StoreError).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error and its causes, outermost first.
pub(crate) fn causes<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |error| error.source())
}

/// An error and its causes, outermost first, joined with `: `: how Outflow
/// writes errors into logs and status.
///
/// Outflow's errors follow one convention: `Display` is the error's own
/// message, and the cause comes from [`source`](std::error::Error::source),
/// so every message appears once (also with `anyhow`'s `{:#}`). A cause
/// whose text its wrapper already ends with (some drivers print their cause
/// as well) is not repeated.
///
/// ```
/// use outflow::error::{error_chain, ErrorKind, StoreError};
/// let error = StoreError::database(
///     "appending events",
///     ErrorKind::Transient,
///     std::io::Error::other("connection reset"),
/// );
/// assert_eq!(error.to_string(), "appending events failed (transient error)");
/// assert_eq!(
///     error_chain(&error),
///     "appending events failed (transient error): connection reset"
/// );
/// ```
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    for cause in causes(error) {
        let next = cause.to_string();
        if text.is_empty() {
            text = next;
        } else if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
    }
    text
}
