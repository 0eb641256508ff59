//! Runs the decisions chapter's code on SQLite files: a course never holds
//! more students than its capacity, nor a student more courses than the
//! limit, however many racers; one address, one user; a command sent again
//! with its context is answered from what was remembered.

use std::sync::Arc;

use outflow::store::ConditionalAppend;
use outflow::tags::{Query, QueryItem};
use outflow::{CommandContext, CommandError, SqliteStore};
use outflow_book_examples::decisions::{
    course_tag, email_tag, first_term, open_school, open_users, student_tag, CourseError,
    CourseEvent, DefineCourse, SignUpError, SignUpUser, SubscribeStudent, UserCommand, UserError,
    COURSES_PER_STUDENT,
};

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("outflow-book-{name}-{}", std::process::id()));
    // A directory left by an earlier run with the same process id.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a directory");
    dir
}

fn define(course: &str, capacity: usize) -> DefineCourse {
    DefineCourse {
        course: course.to_owned(),
        capacity,
    }
}

fn subscribe(course: &str, student: &str) -> SubscribeStudent {
    SubscribeStudent {
        course: course.to_owned(),
        student: student.to_owned(),
    }
}

/// The (course, student) pairs of the subscriptions `query` selects, as
/// the store holds them, in log order.
async fn subscriptions(store: &SqliteStore, query: Query) -> Vec<(String, String)> {
    let read = store.read_query(&query, None).await.expect("read by query");
    read.events
        .iter()
        .map(|event| {
            match serde_json::from_value::<CourseEvent>(event.payload.clone()).expect("decodes") {
                CourseEvent::StudentSubscribed { course, student } => (course, student),
                other => panic!("not a subscription: {other:?}"),
            }
        })
        .collect()
}

/// The students subscribed to `course`, in log order.
async fn students_of(store: &SqliteStore, course: &str) -> Vec<String> {
    let query =
        Query::new().with(QueryItem::tags([course_tag(course)]).with_types(["StudentSubscribed"]));
    subscriptions(store, query)
        .await
        .into_iter()
        .map(|(_, student)| student)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_course_refuses_and_the_refusal_is_a_business_outcome() {
    let dir = scratch("decisions-capacity");
    let school = open_school(&dir.join("school.db")).await.expect("open");
    first_term(&school).await.expect("the chapter's first term");
    assert_eq!(students_of(&school.store, "rust-101").await, ["ann", "bob"]);

    let full = school
        .subscriptions
        .execute(subscribe("rust-101", "dan"))
        .await
        .expect_err("no seat left");
    assert!(full.is_refusal(), "{full}");
    assert!(!full.is_conflict(), "{full}");
    assert_eq!(
        full.rejection(),
        Some(&CourseError::CourseFull {
            course: "rust-101".into(),
            capacity: 2
        })
    );
    let twice = school
        .subscriptions
        .execute(subscribe("rust-101", "ann"))
        .await
        .expect_err("already there");
    assert_eq!(twice.rejection(), Some(&CourseError::AlreadySubscribed));
    let nowhere = school
        .subscriptions
        .execute(subscribe("go-101", "ann"))
        .await
        .expect_err("no such course");
    assert_eq!(
        nowhere.rejection(),
        Some(&CourseError::NoSuchCourse("go-101".into()))
    );
    let redefined = school
        .courses
        .execute(define("rust-101", 30))
        .await
        .expect_err("defined once");
    assert_eq!(
        redefined.rejection(),
        Some(&CourseError::AlreadyDefined("rust-101".into()))
    );

    // What a decision for dan would be decided on: the course's definition
    // and its two subscriptions (dan has none). The refusals wrote no event.
    let (_, read) = school
        .subscriptions
        .state(&subscribe("rust-101", "dan"))
        .await
        .expect("state");
    let types: Vec<&str> = read.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        ["CourseDefined", "StudentSubscribed", "StudentSubscribed"]
    );
    assert_eq!(students_of(&school.store, "rust-101").await, ["ann", "bob"]);

    school.store.close().await;
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_student_takes_at_most_the_limit() {
    let dir = scratch("decisions-limit");
    let school = open_school(&dir.join("school.db")).await.expect("open");
    let courses: Vec<String> = (0..=COURSES_PER_STUDENT)
        .map(|i| format!("course-{i}"))
        .collect();
    for course in &courses {
        school
            .courses
            .execute(define(course, 10))
            .await
            .expect("define");
    }
    for course in &courses[..COURSES_PER_STUDENT] {
        school
            .subscriptions
            .execute(subscribe(course, "ann"))
            .await
            .expect("within the limit");
    }
    let last = &courses[COURSES_PER_STUDENT];
    let over = school
        .subscriptions
        .execute(subscribe(last, "ann"))
        .await
        .expect_err("over the limit");
    assert!(over.is_refusal(), "{over}");
    assert_eq!(
        over.rejection(),
        Some(&CourseError::TooManyCourses {
            student: "ann".into(),
            limit: COURSES_PER_STUDENT
        })
    );
    // The course has seats: another student gets in.
    school
        .subscriptions
        .execute(subscribe(last, "bob"))
        .await
        .expect("bob has room");

    let of_ann =
        Query::new().with(QueryItem::tags([student_tag("ann")]).with_types(["StudentSubscribed"]));
    let taken = subscriptions(&school.store, of_ann).await;
    let expected: Vec<(String, String)> = courses[..COURSES_PER_STUDENT]
        .iter()
        .map(|course| (course.clone(), "ann".to_owned()))
        .collect();
    assert_eq!(taken, expected);
    assert_eq!(students_of(&school.store, last).await, ["bob"]);

    school.store.close().await;
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racers_never_overfill_a_course() {
    let dir = scratch("decisions-race");
    let school = Arc::new(open_school(&dir.join("school.db")).await.expect("open"));
    // ANCHOR: race
    const RACERS: usize = 8;
    const SEATS: usize = 3;
    let mut decided_again = 0;
    for round in 0..50 {
        let course = format!("race-{round}");
        school
            .courses
            .execute(define(&course, SEATS))
            .await
            .expect("define");
        // Eight students at once for three seats.
        let racers: Vec<_> = (0..RACERS)
            .map(|i| {
                let school = school.clone();
                let command = subscribe(&course, &format!("r{round}-s{i}"));
                tokio::spawn(async move { school.subscriptions.execute(command).await })
            })
            .collect();
        let mut admitted = 0;
        for racer in racers {
            match racer.await.expect("a racer panicked") {
                Ok(done) => {
                    admitted += 1;
                    if done.attempts > 1 {
                        decided_again += 1;
                    }
                }
                // Losing a race is never an error: the loser reads again,
                // finds the course full and is refused.
                Err(error) => assert!(
                    matches!(error.rejection(), Some(CourseError::CourseFull { .. })),
                    "round {round}: {error}"
                ),
            }
        }
        assert_eq!(admitted, SEATS, "round {round}");
        assert_eq!(
            students_of(&school.store, &course).await.len(),
            SEATS,
            "round {round}"
        );
    }
    // ANCHOR_END: race
    eprintln!("{decided_again} admitted racers had lost a race first");
    school.store.close().await;
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_one_user() {
    let dir = scratch("decisions-email");
    let users = Arc::new(open_users(&dir.join("users.db")).await.expect("open"));
    let mut last_winner = None;
    for round in 0..20 {
        let address = format!("ann.{round}@example.com");
        // The same address, written two ways, for two users at once.
        let sign_ups = [
            SignUpUser::new(&format!("u{round}-a"), "Ann", &address).expect("valid"),
            SignUpUser::new(&format!("u{round}-b"), "Anne", &address.to_uppercase())
                .expect("valid"),
        ];
        let racers: Vec<_> = sign_ups
            .into_iter()
            .map(|command| {
                let users = users.clone();
                tokio::spawn(async move { users.sign_ups.execute(command).await })
            })
            .collect();
        let mut winners = Vec::new();
        for racer in racers {
            match racer.await.expect("a racer panicked") {
                Ok(done) => winners.push(done.events[0].aggregate_id.clone()),
                Err(error) => assert_eq!(
                    error.rejection(),
                    Some(&SignUpError::EmailTaken(address.clone())),
                    "round {round}: {error}"
                ),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let winner = winners.remove(0);
        let loser = if winner.ends_with("-a") {
            format!("u{round}-b")
        } else {
            format!("u{round}-a")
        };
        // The aggregate loads the decision's event from its stream.
        let (user, version) = users.users.load(&winner).await.expect("load");
        assert!(user.signed_up && user.email == address, "{user:?}");
        assert_eq!(version, 1);
        let (nobody, version) = users.users.load(&loser).await.expect("load");
        assert!(!nobody.signed_up && version == 0, "{nobody:?}");
        let holders = users
            .store
            .read_query(
                &Query::new().with(QueryItem::tags([email_tag(&address)])),
                None,
            )
            .await
            .expect("read");
        assert_eq!(holders.events.len(), 1, "round {round}");
        last_winner = Some((winner, loser));
    }

    // The aggregate's own commands, through its tagged bus.
    let (winner, loser) = last_winner.expect("twenty rounds");
    users
        .users
        .execute(
            &winner,
            UserCommand::Rename {
                name: "Ann Smith".into(),
            },
        )
        .await
        .expect("renamed");
    let refused = users
        .users
        .execute(
            &loser,
            UserCommand::Rename {
                name: "Anne".into(),
            },
        )
        .await
        .expect_err("never signed up");
    assert_eq!(refused.rejection(), Some(&UserError::NotSignedUp));
    // The user's stream is one query among others: the decision's event
    // and the aggregate's.
    let stream = users
        .store
        .read_query(&Query::new().with(QueryItem::stream("user", &winner)), None)
        .await
        .expect("read the stream by its tag");
    let types: Vec<&str> = stream
        .events
        .iter()
        .map(|e| e.event_type.as_str())
        .collect();
    assert_eq!(types, ["UserSignedUp", "UserRenamed"]);
    let (user, _) = users.users.load(&winner).await.expect("load");
    assert_eq!(user.name, "Ann Smith");
    // A signed-up user cannot sign up again, under another address either.
    let again = users
        .sign_ups
        .execute(SignUpUser::new(&winner, "Ann", "elsewhere@example.com").expect("valid"))
        .await
        .expect_err("already signed up");
    assert_eq!(again.rejection(), Some(&SignUpError::AlreadySignedUp));
    // The loser may take another address.
    users
        .sign_ups
        .execute(SignUpUser::new(&loser, "Anne", "anne@example.com").expect("valid"))
        .await
        .expect("a free address");
    // An address that could not be a tag never reaches a query.
    assert_eq!(
        SignUpUser::new("u-x", "X", "not an address").err(),
        Some(SignUpError::InvalidEmail("not an address".into()))
    );

    users.store.close().await;
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_again_is_answered_from_memory() {
    let dir = scratch("decisions-once");
    let users = open_users(&dir.join("users.db")).await.expect("open");
    let command = SignUpUser::new("u-1", "Ann", "ann@example.com").expect("valid");
    let context = CommandContext::new();
    let first = users
        .sign_ups
        .execute_with(command.clone(), context.clone())
        .await
        .expect("signed up");
    assert!(!first.repeated);
    assert_eq!((first.attempts, first.events.len()), (1, 1));
    let again = users
        .sign_ups
        .execute_with(command, context)
        .await
        .expect("answered again");
    assert!(again.repeated);
    assert_eq!(again.attempts, 0);
    assert!(again.payloads.is_empty());
    let first_ids: Vec<_> = first.events.iter().map(|e| e.event_id).collect();
    let again_ids: Vec<_> = again.events.iter().map(|e| e.event_id).collect();
    assert_eq!(again_ids, first_ids);
    // Nothing new was written.
    let (_, version) = users.users.load("u-1").await.expect("load");
    assert_eq!(version, 1);
    let holders = users
        .store
        .read_query(
            &Query::new().with(QueryItem::tags([email_tag("ann@example.com")])),
            None,
        )
        .await
        .expect("read");
    assert_eq!(holders.events.len(), 1);
    // A new context is a new command, and the rule answers it.
    let other = users
        .sign_ups
        .execute(SignUpUser::new("u-2", "Ann", "ann@example.com").expect("valid"))
        .await
        .expect_err("taken");
    assert!(other.is_refusal());
    users.store.close().await;

    // A refusal is remembered too: the same context gets it again after
    // the world changed; a new one is decided afresh.
    let school = open_school(&dir.join("school.db")).await.expect("open");
    let context = CommandContext::new();
    let early = school
        .subscriptions
        .execute_with(subscribe("algebra", "ann"), context.clone())
        .await
        .expect_err("no course yet");
    assert!(matches!(
        early,
        CommandError::Rejected(CourseError::NoSuchCourse(_))
    ));
    school
        .courses
        .execute(define("algebra", 10))
        .await
        .expect("define");
    let remembered = school
        .subscriptions
        .execute_with(subscribe("algebra", "ann"), context)
        .await
        .expect_err("the first answer");
    assert!(
        matches!(remembered, CommandError::Refused(_)),
        "{remembered}"
    );
    assert_eq!(
        remembered.refusal_message().as_deref(),
        Some("no course algebra")
    );
    school
        .subscriptions
        .execute(subscribe("algebra", "ann"))
        .await
        .expect("a new command");
    assert_eq!(students_of(&school.store, "algebra").await, ["ann"]);
    school.store.close().await;
    std::fs::remove_dir_all(&dir).expect("clean up");
}
