//! Decisions across aggregates on every backend that offers conditional
//! appends (memory, PostgreSQL, SQLite): tags stored and read by query,
//! conditions that fail exactly when a matching event was appended after
//! the read, the decision bus's remembered outcomes and inline handlers,
//! aggregates whose buses tag their events taking part, and racing
//! deciders that never break a course's capacity or a student's limit.

use outflow_tests as common;

use std::collections::HashMap;
use std::sync::Arc;

use outflow::cqrs_es::event_sink::EventSink;
use outflow::cqrs_es::{Aggregate, DomainEvent};
use outflow::decision::{Decision, DecisionBus, DecisionHandler, StreamId};
use outflow::store::{AppendCondition, ConditionalAppend, ReadPosition};
use outflow::tags::{Query, QueryItem, Tagged};
use outflow::{
    AppendRequest, Checkpoint, CommandBus, CommandContext, CommandError, EventLog, HandlerError,
    LogFilter, NewEvent, RecordedEvent, StoreError, Transactional,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

// ---------------------------------------------------------------- the model

/// A course's capacity and a student's limit, both decided at once.
struct Subscribe;

#[derive(Debug, Clone)]
struct SubscribeStudent {
    student: u32,
    course: u32,
    capacity: usize,
    limit: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum CourseEvent {
    StudentSubscribed { student: u32, course: u32 },
}

impl DomainEvent for CourseEvent {
    fn event_type(&self) -> String {
        "StudentSubscribed".into()
    }

    fn event_version(&self) -> String {
        "1".into()
    }
}

impl Tagged for CourseEvent {
    fn tags(&self) -> Vec<String> {
        let CourseEvent::StudentSubscribed { student, course } = self;
        vec![format!("course:{course}"), format!("student:{student}")]
    }
}

#[derive(Debug, PartialEq, thiserror::Error)]
enum Refused {
    #[error("the course is full")]
    Full,
    #[error("the student takes too many courses")]
    TooMany,
    #[error("already subscribed")]
    Already,
}

impl Decision for Subscribe {
    type Command = SubscribeStudent;
    type Event = CourseEvent;
    /// (student, course) of every subscription read.
    type State = Vec<(u32, u32)>;
    type Error = Refused;

    fn query(command: &SubscribeStudent) -> Query {
        Query::new()
            .with(
                QueryItem::tags([format!("course:{}", command.course)])
                    .with_types(["StudentSubscribed"]),
            )
            .with(
                QueryItem::tags([format!("student:{}", command.student)])
                    .with_types(["StudentSubscribed"]),
            )
    }

    fn stream(command: &SubscribeStudent) -> StreamId {
        StreamId::new(
            "subscription",
            format!("{}-{}", command.course, command.student),
        )
    }

    fn evolve(state: &mut Self::State, event: CourseEvent) {
        let CourseEvent::StudentSubscribed { student, course } = event;
        state.push((student, course));
    }

    fn decide(
        subscriptions: &Self::State,
        command: &SubscribeStudent,
    ) -> Result<Vec<CourseEvent>, Refused> {
        if subscriptions
            .iter()
            .any(|&(s, c)| s == command.student && c == command.course)
        {
            return Err(Refused::Already);
        }
        let in_course = subscriptions
            .iter()
            .filter(|(_, c)| *c == command.course)
            .count();
        if in_course >= command.capacity {
            return Err(Refused::Full);
        }
        let of_student = subscriptions
            .iter()
            .filter(|(s, _)| *s == command.student)
            .count();
        if of_student >= command.limit {
            return Err(Refused::TooMany);
        }
        Ok(vec![CourseEvent::StudentSubscribed {
            student: command.student,
            course: command.course,
        }])
    }
}

// ------------------------------------------------------------- the helpers

fn event(event_type: &str) -> NewEvent {
    NewEvent::new(event_type, json!({ event_type: {} }))
}

fn tags(list: &[&str]) -> Vec<Vec<String>> {
    vec![list.iter().map(|t| (*t).to_owned()).collect()]
}

fn request(stream: &str, version: u64, event_type: &str) -> AppendRequest {
    AppendRequest::new("thing", stream, version, vec![event(event_type)])
}

fn course(id: u32) -> Query {
    Query::new().with(QueryItem::tags([format!("course:{id}")]))
}

async fn subscribed<S: ConditionalAppend>(store: &S, query: &Query) -> Vec<(u32, u32)> {
    store
        .read_query(query, None)
        .await
        .expect("read by query")
        .events
        .iter()
        .map(|e| {
            let CourseEvent::StudentSubscribed { student, course } =
                serde_json::from_value(e.payload.clone()).expect("a subscription");
            (student, course)
        })
        .collect()
}

// ------------------------------------------------------------- the suites

/// Tags are stored with the events, a query selects by types and by every
/// tag of an item, in log order, with the stream's tag added; untagged
/// appends carry none.
async fn tags_and_queries<S: ConditionalAppend + EventLog + Clone>(store: S) {
    store
        .append_if(
            request("a", 0, "Opened"),
            tags(&["course:1", "student:1"]),
            None,
        )
        .await
        .expect("tagged append");
    store
        .append(request("b", 0, "Opened"))
        .await
        .expect("plain append");
    store
        .append_if(request("c", 0, "Closed"), tags(&["course:1"]), None)
        .await
        .expect("tagged append");
    store
        .append_if(request("a", 1, "Closed"), tags(&["student:1"]), None)
        .await
        .expect("tagged append");

    let ids = |events: &[RecordedEvent]| -> Vec<(String, u64)> {
        events
            .iter()
            .map(|e| (e.aggregate_id.clone(), e.sequence))
            .collect()
    };
    let read = store.read_query(&course(1), None).await.expect("read");
    assert_eq!(ids(&read.events), [("a".into(), 1), ("c".into(), 1)]);
    assert_eq!(read.position.checkpoint(), read.events[1].checkpoint());
    let both = Query::new().with(QueryItem::tags(["course:1", "student:1"]));
    let read = store.read_query(&both, None).await.expect("read");
    assert_eq!(ids(&read.events), [("a".into(), 1)]);
    let typed = Query::new().with(QueryItem::tags(["student:1"]).with_types(["Closed"]));
    let read = store.read_query(&typed, None).await.expect("read");
    assert_eq!(ids(&read.events), [("a".into(), 2)]);
    let either = Query::new()
        .with(QueryItem::tags(["course:1"]).with_types(["Closed"]))
        .with(QueryItem::stream("thing", "a"));
    let read = store
        .read_query(&either, Some(("thing", "a")))
        .await
        .expect("read");
    assert_eq!(
        ids(&read.events),
        [("a".into(), 1), ("c".into(), 1), ("a".into(), 2)]
    );
    assert_eq!(read.stream_version, 2);
    // Types alone find untagged events too.
    let opened = Query::new().with(QueryItem::types(["Opened"]));
    let read = store.read_query(&opened, None).await.expect("read");
    assert_eq!(ids(&read.events), [("a".into(), 1), ("b".into(), 1)]);
    // The plain append has no stream tag.
    let b = Query::new().with(QueryItem::stream("thing", "b"));
    assert!(store
        .read_query(&b, None)
        .await
        .expect("read")
        .events
        .is_empty());
    assert!(store
        .read_query(&Query::new(), Some(("thing", "zzz")))
        .await
        .expect("read")
        .events
        .is_empty());

    // The log, filtered by a query: what a projection of these events reads.
    let filter = LogFilter::all().with_query(course(1));
    let head = store.committed_head().await.expect("the head");
    let logged = common::read_until(&store, Checkpoint::START, &filter, 2).await;
    assert_eq!(ids(&logged), [("a".into(), 1), ("c".into(), 1)]);
    let counted = store
        .count_events(&filter, Checkpoint::START, head, 100)
        .await
        .expect("count");
    assert_eq!(counted, 2);
    let typed_filter = LogFilter::aggregate_types(["thing"]).with_query(typed.clone());
    let logged = common::read_until(&store, Checkpoint::START, &typed_filter, 1).await;
    assert_eq!(ids(&logged), [("a".into(), 2)]);

    // Bad tags and queries are refused, writing nothing.
    let bad = store
        .append_if(request("d", 0, "Opened"), tags(&[""]), None)
        .await
        .expect_err("an empty tag");
    assert!(matches!(bad, StoreError::InvalidQuery { .. }), "{bad}");
    let long = "x".repeat(outflow::tags::MAX_TAG_BYTES + 1);
    let bad = store
        .read_query(&Query::new().with(QueryItem::tags([long])), None)
        .await
        .expect_err("a long tag");
    assert!(matches!(bad, StoreError::InvalidQuery { .. }), "{bad}");
    let written = store
        .read_stream("thing", "d", 0, 10)
        .await
        .expect("read the stream");
    assert!(written.is_empty(), "nothing written");
}

/// A condition fails exactly when an event matching its query was appended
/// after the read: not for other tags, other types, or the writer's own
/// earlier events; and a failed append writes nothing.
async fn conditions<S: ConditionalAppend + Clone>(store: S) {
    let query = Query::new().with(QueryItem::tags(["course:7"]).with_types(["Subscribed"]));
    let read = store.read_query(&query, None).await.expect("read");
    assert!(read.events.is_empty());
    let condition = AppendCondition::new(query.clone(), read.position.clone());

    // Not matching: another tag, another type, no tag.
    store
        .append_if(request("x", 0, "Subscribed"), tags(&["course:8"]), None)
        .await
        .expect("other tag");
    store
        .append_if(request("y", 0, "Unsubscribed"), tags(&["course:7"]), None)
        .await
        .expect("other type");
    store
        .append(request("z", 0, "Subscribed"))
        .await
        .expect("untagged");
    let first = store
        .append_if(
            request("s-1", 0, "Subscribed"),
            tags(&["course:7"]),
            Some(condition.clone()),
        )
        .await
        .expect("the condition holds");
    assert_eq!(first.len(), 1);

    // The same read again: the event just written matches.
    let refused = store
        .append_if(
            request("s-2", 0, "Subscribed"),
            tags(&["course:7"]),
            Some(condition),
        )
        .await
        .expect_err("the condition fails");
    assert!(
        matches!(refused, StoreError::ConditionFailed { .. }),
        "{refused}"
    );
    assert!(refused.is_conflict() && refused.is_retryable());
    assert!(refused.to_string().contains("course:7"), "{refused}");
    let written = store
        .read_stream("thing", "s-2", 0, 10)
        .await
        .expect("read the stream");
    assert!(written.is_empty(), "a failed condition writes nothing");

    // A fresh read passes; a position from the log counts all before it.
    let read = store.read_query(&query, None).await.expect("read");
    assert_eq!(read.events.len(), 1);
    store
        .append_if(
            request("s-2", 0, "Subscribed"),
            tags(&["course:7"]),
            Some(AppendCondition::new(query.clone(), read.position)),
        )
        .await
        .expect("decided on the latest");
    let refused = store
        .append_if(
            request("s-3", 0, "Subscribed"),
            tags(&["course:7"]),
            Some(AppendCondition::new(
                query.clone(),
                ReadPosition::after(first[0].checkpoint()),
            )),
        )
        .await
        .expect_err("s-2 came after");
    assert!(refused.is_conflict());
    let all = store.read_query(&query, None).await.expect("read");
    let head = all.events.last().expect("events").checkpoint();
    store
        .append_if(
            request("s-3", 0, "Subscribed"),
            tags(&["course:7"]),
            Some(AppendCondition::new(
                query.clone(),
                ReadPosition::after(head),
            )),
        )
        .await
        .expect("nothing after the head");

    // An empty query conditions on nothing; a query of every event on all.
    let read = store
        .read_query(&Query::all(), None)
        .await
        .expect("read all");
    assert_eq!(read.events.len(), 6);
    store
        .append(request("w", 0, "Anything"))
        .await
        .expect("plain");
    let refused = store
        .append_if(
            request("v", 0, "Subscribed"),
            Vec::new(),
            Some(AppendCondition::new(Query::all(), read.position.clone())),
        )
        .await
        .expect_err("something was appended");
    assert!(refused.is_conflict());
    store
        .append_if(
            request("v", 0, "Subscribed"),
            Vec::new(),
            Some(AppendCondition::new(Query::new(), read.position)),
        )
        .await
        .expect("an empty query never fails");
    // The stream's version is still checked.
    let stale = store
        .append_if(request("v", 0, "Subscribed"), Vec::new(), None)
        .await
        .expect_err("version 0 is taken");
    assert!(matches!(stale, StoreError::Conflict { .. }), "{stale}");
}

/// The bus: refusals, commands once per id (events and refusals
/// remembered), metadata on events, inline handlers all or nothing.
async fn decision_bus<S: ConditionalAppend + Clone>(store: S) {
    let bus = DecisionBus::<Subscribe, _>::new(store.clone());
    let command = |student, course| SubscribeStudent {
        student,
        course,
        capacity: 2,
        limit: 2,
    };
    let context = CommandContext::new().with_metadata("user", "ann");
    let done = bus
        .execute_with(command(1, 1), context.clone())
        .await
        .expect("subscribed");
    assert_eq!(done.events.len(), 1);
    assert_eq!(done.events[0].metadata["user"], "ann");
    assert_eq!(done.events[0].aggregate_type, "subscription");
    assert_eq!(done.events[0].aggregate_id, "1-1");
    assert!(!done.repeated && done.attempts == 1);
    let again = bus
        .execute_with(command(1, 1), context)
        .await
        .expect("the same command");
    assert!(again.repeated);
    assert_eq!(again.events[0].event_id, done.events[0].event_id);

    bus.execute(command(2, 1)).await.expect("second seat");
    let full = CommandContext::new();
    let refused = bus
        .execute_with(command(3, 1), full.clone())
        .await
        .expect_err("full");
    assert_eq!(refused.rejection(), Some(&Refused::Full));
    // Remembered: the same id is refused again even once a seat is free
    // (there is none here; the answer comes from the outcome).
    let remembered = bus
        .execute_with(command(3, 1), full)
        .await
        .expect_err("remembered");
    assert!(
        matches!(remembered, CommandError::Refused(_)),
        "{remembered}"
    );
    bus.execute(command(1, 2))
        .await
        .expect("student 1's second");
    let too_many = bus.execute(command(1, 3)).await.expect_err("limit");
    assert_eq!(too_many.rejection(), Some(&Refused::TooMany));
    assert_eq!(subscribed(&store, &course(1)).await.len(), 2);

    // An inline handler that fails rolls the events back.
    struct Fails;
    #[outflow::async_trait]
    impl<S: Transactional> DecisionHandler<S> for Fails {
        fn name(&self) -> &str {
            "fails"
        }
        async fn handle(
            &self,
            _: &[RecordedEvent],
            _: &mut S::Transaction,
        ) -> Result<(), HandlerError> {
            Err(HandlerError::data(std::io::Error::other("no")))
        }
    }
    let failing = DecisionBus::<Subscribe, _>::new(store.clone()).inline(Fails);
    let failed = failing.execute(command(5, 5)).await.expect_err("handler");
    assert!(
        matches!(failed, CommandError::Inline { ref handler, .. } if handler == "fails"),
        "{failed}"
    );
    assert!(subscribed(&store, &course(5)).await.is_empty());
}

/// A user aggregate whose bus tags its events: its stream is a query among
/// others, and a decision on its tags sees its appends.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Member {
    email: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum MemberEvent {
    Joined { email: String },
}

impl DomainEvent for MemberEvent {
    fn event_type(&self) -> String {
        "Joined".into()
    }
    fn event_version(&self) -> String {
        "1".into()
    }
}

impl Tagged for MemberEvent {
    fn tags(&self) -> Vec<String> {
        let MemberEvent::Joined { email } = self;
        vec![format!("email:{email}")]
    }
}

#[derive(Debug, thiserror::Error)]
enum MemberError {
    #[error("already a member")]
    Already,
    #[error("the address is taken")]
    Taken,
}

impl Aggregate for Member {
    const TYPE: &'static str = "member";
    type Command = String;
    type Event = MemberEvent;
    type Error = MemberError;
    type Services = ();

    async fn handle(
        &mut self,
        email: String,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), MemberError> {
        if self.email.is_some() {
            return Err(MemberError::Already);
        }
        sink.write(MemberEvent::Joined { email }, self).await;
        Ok(())
    }

    fn apply(&mut self, event: MemberEvent) {
        let MemberEvent::Joined { email } = event;
        self.email = Some(email);
    }
}

/// Joins a member under a unique address: the aggregate's event, decided
/// on every member's events with that address.
struct Join;

impl Decision for Join {
    type Command = (String, String);
    type Event = MemberEvent;
    type State = Vec<String>;
    type Error = MemberError;

    fn query((_, email): &(String, String)) -> Query {
        Query::new().with(QueryItem::tags([format!("email:{email}")]).with_types(["Joined"]))
    }
    fn stream((id, _): &(String, String)) -> StreamId {
        StreamId::new("member", id.clone())
    }
    fn evolve(state: &mut Vec<String>, event: MemberEvent) {
        let MemberEvent::Joined { email } = event;
        state.push(email);
    }
    fn decide(
        taken: &Vec<String>,
        (_, email): &(String, String),
    ) -> Result<Vec<MemberEvent>, MemberError> {
        if !taken.is_empty() {
            return Err(MemberError::Taken);
        }
        Ok(vec![MemberEvent::Joined {
            email: email.clone(),
        }])
    }
}

async fn aggregates_take_part<S: ConditionalAppend + Clone>(store: S) {
    let members = CommandBus::<Member, _>::builder(store.clone(), ())
        .tag_events()
        .build();
    members
        .execute("m-1", "ann@example.com".into())
        .await
        .expect("joined through the aggregate");
    let join = DecisionBus::<Join, _>::new(store.clone());
    let taken = join
        .execute(("m-2".into(), "ann@example.com".into()))
        .await
        .expect_err("the aggregate's event is seen");
    assert!(matches!(taken.rejection(), Some(MemberError::Taken)));
    let done = join
        .execute(("m-2".into(), "bob@example.com".into()))
        .await
        .expect("a free address");
    assert_eq!(done.events[0].aggregate_type, "member");
    // The aggregate loads the decision's event, and refuses a second join.
    let (member, version) = members.load("m-2").await.expect("load");
    assert_eq!(
        (member.email.as_deref(), version),
        (Some("bob@example.com"), 1)
    );
    let again = members
        .execute("m-2", "carol@example.com".into())
        .await
        .expect_err("already");
    assert!(again.is_refusal());
    // The stream is one query among others.
    let read = store
        .read_query(&Query::new().with(QueryItem::stream("member", "m-1")), None)
        .await
        .expect("read");
    assert_eq!(read.events.len(), 1);
    // The decision appends at the stream's version: a member whose stream
    // moved since its read conflicts and is decided again.
    let stream_taken = join
        .execute(("m-1".into(), "dave@example.com".into()))
        .await
        .expect("decided");
    assert_eq!(stream_taken.events[0].sequence, 2);
}

/// Events appended before their bus tagged them are invisible to decisions
/// until backfilled; then they count, and a second backfill adds nothing.
async fn backfilled_tags<S: ConditionalAppend + EventLog + Clone>(store: S) {
    let untagged = CommandBus::<Member, _>::new(store.clone(), ());
    untagged
        .execute("m-1", "ann@example.com".into())
        .await
        .expect("joined before tags");
    let join = DecisionBus::<Join, _>::new(store.clone());
    let query = Join::query(&("m-9".into(), "ann@example.com".into()));
    assert!(
        store
            .read_query(&query, None)
            .await
            .expect("read")
            .events
            .is_empty(),
        "an untagged event is not found by its tags"
    );
    let added = outflow::decision::backfill_aggregate_tags::<Member, _>(&store)
        .await
        .expect("backfill");
    assert_eq!(added, 2, "the address and the stream");
    let taken = join
        .execute(("m-2".into(), "ann@example.com".into()))
        .await
        .expect_err("the backfilled event counts");
    assert!(matches!(taken.rejection(), Some(MemberError::Taken)));
    let again = outflow::decision::backfill_aggregate_tags::<Member, _>(&store)
        .await
        .expect("backfill again");
    assert_eq!(again, 0);
    let read = store
        .read_query(&Query::new().with(QueryItem::stream("member", "m-1")), None)
        .await
        .expect("read");
    assert_eq!(read.events.len(), 1);
    // Bad tags from the caller are refused.
    let bad =
        outflow::decision::backfill_tags(&store, LogFilter::all(), |_| Ok(vec![String::new()]))
            .await
            .expect_err("an empty tag");
    assert!(matches!(bad, StoreError::InvalidQuery { .. }), "{bad}");
}

/// Eight racers per round subscribe students to courses at once: a course
/// never holds more than its capacity, a student never more than the limit.
async fn racing_decisions<S: ConditionalAppend + Clone>(store: S) {
    const RACERS: u32 = 8;
    const CAPACITY: usize = 3;
    const LIMIT: usize = 1;
    let rounds: u32 = std::env::var("OUTFLOW_DECISION_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let bus = Arc::new(DecisionBus::<Subscribe, _>::new(store.clone()).max_attempts(64));
    let mut refused: HashMap<String, usize> = HashMap::new();
    for round in 0..rounds {
        // Two courses of three seats per round; the round's four students
        // each try both at once, and may take one: every student ends with
        // exactly one course, whichever they won.
        let mut racers = Vec::new();
        for racer in 0..RACERS {
            let bus = bus.clone();
            let command = SubscribeStudent {
                student: round * 4 + racer % 4,
                course: round * 2 + racer / 4,
                capacity: CAPACITY,
                limit: LIMIT,
            };
            racers.push(tokio::spawn(async move { bus.execute(command).await }));
        }
        for racer in racers {
            match racer.await.expect("a racer panicked") {
                Ok(_) => {}
                Err(error) => {
                    let message = error
                        .refusal_message()
                        .unwrap_or_else(|| panic!("a racer failed: {error}"));
                    *refused.entry(message).or_default() += 1;
                }
            }
        }
    }
    let everything = Query::new().with(QueryItem::types(["StudentSubscribed"]));
    let all = subscribed(&store, &everything).await;
    let mut per_course: HashMap<u32, usize> = HashMap::new();
    let mut per_student: HashMap<u32, usize> = HashMap::new();
    let mut pairs = std::collections::HashSet::new();
    for &(student, course) in &all {
        *per_course.entry(course).or_default() += 1;
        *per_student.entry(student).or_default() += 1;
        assert!(pairs.insert((student, course)), "subscribed twice");
    }
    assert!(
        per_course.values().all(|&n| n <= CAPACITY),
        "{per_course:?}"
    );
    assert!(per_student.values().all(|&n| n <= LIMIT), "{per_student:?}");
    // Nobody was refused wrongly: each student got exactly one course.
    assert_eq!(per_student.len(), (rounds * 4) as usize, "{refused:?}");
    assert_eq!(all.len(), (rounds * 4) as usize, "{refused:?}");
    assert_eq!(
        refused.values().sum::<usize>(),
        (rounds * (RACERS - 4)) as usize,
        "{refused:?}"
    );
}

/// A decision's append and its command id's claim commit together: a
/// command id already claimed on the stream fails the second append with a
/// conflict, and the transaction, dropped, leaves nothing of it; a claim
/// is per stream.
async fn claims_with_appends<S: ConditionalAppend + Clone>(store: S) {
    let command = uuid::Uuid::new_v4();
    let query = Query::new().with(QueryItem::tags(["claim:a"]));
    let read = store.read_query(&query, None).await.expect("read");
    let condition = AppendCondition::new(query.clone(), read.position);
    let mut tx = store.begin().await.expect("begin");
    let written = store
        .append_tagged_claiming_in(
            &mut tx,
            AppendRequest::new("claim", "s-1", 0, vec![event("First")]),
            vec![vec!["claim:a".into()]],
            Some(&condition),
            command,
        )
        .await
        .expect("append and claim");
    assert_eq!(written.len(), 1);
    store.commit(tx).await.expect("commit");
    let outcome = store
        .command_outcome("claim", "s-1", command)
        .await
        .expect("outcome")
        .expect("the claim is stored with the events");
    assert_eq!(
        outcome.version, 1,
        "claimed at the version the append reached"
    );

    // The same command id on the same stream again: refused, nothing kept.
    let read = store.read_query(&query, None).await.expect("read");
    let condition = AppendCondition::new(query.clone(), read.position);
    let mut tx = store.begin().await.expect("begin");
    let again = store
        .append_tagged_claiming_in(
            &mut tx,
            AppendRequest::new("claim", "s-1", 1, vec![event("Second")]),
            vec![vec!["claim:a".into()]],
            Some(&condition),
            command,
        )
        .await;
    match again {
        Err(StoreError::Conflict { .. }) => drop(tx),
        other => panic!("a claimed command id is a conflict, got {other:?}"),
    }
    let events = store
        .read_stream("claim", "s-1", 0, 10)
        .await
        .expect("read the stream");
    assert_eq!(events.len(), 1, "the refused append left nothing");
    assert_eq!(
        store
            .read_query(&query, None)
            .await
            .expect("read")
            .events
            .len(),
        1
    );

    // Another stream claims the same command id on its own.
    let mut tx = store.begin().await.expect("begin");
    store
        .append_tagged_claiming_in(
            &mut tx,
            AppendRequest::new("claim", "s-2", 0, vec![event("First")]),
            vec![vec!["claim:b".into()]],
            None,
            command,
        )
        .await
        .expect("another stream");
    store.commit(tx).await.expect("commit");
}

common::on_every_backend! {
    claims_with_appends: claims_on_memory, claims_on_postgres, claims_on_sqlite;
    tags_and_queries: tags_on_memory, tags_on_postgres, tags_on_sqlite;
    conditions: conditions_on_memory, conditions_on_postgres, conditions_on_sqlite;
    decision_bus: decision_bus_on_memory, decision_bus_on_postgres, decision_bus_on_sqlite;
    aggregates_take_part: aggregates_on_memory, aggregates_on_postgres, aggregates_on_sqlite;
    racing_decisions: racing_on_memory, racing_on_postgres, racing_on_sqlite;
    backfilled_tags: backfill_on_memory, backfill_on_postgres, backfill_on_sqlite;
}

#[tokio::test]
async fn a_jetstream_store_says_why_it_has_no_conditional_appends() {
    let store = common::jetstream_store(&common::nats_url(), "decisions_refused", 1).await;
    let refused = store.conditional_appends().expect_err("unsupported");
    assert!(matches!(refused, StoreError::Unsupported { .. }));
    assert!(
        refused.to_string().contains("PostgreSQL or SQLite"),
        "{refused}"
    );
}
