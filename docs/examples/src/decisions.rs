//! The decisions chapter (`docs/src/decisions.md`): rules that span
//! aggregates, decided on the events a query selects. A course catalogue
//! whose subscriptions respect both a course's capacity and a student's
//! limit, and a sign-up whose e-mail address must be unique, with a `User`
//! aggregate taking part. Both run on a SQLite file; `tests/decisions.rs`
//! runs them, racing.

// ANCHOR: course_events
use outflow::decision::{Decision, DecisionBus, StreamId};
use outflow::prelude::*;
use outflow::tags::{Query, QueryItem, Tagged};
use serde::{Deserialize, Serialize};

/// The tag of every event about course `course`.
pub fn course_tag(course: &str) -> String {
    format!("course:{course}")
}

/// The tag of every event about student `student`.
pub fn student_tag(student: &str) -> String {
    format!("student:{student}")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CourseEvent {
    CourseDefined { course: String, capacity: usize },
    StudentSubscribed { course: String, student: String },
}

impl DomainEvent for CourseEvent {
    fn event_type(&self) -> String {
        match self {
            CourseEvent::CourseDefined { .. } => "CourseDefined",
            CourseEvent::StudentSubscribed { .. } => "StudentSubscribed",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// What each event is about: stored with it, and what queries select by.
impl Tagged for CourseEvent {
    fn tags(&self) -> Vec<String> {
        match self {
            CourseEvent::CourseDefined { course, .. } => vec![course_tag(course)],
            CourseEvent::StudentSubscribed { course, student } => {
                vec![course_tag(course), student_tag(student)]
            }
        }
    }
}
// ANCHOR_END: course_events

// ANCHOR: course_errors
/// Why a course command was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum CourseError {
    AlreadyDefined(String),
    NoSuchCourse(String),
    CourseFull { course: String, capacity: usize },
    TooManyCourses { student: String, limit: usize },
    AlreadySubscribed,
}

impl std::fmt::Display for CourseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CourseError::AlreadyDefined(course) => write!(f, "course {course} already exists"),
            CourseError::NoSuchCourse(course) => write!(f, "no course {course}"),
            CourseError::CourseFull { course, capacity } => {
                write!(f, "course {course} is full ({capacity} students)")
            }
            CourseError::TooManyCourses { student, limit } => {
                write!(f, "{student} already takes {limit} courses")
            }
            CourseError::AlreadySubscribed => f.write_str("already subscribed"),
        }
    }
}

impl std::error::Error for CourseError {}
// ANCHOR_END: course_errors

// ANCHOR: define_course
/// Defines a course once: decided on the course's own definition.
#[derive(Debug)]
pub struct CourseDefinition;

#[derive(Debug, Clone)]
pub struct DefineCourse {
    pub course: String,
    pub capacity: usize,
}

impl Decision for CourseDefinition {
    type Command = DefineCourse;
    type Event = CourseEvent;
    /// Whether the course was defined before.
    type State = bool;
    type Error = CourseError;

    fn query(command: &DefineCourse) -> Query {
        Query::new()
            .with(QueryItem::tags([course_tag(&command.course)]).with_types(["CourseDefined"]))
    }

    fn stream(command: &DefineCourse) -> StreamId {
        StreamId::new("course", command.course.clone())
    }

    fn evolve(defined: &mut bool, _event: CourseEvent) {
        *defined = true;
    }

    fn decide(defined: &bool, command: &DefineCourse) -> Result<Vec<CourseEvent>, CourseError> {
        if *defined {
            return Err(CourseError::AlreadyDefined(command.course.clone()));
        }
        Ok(vec![CourseEvent::CourseDefined {
            course: command.course.clone(),
            capacity: command.capacity,
        }])
    }
}
// ANCHOR_END: define_course

// ANCHOR: subscription
/// How many courses one student may take.
pub const COURSES_PER_STUDENT: usize = 3;

/// Subscribes a student to a course: at most the course's capacity of
/// students per course, at most `COURSES_PER_STUDENT` courses per student,
/// both decided at once.
#[derive(Debug)]
pub struct Subscription;

#[derive(Debug, Clone)]
pub struct SubscribeStudent {
    pub course: String,
    pub student: String,
}

/// What the query's events say. `evolve` is not told which item an event
/// matched, nor the command: it keeps the facts, and `decide` counts.
#[derive(Debug, Default)]
pub struct Enrolment {
    /// The course's capacity; `None` while it is not defined.
    capacity: Option<usize>,
    /// (course, student) of each subscription read: the course's and the
    /// student's, each once.
    subscriptions: Vec<(String, String)>,
}

impl Decision for Subscription {
    type Command = SubscribeStudent;
    type Event = CourseEvent;
    type State = Enrolment;
    type Error = CourseError;

    /// The course (its definition and its subscriptions) or the student
    /// (their subscriptions): the boundary of this one command.
    fn query(command: &SubscribeStudent) -> Query {
        Query::new()
            .with(
                QueryItem::tags([course_tag(&command.course)])
                    .with_types(["CourseDefined", "StudentSubscribed"]),
            )
            .with(
                QueryItem::tags([student_tag(&command.student)]).with_types(["StudentSubscribed"]),
            )
    }

    /// A stream of the decision's own, one per subscription.
    fn stream(command: &SubscribeStudent) -> StreamId {
        StreamId::new(
            "subscription",
            format!("{}/{}", command.course, command.student),
        )
    }

    fn evolve(state: &mut Enrolment, event: CourseEvent) {
        match event {
            CourseEvent::CourseDefined { capacity, .. } => state.capacity = Some(capacity),
            CourseEvent::StudentSubscribed { course, student } => {
                state.subscriptions.push((course, student))
            }
        }
    }

    fn decide(
        state: &Enrolment,
        command: &SubscribeStudent,
    ) -> Result<Vec<CourseEvent>, CourseError> {
        let Some(capacity) = state.capacity else {
            return Err(CourseError::NoSuchCourse(command.course.clone()));
        };
        let (course, student) = (&command.course, &command.student);
        if state
            .subscriptions
            .iter()
            .any(|(c, s)| c == course && s == student)
        {
            return Err(CourseError::AlreadySubscribed);
        }
        let in_course = state
            .subscriptions
            .iter()
            .filter(|(c, _)| c == course)
            .count();
        if in_course >= capacity {
            return Err(CourseError::CourseFull {
                course: course.clone(),
                capacity,
            });
        }
        let taken = state
            .subscriptions
            .iter()
            .filter(|(_, s)| s == student)
            .count();
        if taken >= COURSES_PER_STUDENT {
            return Err(CourseError::TooManyCourses {
                student: student.clone(),
                limit: COURSES_PER_STUDENT,
            });
        }
        Ok(vec![CourseEvent::StudentSubscribed {
            course: course.clone(),
            student: student.clone(),
        }])
    }
}
// ANCHOR_END: subscription

// ANCHOR: school
use std::path::Path;

/// The catalogue's two decision buses over one SQLite file.
pub struct School {
    pub store: SqliteStore,
    pub courses: DecisionBus<CourseDefinition, SqliteStore>,
    pub subscriptions: DecisionBus<Subscription, SqliteStore>,
}

pub async fn open_school(file: &Path) -> Result<School, StoreError> {
    // Opening applies the migrations, the tags table's among them.
    let store = SqliteStore::open(file).await?;
    Ok(School {
        courses: DecisionBus::new(store.clone()),
        subscriptions: DecisionBus::new(store.clone()),
        store,
    })
}
// ANCHOR_END: school

// ANCHOR: first_term
/// Two seats, three students: the third is refused, whatever the timing.
pub async fn first_term(school: &School) -> Result<(), Box<dyn std::error::Error>> {
    school
        .courses
        .execute(DefineCourse {
            course: "rust-101".into(),
            capacity: 2,
        })
        .await?;
    for student in ["ann", "bob"] {
        let done = school
            .subscriptions
            .execute(SubscribeStudent {
                course: "rust-101".into(),
                student: student.into(),
            })
            .await?;
        // Where its event stands in the log, for `runner.wait_for`.
        assert!(done.checkpoint().is_some());
    }
    let third = school
        .subscriptions
        .execute(SubscribeStudent {
            course: "rust-101".into(),
            student: "cleo".into(),
        })
        .await;
    match third {
        Err(refused) if refused.is_refusal() => {
            // `rejection()` is the decision's own error.
            assert!(matches!(
                refused.rejection(),
                Some(CourseError::CourseFull { capacity: 2, .. })
            ));
        }
        other => return Err(format!("expected a refusal, got {other:?}").into()),
    }
    Ok(())
}
// ANCHOR_END: first_term

// ANCHOR: user
/// A user: signed up by the `SignUp` decision, then changed by its own
/// commands.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct User {
    pub signed_up: bool,
    pub name: String,
    pub email: String,
}

#[derive(Debug)]
pub enum UserCommand {
    Rename { name: String },
}

/// `UserSignedUp` is written by the `SignUp` decision, into the user's
/// stream; the aggregate writes the others.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum UserEvent {
    UserSignedUp { name: String, email: String },
    UserRenamed { name: String },
}

impl DomainEvent for UserEvent {
    fn event_type(&self) -> String {
        match self {
            UserEvent::UserSignedUp { .. } => "UserSignedUp",
            UserEvent::UserRenamed { .. } => "UserRenamed",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// The tag of the events that hold address `email`.
pub fn email_tag(email: &str) -> String {
    format!("email:{}", email.to_lowercase())
}

impl Tagged for UserEvent {
    fn tags(&self) -> Vec<String> {
        match self {
            UserEvent::UserSignedUp { email, .. } => vec![email_tag(email)],
            // Only the stream's tag, `user:<id>`, which every tagged
            // append adds.
            UserEvent::UserRenamed { .. } => Vec::new(),
        }
    }
}

#[derive(Debug, PartialEq)]
pub enum UserError {
    NotSignedUp,
    MissingName,
}

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UserError::NotSignedUp => "no such user",
            UserError::MissingName => "a name is required",
        })
    }
}

impl std::error::Error for UserError {}

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
            UserCommand::Rename { name } => {
                if !self.signed_up {
                    return Err(UserError::NotSignedUp);
                }
                let name = name.trim().to_owned();
                if name.is_empty() {
                    return Err(UserError::MissingName);
                }
                sink.write(UserEvent::UserRenamed { name }, self).await;
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
            UserEvent::UserRenamed { name } => self.name = name,
        }
    }
}
// ANCHOR_END: user

// ANCHOR: sign_up
/// One user per e-mail address, decided on every sign-up with that address.
#[derive(Debug)]
pub struct SignUp;

/// A sign-up, checked when it is made: its address is lower-cased and
/// plausible, and its user id short, so their tags are valid before any
/// query runs.
#[derive(Debug, Clone)]
pub struct SignUpUser {
    user_id: String,
    name: String,
    email: String,
}

impl SignUpUser {
    pub fn new(user_id: &str, name: &str, email: &str) -> Result<Self, SignUpError> {
        let (name, email) = (name.trim(), email.trim().to_lowercase());
        if user_id.is_empty() || user_id.len() > 64 || user_id.contains(char::is_control) {
            return Err(SignUpError::InvalidUserId(user_id.to_owned()));
        }
        if name.is_empty() {
            return Err(SignUpError::MissingName);
        }
        let plausible = email.len() <= 254
            && !email.chars().any(|c| c.is_control() || c.is_whitespace())
            && matches!(email.split_once('@'), Some((local, domain))
                if !local.is_empty() && domain.contains('.') && !domain.contains('@'));
        if !plausible {
            return Err(SignUpError::InvalidEmail(email));
        }
        Ok(SignUpUser {
            user_id: user_id.to_owned(),
            name: name.to_owned(),
            email,
        })
    }

    pub fn email(&self) -> &str {
        &self.email
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum SignUpError {
    InvalidUserId(String),
    MissingName,
    InvalidEmail(String),
    EmailTaken(String),
    AlreadySignedUp,
}

impl std::fmt::Display for SignUpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SignUpError::InvalidUserId(id) => write!(f, "`{id}` is not a user id"),
            SignUpError::MissingName => f.write_str("a name is required"),
            SignUpError::InvalidEmail(email) => write!(f, "`{email}` is not an e-mail address"),
            SignUpError::EmailTaken(email) => write!(f, "the address {email} is already taken"),
            SignUpError::AlreadySignedUp => f.write_str("the user already signed up"),
        }
    }
}

impl std::error::Error for SignUpError {}

impl Decision for SignUp {
    type Command = SignUpUser;
    type Event = UserEvent;
    /// The addresses of the sign-ups read.
    type State = Vec<String>;
    type Error = SignUpError;

    /// Every sign-up with this address, whichever user's stream holds it,
    /// and the user's own stream, written by the decision or the aggregate.
    fn query(command: &SignUpUser) -> Query {
        Query::new()
            .with(QueryItem::tags([email_tag(&command.email)]).with_types(["UserSignedUp"]))
            .with(QueryItem::stream(User::TYPE, &command.user_id))
    }

    /// The user's own stream: the aggregate loads the sign-up from there.
    fn stream(command: &SignUpUser) -> StreamId {
        StreamId::new(User::TYPE, command.user_id.clone())
    }

    fn evolve(addresses: &mut Vec<String>, event: UserEvent) {
        if let UserEvent::UserSignedUp { email, .. } = event {
            addresses.push(email);
        }
    }

    fn decide(
        addresses: &Vec<String>,
        command: &SignUpUser,
    ) -> Result<Vec<UserEvent>, SignUpError> {
        if addresses.contains(&command.email) {
            return Err(SignUpError::EmailTaken(command.email.clone()));
        }
        // Another address can only come from the user's own stream.
        if !addresses.is_empty() {
            return Err(SignUpError::AlreadySignedUp);
        }
        Ok(vec![UserEvent::UserSignedUp {
            name: command.name.clone(),
            email: command.email.clone(),
        }])
    }
}
// ANCHOR_END: sign_up

// ANCHOR: users
/// Sign-ups by decision, everything else by the aggregate, on one file.
pub struct Users {
    pub store: SqliteStore,
    pub sign_ups: DecisionBus<SignUp, SqliteStore>,
    pub users: CommandBus<User, SqliteStore>,
}

pub async fn open_users(file: &Path) -> Result<Users, StoreError> {
    let store = SqliteStore::open(file).await?;
    Ok(Users {
        sign_ups: DecisionBus::new(store.clone()),
        // `tag_events`: the aggregate's appends carry their tags and
        // `user:<id>`, so queries find them and conditions see them.
        users: CommandBus::<User, _>::builder(store.clone(), ())
            .tag_events()
            .build(),
        store,
    })
}
// ANCHOR_END: users
