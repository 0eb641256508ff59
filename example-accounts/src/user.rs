//! Users: sign-up with a unique e-mail address.
//!
//! A user is an aggregate; the rule that no two users share an address
//! spans every user, so a sign-up is a [decision](outflow::decision):
//! [`Registration`] reads the sign-ups tagged with the address (and the
//! new user's own stream), decides, and appends the user's `UserSignedUp`
//! on condition that no such event was appended since it read. Two
//! sign-ups racing for one address can never both commit, however many
//! race: the loser reads again and is refused with
//! [`UserError::EmailTaken`].
//!
//! A user's name and address are personal data ([`Personal`]): stored
//! sealed under the user's own key, they read as forgotten once an
//! operator forgets the user (`DELETE /api/users/{id}`). The address is
//! then free again: the sign-up decision counts a sign-up whose address
//! reads as forgotten as no one's (its tag is a hash of the address, so
//! the tags table holds no address either).

use outflow::cqrs_es::event_sink::EventSink;
use outflow::cqrs_es::{Aggregate, DomainEvent};
use outflow::decision::{Decision, StreamId};
use outflow::personal::Personal;
use outflow::tags::{Query, QueryItem, Tagged};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A user of the bank.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Whether the user signed up.
    pub signed_up: bool,
    /// The user's name (personal).
    pub name: Personal<String>,
    /// The user's e-mail address, lower-cased (personal).
    pub email: Personal<String>,
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
        /// The user's name (personal: sealed under the user's key).
        name: Personal<String>,
        /// The user's e-mail address, lower-cased (personal).
        email: Personal<String>,
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
    /// The address is another user's. (It does not quote the address: a
    /// refusal is remembered with the command's outcome, and the address
    /// may be one a forgotten user had.)
    #[error("the address is already taken")]
    EmailTaken,
}

impl Tagged for UserEvent {
    /// A sign-up carries its address, so the uniqueness rule finds it.
    fn tags(&self) -> Vec<String> {
        match self {
            UserEvent::UserSignedUp { email, .. } => email
                .value()
                .map(|email| email_tag(email))
                .into_iter()
                .collect(),
        }
    }
}

/// The tag of the events that hold `email` (lower-cased): a SHA-256 of the
/// address, so that the tags table holds no address. (A hash is not an
/// erasure: whoever has an address can still tell it signed up once.)
pub fn email_tag(email: &str) -> String {
    let digest = Sha256::digest(format!("outflow-bank/email/{email}").as_bytes());
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("email:{hex}")
}

/// A user's name and address checked, the address lower-cased: the rules
/// the aggregate and the sign-up decision share.
///
/// # Errors
///
/// [`UserError::MissingName`], [`UserError::InvalidName`],
/// [`UserError::InvalidEmail`].
pub fn checked(name: &str, email: &str) -> Result<(String, String), UserError> {
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
    Ok((name, email))
}

/// Signs user `user_id` up (see [`Registration`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Register {
    /// The new user's id.
    pub user_id: String,
    /// The user's name.
    pub name: String,
    /// The user's address, as typed.
    pub email: String,
}

/// The sign-up, decided across users: the address must be no other
/// user's, and the user must not have signed up yet.
#[derive(Debug)]
pub struct Registration;

/// What a sign-up depends on: the sign-ups it read.
#[derive(Debug, Default)]
pub struct Registered {
    /// The sign-ups read (of the address asked for, and the user's own):
    /// the user each belongs to, and its address — `None` once that user
    /// was forgotten.
    pub sign_ups: Vec<(Option<String>, Option<String>)>,
}

impl Decision for Registration {
    type Command = Register;
    type Event = UserEvent;
    type State = Registered;
    type Error = UserError;

    fn query(command: &Register) -> Query {
        let own = Query::new().with(QueryItem::stream(User::TYPE, &command.user_id));
        // An address that is no address (refused by `decide`) is no tag.
        match checked(&command.name, &command.email) {
            Ok((_, email)) => {
                own.with(QueryItem::tags([email_tag(&email)]).with_types(["UserSignedUp"]))
            }
            Err(_) => own,
        }
    }

    fn stream(command: &Register) -> StreamId {
        StreamId::new(User::TYPE, command.user_id.clone())
    }

    fn evolve(state: &mut Registered, event: UserEvent) {
        let UserEvent::UserSignedUp { email, .. } = event;
        let user = email.subject().map(str::to_owned);
        state.sign_ups.push((user, email.into_value()));
    }

    fn decide(state: &Registered, command: &Register) -> Result<Vec<UserEvent>, UserError> {
        let (name, email) = checked(&command.name, &command.email)?;
        if state
            .sign_ups
            .iter()
            .any(|(_, address)| address.as_deref() == Some(email.as_str()))
        {
            return Err(UserError::EmailTaken);
        }
        // The user's own sign-up (a forgotten user's id is not given again);
        // a sign-up with another address can only be the user's own.
        let own = state.sign_ups.iter().any(|(user, address)| {
            user.as_deref() == Some(command.user_id.as_str()) || address.is_some()
        });
        if own {
            return Err(UserError::AlreadySignedUp);
        }
        Ok(vec![UserEvent::UserSignedUp {
            name: Personal::new(name),
            email: Personal::new(email),
        }])
    }
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
                let (name, email) = checked(&name, &email)?;
                let event = UserEvent::UserSignedUp {
                    name: Personal::new(name),
                    email: Personal::new(email),
                };
                sink.write(event, self).await;
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
                name: Personal::new("Ann".into()),
                email: Personal::new("ann@example.com".into()),
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
