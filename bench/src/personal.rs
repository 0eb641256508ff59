//! Personal data's cost on PostgreSQL: commands on an aggregate whose
//! events carry two personal fields (sealed under the aggregate's key),
//! against the same aggregate with the two fields plain, each in a
//! database of its own, at 1 and 16 clients. Every command loads its
//! stream (no aggregate cache), so it opens the fields of every event
//! before it, then seals the new event's.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use outflow::cqrs_es::event_sink::EventSink;
use outflow::cqrs_es::{Aggregate, DomainEvent};
use outflow::personal::Personal;
use outflow::{CommandBus, PostgresStore};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::setup::{pool, Server};
use crate::stats::Size;

/// One row of the section.
pub(crate) struct PersonalRow {
    pub(crate) what: &'static str,
    pub(crate) clients: usize,
    pub(crate) per_second: f64,
}

/// A profile updated by each command: a name and an address of type `F`
/// (`String` or `Personal<String>`), and a counter.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Profile<F> {
    updates: u64,
    name: F,
    email: F,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Update {
    name: String,
    email: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum ProfileEvent<F> {
    Updated { name: F, email: F, count: u64 },
}

impl<F: Serialize + DeserializeOwned + Clone + PartialEq + Send + Sync + std::fmt::Debug>
    DomainEvent for ProfileEvent<F>
{
    fn event_type(&self) -> String {
        "Updated".into()
    }
    fn event_version(&self) -> String {
        "1".into()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

/// How a field is made from a command's text.
trait Field:
    Serialize + DeserializeOwned + Default + Clone + PartialEq + Send + Sync + std::fmt::Debug + 'static
{
    const TYPE: &'static str;
    fn of(text: String) -> Self;
}

impl Field for String {
    const TYPE: &'static str = "plain_profile";
    fn of(text: String) -> Self {
        text
    }
}

impl Field for Personal<String> {
    const TYPE: &'static str = "personal_profile";
    fn of(text: String) -> Self {
        Personal::new(text)
    }
}

impl<F: Field> Aggregate for Profile<F> {
    const TYPE: &'static str = F::TYPE;
    type Command = Update;
    type Event = ProfileEvent<F>;
    type Error = Never;
    type Services = ();

    async fn handle(
        &mut self,
        command: Update,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), Never> {
        let event = ProfileEvent::Updated {
            name: F::of(command.name),
            email: F::of(command.email),
            count: self.updates + 1,
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: ProfileEvent<F>) {
        let ProfileEvent::Updated { name, email, count } = event;
        self.updates = count;
        self.name = name;
        self.email = email;
    }
}

async fn commands<F: Field>(
    store: PostgresStore,
    clients: usize,
    profiles: usize,
    updates: usize,
) -> Result<f64> {
    let bus = Arc::new(CommandBus::<Profile<F>, _>::new(store, ()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..clients {
        let bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..updates {
                for profile in (client..profiles).step_by(clients) {
                    bus.execute(
                        &format!("profile-{profile}"),
                        Update {
                            name: format!("Person Number {profile} {round}"),
                            email: format!("person.{profile}.{round}@example.com"),
                        },
                    )
                    .await?;
                }
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok((profiles * updates) as f64 / started.elapsed().as_secs_f64())
}

pub(crate) async fn personal_scenarios(server: &Server, size: &Size) -> Result<Vec<PersonalRow>> {
    let (profiles, updates) = if size.quick { (50, 4) } else { (400, 10) };
    // Plain and personal alternate, three times each, every run in a fresh
    // database; the median of each is reported (the two sides see the
    // same drift of the machine).
    let rounds = if size.quick { 1 } else { 3 };
    let mut rows = Vec::new();
    for clients in [1usize, 16] {
        let mut plain = Vec::new();
        let mut sealed = Vec::new();
        for round in 0..rounds {
            for personal in [false, true] {
                let (options, _) = server
                    .fresh_db(&format!("pd{clients}{}{round}", u8::from(personal)))
                    .await?;
                let store = PostgresStore::builder(pool(&options, 20, false).await?)
                    .build()
                    .await?;
                if personal {
                    sealed.push(
                        commands::<Personal<String>>(store, clients, profiles, updates).await?,
                    );
                } else {
                    plain.push(commands::<String>(store, clients, profiles, updates).await?);
                }
            }
        }
        for (what, mut rates) in [
            ("the same two fields plain", plain),
            ("two personal fields (sealed)", sealed),
        ] {
            rates.sort_by(f64::total_cmp);
            rows.push(PersonalRow {
                what,
                clients,
                per_second: rates[rates.len() / 2],
            });
        }
    }
    Ok(rows)
}

pub(crate) fn personal_section(rows: &[PersonalRow]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "## Personal data\n");
    let _ = writeln!(
        md,
        "Commands on PostgreSQL whose events carry a name and an e-mail address, plain or \
         marked `Personal` (each sealed with XChaCha20-Poly1305 under the aggregate's own \
         key), each variant in a database of its own. Every command loads its stream without \
         the aggregate cache, so it opens the fields of every earlier event of the stream \
         (up to the stream's length) before it seals its own; the first command of each \
         aggregate also makes its key (one statement). Keys are cached by the store's ring. \
         Plain and personal runs alternate, three of each, every run in a fresh database \
         (400 aggregates, 10 commands each); the medians are shown.\n"
    );
    let _ = writeln!(md, "| events carry | clients | commands/s | vs plain |");
    let _ = writeln!(md, "| --- | ---: | ---: | ---: |");
    for row in rows {
        let plain = rows
            .iter()
            .find(|r| r.clients == row.clients && r.what.contains("plain"))
            .map_or(f64::NAN, |r| r.per_second);
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.2}x |",
            row.what,
            row.clients,
            row.per_second,
            row.per_second / plain
        );
    }
    md.push('\n');
    md
}
