//! Provisioning a JetStream stream, once for the store and the relay: open
//! it when it exists (checking its subjects when asked), create it when it
//! does not, and when another node created it in between, open that one.

use async_nats::jetstream::stream::{Config, Stream};
use async_nats::jetstream::Context;

use super::subjects::valid_stream_name;

/// Why a stream could not be provisioned.
#[derive(Debug)]
pub(crate) enum ProvisionError {
    /// The name cannot name a stream.
    InvalidName,
    /// The stream exists over other subjects.
    SubjectsDiffer {
        /// The subjects it has.
        existing: Vec<String>,
    },
    /// The server refused or did not answer (`action` says which step).
    Nats {
        action: &'static str,
        source: async_nats::Error,
    },
}

/// Opens the stream `config.name`, or creates it with `config`. With
/// `same_subjects`, an existing stream over other subjects is refused (a
/// store whose prefix is taken); otherwise it is used as it is.
pub(crate) async fn ensure_stream(
    context: &Context,
    config: Config,
    same_subjects: bool,
) -> Result<Stream, ProvisionError> {
    if !valid_stream_name(&config.name) {
        return Err(ProvisionError::InvalidName);
    }
    if let Ok(mut existing) = context.get_stream(&config.name).await {
        if same_subjects {
            let info = existing.info().await.map_err(|e| ProvisionError::Nats {
                action: "read the stream's configuration",
                source: e.into(),
            })?;
            if info.config.subjects != config.subjects {
                return Err(ProvisionError::SubjectsDiffer {
                    existing: info.config.subjects.clone(),
                });
            }
        }
        return Ok(existing);
    }
    let name = config.name.clone();
    match context.create_stream(config).await {
        Ok(stream) => Ok(stream),
        Err(error) => match context.get_stream(&name).await {
            // Another node created it first.
            Ok(stream) => Ok(stream),
            Err(_) => Err(ProvisionError::Nats {
                action: "create the stream",
                source: error.into(),
            }),
        },
    }
}
