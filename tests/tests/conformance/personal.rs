//! Personal data on every backend: fields marked `Personal` are stored
//! sealed under their subject's key (events, snapshots, views, process
//! states), read as plaintext while the key exists and as forgotten once
//! the subject is forgotten — by aggregates, projections and views, never
//! as an error; the erasure is recorded in the log; a subject's first key
//! is made once however many writers race for it; altered ciphertext is a
//! typed error; a store without keys refuses personal data loudly; a
//! missing keys table is named with its migration, never parked; and a
//! JetStream relay carries only ciphertext.

use outflow_tests as common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use outflow::cqrs_es::event_sink::EventSink;
use outflow::cqrs_es::{Aggregate, DomainEvent, EventEnvelope, View};
use outflow::personal::{KeyRing, Personal, ERASURE_EVENT, ERASURE_STREAM};
use outflow::projection::{OnError, Projection, ProjectionOptions};
use outflow::runner::ProjectionRunner;
use outflow::store::ProjectionStore;
use outflow::view::{ViewProjection, ViewStore};
use outflow::{
    AppendRequest, Checkpoint, CommandBus, EventLog, EventStore, HandlerError, LogFilter, NewEvent,
    RecordedEvent, StoreError,
};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------- the model

/// A club member: a name of their own, and a note about them written by
/// their sponsor, which belongs to the sponsor (another subject).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Member {
    joined: bool,
    name: Personal<String>,
    sponsor_note: Personal<String>,
    visits: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum MemberCommand {
    Join {
        name: String,
        sponsor: String,
        note: String,
    },
    Visit,
    Rename {
        name: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum MemberEvent {
    Joined {
        name: Personal<String>,
        sponsor_note: Personal<String>,
        plan: String,
    },
    Visited,
    Renamed {
        name: Personal<String>,
    },
}

impl DomainEvent for MemberEvent {
    fn event_type(&self) -> String {
        match self {
            MemberEvent::Joined { .. } => "Joined",
            MemberEvent::Visited => "Visited",
            MemberEvent::Renamed { .. } => "Renamed",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".into()
    }
}

#[derive(Debug, PartialEq, thiserror::Error)]
#[error("refused")]
struct Refused;

impl Aggregate for Member {
    const TYPE: &'static str = "member";
    type Command = MemberCommand;
    type Event = MemberEvent;
    type Error = Refused;
    type Services = ();

    async fn handle(
        &mut self,
        command: MemberCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), Refused> {
        let event = match command {
            MemberCommand::Join {
                name,
                sponsor,
                note,
            } => MemberEvent::Joined {
                name: Personal::new(name),
                sponsor_note: Personal::of(sponsor, note),
                plan: "gold".into(),
            },
            MemberCommand::Visit => MemberEvent::Visited,
            MemberCommand::Rename { name } => MemberEvent::Renamed {
                name: Personal::new(name),
            },
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: MemberEvent) {
        match event {
            MemberEvent::Joined {
                name, sponsor_note, ..
            } => {
                self.joined = true;
                self.name = name;
                self.sponsor_note = sponsor_note;
            }
            MemberEvent::Visited => self.visits += 1,
            MemberEvent::Renamed { name } => self.name = name,
        }
    }
}

fn marker() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

fn join(name: &str, sponsor: &str, note: &str) -> MemberCommand {
    MemberCommand::Join {
        name: name.into(),
        sponsor: sponsor.into(),
        note: note.into(),
    }
}

async fn whole_log<S: EventLog>(store: &S, through: Option<Checkpoint>) -> Vec<RecordedEvent> {
    // Up to `through` (readers may be held back a moment by transactions
    // elsewhere on the server).
    let head = through.expect("a checkpoint");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let log = store
            .read_log(Checkpoint::START, &LogFilter::all(), 10_000)
            .await
            .expect("read the log");
        if log.last().is_some_and(|e| e.checkpoint() >= head) {
            return log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the log stays behind {head}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ring_of<S: EventStore>(store: &S) -> KeyRing {
    EventStore::key_ring(store).expect("the store has a key ring")
}

/// A member's id, name and sponsor's note as a projection decoded them.
type Seen = (String, Option<String>, Option<String>);

/// A projection that records the names it decodes (`None`: forgotten).
struct Names<S> {
    name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    _store: std::marker::PhantomData<fn(S)>,
}

#[async_trait]
impl<S: ProjectionStore> Projection<S> for Names<S> {
    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types([Member::TYPE]).with_event_types(["Joined"])
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        _tx: &mut S::Transaction,
    ) -> Result<(), HandlerError> {
        for event in events {
            if let MemberEvent::Joined {
                name, sponsor_note, ..
            } = event.decode_payload::<Member>()?
            {
                self.seen.lock().expect("seen").push((
                    event.aggregate_id.clone(),
                    name.into_value(),
                    sponsor_note.into_value(),
                ));
            }
        }
        Ok(())
    }
}

/// Runs a fresh `Names` projection over the whole log and returns what it
/// decoded.
async fn names_now<S: ProjectionStore + EventLog>(store: &S) -> Vec<Seen> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let name = format!("names_{}", marker());
    let runner = ProjectionRunner::builder(store.clone())
        .projection(
            ProjectionOptions::new(Names::<S> {
                name: name.clone(),
                seen: seen.clone(),
                _store: std::marker::PhantomData,
            })
            .on_error(OnError::Stop),
        )
        .build()
        .expect("runner");
    let head = store.committed_head().await.expect("head");
    let (stop, task) = common::start_runner(&runner);
    runner
        .wait_for(head, &[&name], Duration::from_secs(60))
        .await
        .expect("the projection reads everything");
    common::stop_runner(stop, task).await;
    let seen = seen.lock().expect("seen").clone();
    seen
}

// ---------------------------------------------------------------- the suite

async fn personal_data<S>(store: S)
where
    S: EventStore + EventLog + ProjectionStore + Clone,
{
    let run = marker();
    let (name, note) = (format!("Alice Plain{run}"), format!("Kind note {run}"));
    let sponsor = format!("sponsor-{run}");
    let bus = CommandBus::<Member, _>::builder(store.clone(), ())
        .snapshot_every(2)
        .build();
    bus.execute("m-1", join(&name, &sponsor, &note))
        .await
        .expect("join");
    let visited = bus
        .execute("m-1", MemberCommand::Visit)
        .await
        .expect("visit");

    // Stored sealed: the log holds neither the name nor the note, and
    // names both subjects.
    let log = whole_log(&store, visited.checkpoint()).await;
    let joined = log
        .iter()
        .find(|e| e.event_type == "Joined")
        .expect("the join");
    let text = joined.payload.to_string();
    assert!(!text.contains(&name) && !text.contains(&note), "{text}");
    assert!(
        text.contains("$personal") && text.contains(&sponsor),
        "{text}"
    );
    assert_eq!(
        joined.payload["Joined"]["plan"], "gold",
        "the rest stays plain"
    );
    // ... and so does the snapshot taken at version 2.
    let loaded = store.load(Member::TYPE, "m-1", true).await.expect("load");
    let snapshot = loaded.snapshot.expect("a snapshot").state.to_string();
    assert!(
        !snapshot.contains(&name) && snapshot.contains("$personal"),
        "{snapshot}"
    );

    // Aggregates read the plaintext (from the snapshot, then the events).
    let fresh = CommandBus::<Member, _>::builder(store.clone(), ())
        .snapshot_every(2)
        .build();
    let (member, version) = fresh.load("m-1").await.expect("load");
    assert_eq!(version, 2);
    assert_eq!(member.name.value(), Some(&name));
    assert_eq!(member.sponsor_note.value(), Some(&note));
    assert_eq!(member.sponsor_note.subject(), Some(sponsor.as_str()));
    // So do projections.
    let seen = names_now(&store).await;
    assert_eq!(
        seen,
        vec![("m-1".to_owned(), Some(name.clone()), Some(note.clone()))]
    );

    // Forgetting m-1: its name is forgotten, the sponsor's note is not.
    let ring = ring_of(&store);
    assert!(ring.forget("m-1").await.expect("forget"));
    assert!(!ring.forget("m-1").await.expect("forget again"), "once");
    let erasures = store
        .read_stream(ERASURE_STREAM, "m-1", 0, 10)
        .await
        .expect("the erasure stream");
    assert_eq!(erasures.len(), 1, "the erasure is recorded once");
    assert_eq!(erasures[0].event_type, ERASURE_EVENT);
    assert_eq!(erasures[0].payload, serde_json::json!({ "subject": "m-1" }));
    let fresh = CommandBus::<Member, _>::new(store.clone(), ());
    let (member, _) = fresh.load("m-1").await.expect("a forgotten load");
    assert!(member.name.is_forgotten() && member.joined);
    assert_eq!(member.sponsor_note.value(), Some(&note));
    let seen = names_now(&store).await;
    assert_eq!(
        seen,
        vec![("m-1".to_owned(), None, Some(note.clone()))],
        "a projection reads the forgotten field as None, and parks nothing"
    );

    // New personal data of a forgotten subject is stored forgotten.
    let renamed = format!("Renamed {run}");
    let renaming = bus
        .execute(
            "m-1",
            MemberCommand::Rename {
                name: renamed.clone(),
            },
        )
        .await
        .expect("rename");
    let log = whole_log(&store, renaming.checkpoint()).await;
    let rename = log
        .iter()
        .find(|e| e.event_type == "Renamed")
        .expect("the rename");
    assert!(!rename.payload.to_string().contains(&renamed));
    assert_eq!(
        rename.payload["Renamed"]["name"]["$personal"]["forgotten"],
        true
    );
    let (member, _) = fresh.load("m-1").await.expect("load");
    assert!(member.name.is_forgotten());

    // The first key of a subject is made once, however many race for it.
    let shared = format!("race-{run}");
    let mut racers = Vec::new();
    for i in 0..8 {
        let bus = CommandBus::<Member, _>::new(store.clone(), ());
        let shared = shared.clone();
        racers.push(tokio::spawn(async move {
            bus.execute(
                &format!("r-{i}"),
                join(&format!("Racer {i}"), &shared, &format!("note {i}")),
            )
            .await
            .map(|_| ())
        }));
    }
    for racer in racers {
        racer.await.expect("racer").expect("join");
    }
    for i in 0..8 {
        let (member, _) = CommandBus::<Member, _>::new(store.clone(), ())
            .load(&format!("r-{i}"))
            .await
            .expect("load");
        assert_eq!(member.sponsor_note.value(), Some(&format!("note {i}")));
    }

    // Altered ciphertext is a typed error naming the event, not a panic.
    let mut altered = joined.payload.clone();
    let sealed = &mut altered["Joined"]["sponsor_note"]["$personal"]["c"];
    // One character of the ciphertext changed (still base64).
    let flipped: String = sealed
        .as_str()
        .expect("ciphertext")
        .char_indices()
        .map(|(i, c)| match (i, c) {
            (4, 'A') => 'B',
            (4, _) => 'A',
            (_, c) => c,
        })
        .collect();
    *sealed = serde_json::Value::String(flipped);
    store
        .append(AppendRequest::new(
            Member::TYPE,
            "m-altered",
            0,
            vec![NewEvent::new("Joined", altered)],
        ))
        .await
        .expect("append");
    match fresh.load("m-altered").await {
        Err(StoreError::Deserialize { source, .. }) => {
            assert!(source.to_string().contains("does not decrypt"), "{source}")
        }
        other => panic!("altered ciphertext loaded: {other:?}"),
    }
}

common::on_every_backend! {
    personal_data: personal_on_memory, personal_on_postgres, personal_on_sqlite;
}

// ------------------------------------------- views and rebuilds (SQL stores)

/// A directory entry: personal, as in the events.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    name: Personal<String>,
    visits: u32,
}

impl View<Member> for Entry {
    fn update(&mut self, event: &EventEnvelope<Member>) {
        match &event.payload {
            MemberEvent::Joined { name, .. } | MemberEvent::Renamed { name } => {
                self.name = name.clone()
            }
            MemberEvent::Visited => self.visits += 1,
        }
    }
}

async fn views_forget<S>(store: S)
where
    S: EventStore + EventLog + ViewStore + ProjectionStore + Clone,
{
    let run = marker();
    let name = format!("Viewed Person{run}");
    let bus = CommandBus::<Member, _>::new(store.clone(), ());
    for id in ["v-1", "v-2"] {
        bus.execute(id, join(&format!("{name} {id}"), "club", "welcome"))
            .await
            .expect("join");
        bus.execute(id, MemberCommand::Visit).await.expect("visit");
    }
    let projection =
        ViewProjection::<Member, Entry>::new("directory", "directory").expect("projection");
    let query = projection.query(&store);
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(projection).on_error(OnError::Stop))
        .build()
        .expect("runner");
    let (stop, task) = common::start_runner(&runner);
    let head = store.committed_head().await.expect("head");
    runner
        .wait_for(head, &["directory"], Duration::from_secs(60))
        .await
        .expect("the view catches up");
    // Stored sealed, read in plaintext.
    let stored = store
        .view_payload("directory", "v-1")
        .await
        .expect("read")
        .expect("a row");
    assert!(
        !stored.contains(&name) && stored.contains("$personal"),
        "{stored}"
    );
    let entry = query.load("v-1").await.expect("load").expect("an entry");
    assert_eq!(entry.name.value(), Some(&format!("{name} v-1")));
    assert_eq!(entry.visits, 1);

    ring_of(&store).forget("v-1").await.expect("forget");
    // Without a rebuild the stored view already reads as forgotten...
    let entry = query.load("v-1").await.expect("load").expect("an entry");
    assert!(entry.name.is_forgotten());
    // ... and a rebuild writes it forgotten, the other untouched.
    let mut progress = runner.rebuild("directory").await.expect("rebuild");
    tokio::time::timeout(Duration::from_secs(60), async {
        while !progress.borrow().is_complete() {
            progress.changed().await.expect("progress");
        }
    })
    .await
    .expect("the rebuild finishes");
    runner
        .wait_for(head, &["directory"], Duration::from_secs(60))
        .await
        .expect("the view catches up again");
    let stored = store
        .view_payload("directory", "v-1")
        .await
        .expect("read")
        .expect("a row");
    assert!(
        stored.contains("\"forgotten\":true") && !stored.contains("\"c\""),
        "{stored}"
    );
    let listed = query.list(None, 10).await.expect("list");
    assert_eq!(listed.len(), 2);
    assert!(listed[0].1.name.is_forgotten());
    assert_eq!(listed[1].1.name.value(), Some(&format!("{name} v-2")));
    assert_eq!(listed[1].1.visits, 1);
    common::stop_runner(stop, task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_forget_on_postgres() {
    let db = common::TestDb::new("views_forget").await;
    views_forget(db.store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_forget_on_sqlite() {
    let dir = common::TestDir::new("views_forget");
    views_forget(dir.sqlite().await).await;
}

/// Two processes on one database: a subject forgotten through one is read
/// as forgotten by the other once its cache time is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_reads_forgotten_after_its_cache_time() {
    let db = common::TestDb::new("keys_two_processes").await;
    let first = db.store().await;
    let second = outflow::PostgresStore::builder(db.pool(4).await)
        .keys_cached_for(Duration::from_millis(200))
        .build()
        .await
        .expect("a second store");
    let bus = CommandBus::<Member, _>::new(first.clone(), ());
    bus.execute("p-1", join("Two Places", "club", "hi"))
        .await
        .expect("join");
    let other = CommandBus::<Member, _>::new(second.clone(), ());
    let (member, _) = other.load("p-1").await.expect("load");
    assert_eq!(member.name.value().map(String::as_str), Some("Two Places"));
    first.key_ring().forget("p-1").await.expect("forget");
    let other = Arc::new(other);
    common::eventually(
        "the other process reads the name as forgotten",
        Duration::from_secs(30),
        || {
            let other = other.clone();
            async move {
                let (member, _) = other.load("p-1").await.map_err(|e| e.to_string())?;
                if member.name.is_forgotten() {
                    Ok(())
                } else {
                    Err("still readable".to_owned())
                }
            }
        },
    )
    .await;
}

/// A store without keys refuses personal data with an error that says so;
/// given a ring (kept in the read-model database), it seals like the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_store_takes_a_key_ring() {
    let js = common::jetstream_store(&common::nats_url(), "personal", 1).await;
    let bus = CommandBus::<Member, _>::new(js.clone(), ());
    let refused = bus
        .execute("j-1", join("No Keys", "club", "hi"))
        .await
        .expect_err("no key store");
    let chain = outflow::error::error_chain(&refused);
    assert!(chain.contains("without a key store"), "{chain}");

    let db = common::TestDb::new("personal_jetstream").await;
    let read_models = db.store().await;
    let js = js.with_key_ring(read_models.key_ring());
    let bus = CommandBus::<Member, _>::new(js.clone(), ());
    let joined = bus
        .execute("j-1", join("Jet Person", "club", "hi"))
        .await
        .expect("join");
    let log = whole_log(&js, joined.checkpoint()).await;
    assert!(!log[0].payload.to_string().contains("Jet Person"));
    let (member, _) = CommandBus::<Member, _>::new(js.clone(), ())
        .load("j-1")
        .await
        .expect("load");
    assert_eq!(member.name.value().map(String::as_str), Some("Jet Person"));
    read_models.key_ring().forget("j-1").await.expect("forget");
    let (member, _) = CommandBus::<Member, _>::new(js.clone(), ())
        .load("j-1")
        .await
        .expect("load");
    assert!(member.name.is_forgotten());
}

/// A relay to JetStream publishes the stored payloads: ciphertext only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_stream_carries_only_ciphertext() {
    use outflow::relay::{ensure_stream, JetStreamRelay};
    let db = common::TestDb::new("personal_relay").await;
    let store = db.store().await;
    let run = marker();
    let bus = CommandBus::<Member, _>::new(store.clone(), ());
    for i in 0..3 {
        bus.execute(
            &format!("n-{i}"),
            join(
                &format!("Relayed Person{run} {i}"),
                "club",
                &format!("Relayed note{run}"),
            ),
        )
        .await
        .expect("join");
    }
    let js = common::nats::jetstream(&common::nats_url()).await;
    let stream = format!("PERSONAL_{run}");
    let prefix = format!("personal{run}");
    ensure_stream(
        &js,
        &stream,
        vec![format!("{prefix}.>")],
        Duration::from_secs(120),
    )
    .await
    .expect("stream");
    let relay = JetStreamRelay::builder(js.clone(), "personal_relay")
        .subject_prefix(prefix)
        .build()
        .expect("relay");
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(relay).on_error(OnError::Stop))
        .build()
        .expect("runner");
    let (stop, task) = common::start_runner(&runner);
    let head = store.committed_head().await.expect("head");
    runner
        .wait_for(head, &["personal_relay"], Duration::from_secs(60))
        .await
        .expect("relayed");
    common::stop_runner(stop, task).await;
    let messages = common::nats::read_stream(&js, &stream).await;
    assert_eq!(messages.len(), 3);
    for message in &messages {
        let text = String::from_utf8_lossy(&message.payload);
        assert!(text.contains("$personal"), "{text}");
        assert!(!text.contains(&format!("Person{run}")), "{text}");
        assert!(!text.contains(&format!("note{run}")), "{text}");
    }
    // A subscriber with the keys opens them; after forgetting, it reads
    // the fields as forgotten.
    let ring = store.key_ring();
    let payload: serde_json::Value = serde_json::from_slice(&messages[0].payload).expect("JSON");
    let opened: MemberEvent = ring.open(&payload).await.expect("open");
    let MemberEvent::Joined { name, .. } = opened else {
        panic!("a join")
    };
    let subject = name.subject().expect("a subject").to_owned();
    assert!(name.value().is_some_and(|n| n.contains(&run)));
    ring.forget(&subject).await.expect("forget");
    let opened: MemberEvent = ring.open(&payload).await.expect("open");
    let MemberEvent::Joined { name, .. } = opened else {
        panic!("a join")
    };
    assert!(name.is_forgotten());
}

/// The console's erasure: operators only, a subject required, idempotent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_forget_from_the_console() {
    let dir = common::TestDir::new("console_forget");
    let store = dir.sqlite().await;
    let bus = CommandBus::<Member, _>::new(store.clone(), ());
    bus.execute("c-1", join("Console Person", "club", "hi"))
        .await
        .expect("join");
    let runner = ProjectionRunner::builder(store.clone())
        .build()
        .expect("runner");
    let console = outflow::admin::Admin::new(runner)
        .operator_token("op-secret")
        .reader_token("read-secret")
        .events(store.clone())
        .router();
    let base = common::serve_console(console).await;
    let http = reqwest::Client::new();
    let forget = |token: Option<&'static str>, query: &'static str| {
        let mut request = http.post(format!("{base}/api/subjects/forget{query}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.expect("send");
            let status = response.status().as_u16();
            (
                status,
                response.json::<serde_json::Value>().await.expect("JSON"),
            )
        }
    };
    assert_eq!(forget(None, "?subject=c-1").await.0, 401);
    assert_eq!(forget(Some("read-secret"), "?subject=c-1").await.0, 403);
    assert_eq!(forget(Some("op-secret"), "").await.0, 400);
    let (status, body) = forget(Some("op-secret"), "?subject=c-1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        serde_json::json!({ "subject": "c-1", "forgotten": true })
    );
    let (_, body) = forget(Some("op-secret"), "?subject=c-1").await;
    assert_eq!(body["forgotten"], false);
    let (member, _) = CommandBus::<Member, _>::new(store.clone(), ())
        .load("c-1")
        .await
        .expect("load");
    assert!(member.name.is_forgotten());
}

/// A process manager keeps a member's name in its state: sealed in the
/// states table, opened by `react` and by `ProcessStates::get`, forgotten
/// with the member (without the process parking anything).
struct Greeter;

/// The greeter's state: whom it greets.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Greeting {
    name: Personal<String>,
    visits: u32,
}

#[async_trait]
impl outflow::process::ProcessManager for Greeter {
    type State = Greeting;
    type Command = std::convert::Infallible;

    fn name(&self) -> &str {
        "greeter"
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types([Member::TYPE])
    }

    fn process_id(&self, event: &RecordedEvent) -> Option<String> {
        Some(event.aggregate_id.clone())
    }

    fn react(
        &self,
        state: &mut Greeting,
        event: &RecordedEvent,
    ) -> Result<Vec<std::convert::Infallible>, HandlerError> {
        match event.decode_payload::<Member>()? {
            MemberEvent::Joined { name, .. } | MemberEvent::Renamed { name } => state.name = name,
            MemberEvent::Visited => state.visits += 1,
        }
        Ok(Vec::new())
    }

    async fn dispatch(
        &self,
        command: std::convert::Infallible,
        _: outflow::CommandContext,
    ) -> Result<(), HandlerError> {
        match command {}
    }
}

async fn processes_forget<S>(store: S)
where
    S: EventStore + EventLog + ViewStore + ProjectionStore + Clone,
{
    let bus = CommandBus::<Member, _>::new(store.clone(), ());
    bus.execute("g-1", join("Greeted Person", "club", "hi"))
        .await
        .expect("join");
    let process = outflow::process::Process::new(Greeter, &store, "greetings").expect("process");
    let states = process.states();
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(process).on_error(OnError::Stop))
        .build()
        .expect("runner");
    let (stop, task) = common::start_runner(&runner);
    let head = store.committed_head().await.expect("head");
    runner
        .wait_for(head, &["greeter"], Duration::from_secs(60))
        .await
        .expect("the process catches up");
    let stored = store
        .view_payload("greetings", "g-1")
        .await
        .expect("read")
        .expect("a state");
    assert!(
        !stored.contains("Greeted Person") && stored.contains("$personal"),
        "{stored}"
    );
    let state = states.get("g-1").await.expect("get").expect("a state");
    assert_eq!(
        state.name.value().map(String::as_str),
        Some("Greeted Person")
    );

    ring_of(&store).forget("g-1").await.expect("forget");
    // The next event folds into a state whose name reads as forgotten.
    let visited = bus
        .execute("g-1", MemberCommand::Visit)
        .await
        .expect("visit");
    runner
        .wait_for(visited.checkpoint(), &["greeter"], Duration::from_secs(60))
        .await
        .expect("the process handles the visit");
    let state = states.get("g-1").await.expect("get").expect("a state");
    assert!(state.name.is_forgotten());
    assert_eq!(state.visits, 1);
    let stored = store
        .view_payload("greetings", "g-1")
        .await
        .expect("read")
        .expect("a state");
    assert!(stored.contains("\"forgotten\":true"), "{stored}");
    assert!(runner
        .dead_letters("greeter")
        .await
        .expect("dead letters")
        .is_empty());
    common::stop_runner(stop, task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_forget_on_postgres() {
    let db = common::TestDb::new("processes_forget").await;
    processes_forget(db.store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_forget_on_sqlite() {
    let dir = common::TestDir::new("processes_forget");
    processes_forget(dir.sqlite().await).await;
}

/// A log copied to another backend takes its keys along: the copy's
/// personal values open at the target; a subject forgotten at the source
/// stays unreadable there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_log_takes_its_keys_along() {
    let dir = common::TestDir::new("copy_keys");
    let source = dir.sqlite().await;
    let bus = CommandBus::<Member, _>::new(source.clone(), ());
    for id in ["k-1", "k-2"] {
        bus.execute(id, join(&format!("Copied {id}"), "club", "note"))
            .await
            .expect("join");
    }
    source.key_ring().forget("k-2").await.expect("forget");
    let db = common::TestDb::new("copy_keys").await;
    let target = db.store().await;
    outflow::copy::LogCopy::new(&source, &target)
        .run(|_| {})
        .await
        .expect("the copy");
    let copied = CommandBus::<Member, _>::new(target.clone(), ());
    let (member, _) = copied.load("k-1").await.expect("load");
    assert_eq!(member.name.value().map(String::as_str), Some("Copied k-1"));
    assert_eq!(
        member.sponsor_note.value().map(String::as_str),
        Some("note")
    );
    let (member, _) = copied.load("k-2").await.expect("load");
    assert!(member.name.is_forgotten());

    // A target that keeps no keys is refused, not filled with values that
    // would never open.
    let js = common::jetstream_store(&common::nats_url(), "copy_keys", 1).await;
    let refused = outflow::copy::LogCopy::new(&source, &js)
        .run(|_| {})
        .await
        .expect_err("no keys at the target");
    assert!(
        outflow::error::error_chain(&refused).contains("keeps no keys"),
        "{refused}"
    );
}

/// A keys table that is missing (its migration not applied, on a store
/// built with `migrate(false)`) is a set-up to fix, said as
/// such: a command sealing personal data fails naming the table and the
/// migration, and a projection over sealed events stops with that error in
/// its status and in what `wait_for` returns — nothing is parked as if an
/// event were at fault, and it goes on once the migrations are applied.
/// `fresh` drops the table and opens another store on the same database
/// without migrations (so its key ring has nothing cached); `repair`
/// applies the migrations.
async fn missing_keys_table<S, F, Fut, R, RFut>(store: S, fresh: F, repair: R)
where
    S: EventStore + EventLog + ProjectionStore + Clone,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = S>,
    R: Fn() -> RFut,
    RFut: std::future::Future<Output = ()>,
{
    let run = marker();
    let bus = CommandBus::<Member, _>::new(store.clone(), ());
    bus.execute("m-1", join(&format!("Ann{run}"), "s-1", "note"))
        .await
        .expect("join while the table exists");
    let named = |error: &StoreError| {
        matches!(
            error,
            StoreError::Config(outflow::ConfigError::MissingTable { table, hint })
                if table == "events_keys" && hint.contains("migrat")
        )
    };

    // Another process, started without the migrations, on a database
    // whose keys table is gone.
    let other = fresh().await;
    let bus = CommandBus::<Member, _>::new(other.clone(), ());
    match bus.execute("m-2", join("Bob", "s-2", "note")).await {
        Err(outflow::CommandError::Store(error)) => {
            assert!(
                named(&error),
                "the table and the migration are named: {error}"
            )
        }
        other => panic!("a command sealing personal data must fail, got {other:?}"),
    }

    let name = format!("names_{run}");
    let runner = ProjectionRunner::builder(other.clone())
        .projection(ProjectionOptions::new(Names::<S> {
            name: name.clone(),
            seen: Arc::new(Mutex::new(Vec::new())),
            _store: std::marker::PhantomData,
        }))
        .build()
        .expect("runner");
    let head = other.committed_head().await.expect("head");
    let (stop, task) = common::start_runner(&runner);
    let waited = runner
        .wait_for(head, &[&name], Duration::from_secs(60))
        .await
        .expect_err("the projection cannot open the sealed event");
    let said = format!("{waited}");
    assert!(
        said.contains("events_keys"),
        "wait_for names the missing table: {said}"
    );
    let status = runner.status().await.expect("status");
    let unit = status
        .iter()
        .find(|s| s.projection == name)
        .expect("the projection's status");
    let shown = format!("{unit:?}");
    assert!(
        shown.contains("events_keys"),
        "the status names the missing table: {shown}"
    );
    assert!(
        other
            .dead_letters(&name)
            .await
            .expect("dead letters")
            .is_empty(),
        "nothing is parked for a missing table"
    );

    // The migrations applied, the projection goes on by itself (the key
    // dropped with the table is gone: the name reads as forgotten).
    // Until its next retry the status still shows the old error, and
    // `wait_for` answers with it at once: ask again until it passes.
    repair().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        match runner
            .wait_for(head, &[&name], Duration::from_secs(60))
            .await
        {
            Ok(()) => break,
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(%error, "not yet past the missing table");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("the projection goes on once the table exists: {error}"),
        }
    }
    common::stop_runner(stop, task).await;
    assert!(
        other
            .dead_letters(&name)
            .await
            .expect("dead letters")
            .is_empty(),
        "nothing was parked on the way"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_keys_table_is_named_on_postgres() {
    let db = common::TestDb::new("missing_keys").await;
    let first = db.store().await;
    missing_keys_table(
        first,
        || async {
            let pool = db.pool(10).await;
            // As if the keys' migration (11) had never been applied.
            sqlx::query("DROP TABLE IF EXISTS events_keys")
                .execute(&pool)
                .await
                .expect("drop the keys table");
            sqlx::query(
                "DELETE FROM outflow_migrations WHERE events_table = 'events' AND version = 11",
            )
            .execute(&pool)
            .await
            .expect("forget the keys' migration");
            outflow::PostgresStore::builder(pool)
                .migrate(false)
                .build()
                .await
                .expect("a store without migrations")
        },
        || async {
            outflow::PostgresStore::migrate(&db.pool(2).await, "events")
                .await
                .expect("apply the migrations");
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_keys_table_is_named_on_sqlite() {
    let dir = common::TestDir::new("missing_keys");
    let first = dir.sqlite().await;
    let path = dir.file("events.db");
    missing_keys_table(
        first,
        || async {
            let store = outflow::SqliteStore::builder(&path)
                .migrate(false)
                .build()
                .await
                .expect("a store without migrations");
            // As if the keys' migration (8) had never been applied.
            sqlx::query("DROP TABLE IF EXISTS events_keys")
                .execute(store.writer())
                .await
                .expect("drop the keys table");
            sqlx::query(
                "DELETE FROM outflow_migrations WHERE events_table = 'events' AND version = 8",
            )
            .execute(store.writer())
            .await
            .expect("forget the keys' migration");
            store
        },
        || async {
            outflow::SqliteStore::open(&path)
                .await
                .expect("apply the migrations");
        },
    )
    .await;
}
