//! Users: sign-up with a unique e-mail address.
//!
//! The address is reserved by an inline handler in the sign-up's own
//! transaction (see [`crate::app`]), so two users can never end up with the
//! same address, however many sign-ups race: the second transaction fails
//! on the reservation's unique key and writes nothing.

use outflow::cqrs_es::event_sink::EventSink;
use outflow::cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

/// A user of the bank.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Whether the user signed up.
    pub signed_up: bool,
    /// The user's name.
    pub name: String,
    /// The user's e-mail address, lower-cased.
    pub email: String,
}

/// What a client may ask of a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserCommand {
    /// Signs a new user up.
    SignUp {
        /// The user's name.
        name: String,
        /// The user's e-mail address.
        email: String,
    },
}

/// What happened to a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserEvent {
    /// A user signed up.
    UserSignedUp {
        /// The user's name.
        name: String,
        /// The user's e-mail address, lower-cased.
        email: String,
    },
}

impl DomainEvent for UserEvent {
    fn event_type(&self) -> String {
        match self {
            UserEvent::UserSignedUp { .. } => "UserSignedUp".to_owned(),
        }
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// Why a user command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    /// `SignUp` on a user id already used.
    #[error("the user already signed up")]
    AlreadySignedUp,
    /// An empty name.
    #[error("a name is required")]
    MissingName,
    /// Not an e-mail address (or longer than 254 bytes, or with control
    /// characters).
    #[error("`{0}` is not an e-mail address")]
    InvalidEmail(String),
    /// A name with control characters.
    #[error("{0}")]
    InvalidName(String),
}

impl Aggregate for User {
    const TYPE: &'static str = "user";
    type Command = UserCommand;
    type Event = UserEvent;
    type Error = UserError;
    type Services = ();

    async fn handle(
        &mut self,
        command: UserCommand,
        _services: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), UserError> {
        match command {
            UserCommand::SignUp { name, email } => {
                if self.signed_up {
                    return Err(UserError::AlreadySignedUp);
                }
                let name = name.trim().to_owned();
                if name.is_empty() {
                    return Err(UserError::MissingName);
                }
                if let Err(reason) = crate::check_name("name", &name) {
                    return Err(UserError::InvalidName(reason));
                }
                let email = email.trim().to_lowercase();
                if !valid_email(&email) {
                    // Quoted back short: the refusal may be shown or logged.
                    let shown: String = email
                        .chars()
                        .take(80)
                        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
                        .collect();
                    return Err(UserError::InvalidEmail(shown));
                }
                sink.write(UserEvent::UserSignedUp { name, email }, self)
                    .await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: UserEvent) {
        match event {
            UserEvent::UserSignedUp { name, email } => {
                self.signed_up = true;
                self.name = name;
                self.email = email;
            }
        }
    }
}

/// The longest e-mail address accepted, in bytes (RFC 5321's path limit).
pub const MAX_EMAIL: usize = 254;

/// One `@` with something on each side and a dot in the domain: enough to
/// refuse typing mistakes; the welcome e-mail is the real check.
fn valid_email(email: &str) -> bool {
    if email.len() > MAX_EMAIL || email.chars().any(char::is_control) {
        return false;
    }
    match email.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !domain.contains('@')
                && !email.contains(char::is_whitespace)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outflow::cqrs_es::test::TestFramework;

    #[test]
    fn signs_up_with_a_lower_cased_address() {
        TestFramework::<User>::with(())
            .given_no_previous_events()
            .when(UserCommand::SignUp {
                name: " Ann ".into(),
                email: "Ann@Example.COM".into(),
            })
            .then_expect_events(vec![UserEvent::UserSignedUp {
                name: "Ann".into(),
                email: "ann@example.com".into(),
            }]);
    }

    #[test]
    fn refuses_what_is_not_an_address() {
        for email in [
            "ann",
            "ann@",
            "@example.com",
            "ann@example",
            "a b@example.com",
        ] {
            TestFramework::<User>::with(())
                .given_no_previous_events()
                .when(UserCommand::SignUp {
                    name: "Ann".into(),
                    email: email.into(),
                })
                .then_expect_error(UserError::InvalidEmail(email.to_lowercase()));
        }
    }
}
