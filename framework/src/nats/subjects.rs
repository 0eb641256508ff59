//! Names as NATS subject tokens, two ways, each for its reader.
//!
//! - [`stream_token`] is **reversible**: the event store encodes aggregate
//!   types and ids into the subjects it stores events under and must tell
//!   distinct names apart (`a.b` and `a_b` must not share a subject), so every
//!   byte outside `[A-Za-z0-9-]` is escaped.
//! - [`subject_token`] is **readable**: the relay publishes events for other
//!   services to subscribe to (`bank.bank_account.Deposited`), where a person
//!   writes the subject by hand; it replaces only what NATS forbids in a
//!   token, and two names may share a token (subscribers filter on the
//!   headers when that matters).

/// Encodes a name as one NATS subject token, reversibly: ASCII letters,
/// digits and `-` stay; every other byte (of its UTF-8) becomes `_` and two
/// lower-case hex digits; the empty name becomes `_`. Distinct names give
/// distinct tokens.
///
/// ```
/// use outflow::store::jetstream::stream_token;
/// assert_eq!(stream_token("account-7"), "account-7");
/// assert_eq!(stream_token("a.b"), "a_2eb");
/// assert_eq!(stream_token("a_b"), "a_5fb");
/// assert_eq!(stream_token(""), "_");
/// ```
pub fn stream_token(name: &str) -> String {
    if name.is_empty() {
        return "_".to_owned();
    }
    let mut token = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            token.push(char::from(byte));
        } else {
            token.push_str(&format!("_{byte:02x}"));
        }
    }
    token
}

/// Makes `name` usable as one token of a NATS subject, readably (see the
/// module documentation): whitespace, `.`, `*`, `>` and control characters
/// become `_`, and an empty name becomes `_`.
///
/// ```
/// use outflow::relay::subject_token;
/// assert_eq!(subject_token("bank account"), "bank_account");
/// assert_eq!(subject_token("Money.Deposited*"), "Money_Deposited_");
/// assert_eq!(subject_token(">"), "_");
/// assert_eq!(subject_token(""), "_");
/// assert_eq!(subject_token("AccountOpened"), "AccountOpened");
/// ```
pub fn subject_token(name: &str) -> String {
    if name.is_empty() {
        return "_".to_owned();
    }
    name.chars()
        .map(|c| {
            if c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>') {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// Checks that `subject` can be published to: not empty, no whitespace or
/// control characters, no empty token, no wildcard.
///
/// # Errors
///
/// The reason, when it cannot.
pub fn validate_subject(subject: &str) -> Result<(), &'static str> {
    if subject.is_empty() {
        return Err("empty subject");
    }
    if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace or control characters");
    }
    for token in subject.split('.') {
        if token.is_empty() {
            return Err("has an empty token (leading, trailing or double `.`)");
        }
        if token == "*" || token == ">" {
            return Err("contains a wildcard token");
        }
    }
    Ok(())
}

/// Whether `name` can name a stream (no whitespace, `.`, `*`, `>`, `/` or
/// `\`, not empty).
pub(crate) fn valid_stream_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(|c: char| c.is_whitespace() || ".*>/\\".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_tokens_replace_only_what_nats_forbids() {
        assert_eq!(subject_token("a b\tc"), "a_b_c");
        assert_eq!(subject_token("x.y"), "x_y");
        assert_eq!(subject_token("äöü"), "äöü");
    }

    #[test]
    fn subjects_are_validated() {
        assert!(validate_subject("a.b.c").is_ok());
        assert!(validate_subject("").is_err());
        assert!(validate_subject("a..b").is_err());
        assert!(validate_subject(".a").is_err());
        assert!(validate_subject("a.").is_err());
        assert!(validate_subject("a.*").is_err());
        assert!(validate_subject("a.>").is_err());
        assert!(validate_subject("a b").is_err());
    }

    #[test]
    fn reversible_tokens_keep_distinct_names_apart() {
        let names = ["a.b", "a_b", "a b", "a-b", "ab", "", "_", "ä"];
        let tokens: std::collections::HashSet<String> =
            names.iter().map(|name| stream_token(name)).collect();
        assert_eq!(tokens.len(), names.len());
        assert!(tokens.iter().all(|t| validate_subject(t).is_ok()));
    }
}
