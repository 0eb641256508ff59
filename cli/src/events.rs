//! `outflow events`: the log, or one stream, or the events of one
//! correlation, as a table or as JSON lines; `--follow` keeps printing new
//! events as they commit (in log order, never skipping a late commit).

use std::io::Write;

use anyhow::Context;
use outflow::{Checkpoint, EventLog, EventStore, LogFilter, RecordedEvent};
use serde_json::json;

use crate::store::{with_store, Access, Store, StoreOptions};
use crate::Output;

/// `outflow events` arguments.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// The store.
    pub url: String,
    /// One stream: `TYPE/ID` (for example `account/a-1`).
    #[arg(long, conflicts_with_all = ["after", "aggregate_type", "correlation"])]
    pub stream: Option<String>,
    /// Only events of these aggregate types (repeat for more).
    #[arg(long = "type")]
    pub aggregate_type: Vec<String>,
    /// Start at the first event, in log order, whose position is above this
    /// one (a transaction that committed late can put a lower position
    /// after it).
    #[arg(long)]
    pub after: Option<u64>,
    /// Only the events of one correlation (one user action and everything
    /// it caused), found by reading the log.
    #[arg(long)]
    pub correlation: Option<uuid::Uuid>,
    /// At most this many events (0: no limit).
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Keep printing new events until Ctrl-C.
    #[arg(long, conflicts_with = "stream")]
    pub follow: bool,
}

/// Runs `outflow events`.
pub async fn run(args: EventsArgs, options: &StoreOptions, output: Output) -> anyhow::Result<()> {
    let store = Store::open(&args.url, options, Access::Existing).await?;
    with_store!(&store, s => list(s, &args, output).await)
}

async fn list<S: EventLog + EventStore>(
    store: &S,
    args: &EventsArgs,
    output: Output,
) -> anyhow::Result<()> {
    let limit = if args.limit == 0 {
        usize::MAX
    } else {
        args.limit
    };
    let mut printer = Printer::new(output);
    if let Some(stream) = &args.stream {
        let (aggregate_type, aggregate_id) = stream
            .split_once('/')
            .context("--stream takes TYPE/ID, for example account/a-1")?;
        let mut after = 0;
        while printer.printed < limit {
            let batch = (limit - printer.printed).min(500);
            let events = store
                .read_stream(aggregate_type, aggregate_id, after, batch)
                .await?;
            let Some(last) = events.last() else { break };
            after = last.sequence;
            for event in &events {
                printer.print(event)?;
            }
        }
        return printer.end();
    }
    let base = if args.aggregate_type.is_empty() {
        LogFilter::all()
    } else {
        LogFilter::aggregate_types(args.aggregate_type.clone())
    };
    // A partitioned log (JetStream) is read one partition at a time: each is
    // ordered on its own.
    let parts = store.partitions().max(1);
    let filters: Vec<LogFilter> = if parts == 1 {
        vec![base]
    } else {
        (0..parts)
            .map(|p| base.clone().with_partition(p, parts))
            .collect()
    };
    let mut checkpoints = Vec::with_capacity(filters.len());
    for filter in &filters {
        checkpoints.push(match args.after {
            Some(position) => start_after(store, filter, position).await?,
            None => Checkpoint::START,
        });
    }
    let mut wakeups = args.follow.then(|| store.wakeups());
    let stop = outflow::CancellationToken::new();
    if args.follow {
        let stop = stop.clone();
        tokio::spawn(async move {
            crate::shutdown_signal().await;
            stop.cancel();
        });
    }
    'reading: loop {
        let mut read_any = false;
        for (part, filter) in filters.iter().enumerate() {
            let events = store.read_log(checkpoints[part], filter, 500).await?;
            let Some(last) = events.last() else { continue };
            read_any = true;
            checkpoints[part] = last.checkpoint();
            for event in &events {
                if args.correlation.is_some() && event.correlation_id != args.correlation {
                    continue;
                }
                if printer.printed >= limit && !args.follow {
                    break 'reading;
                }
                printer.print(event)?;
            }
        }
        if read_any {
            continue;
        }
        match wakeups.as_mut() {
            Some(wakeups) => {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = wakeups.wait() => {}
                }
            }
            None => break,
        }
    }
    printer.end()
}

/// The checkpoint just before the first event of `filter`, in log order,
/// whose position is above `position`.
async fn start_after<S: EventLog>(
    store: &S,
    filter: &LogFilter,
    position: u64,
) -> anyhow::Result<Checkpoint> {
    let mut after = Checkpoint::START;
    loop {
        let events = store.read_log(after, filter, 1_000).await?;
        let Some(last) = events.last() else {
            return Ok(after);
        };
        if let Some(i) = events.iter().position(|e| e.position > position) {
            return Ok(match i {
                0 => after,
                i => events[i - 1].checkpoint(),
            });
        }
        after = last.checkpoint();
    }
}

struct Printer {
    output: Output,
    printed: usize,
    out: std::io::Stdout,
}

impl Printer {
    fn new(output: Output) -> Self {
        let printer = Printer {
            output,
            printed: 0,
            out: std::io::stdout(),
        };
        if output == Output::Text {
            println!(
                "{:>9}  {:<24} {:>5}  {:<20} {:<20}  payload",
                "position", "stream", "seq", "type", "recorded at"
            );
        }
        printer
    }

    fn print(&mut self, event: &RecordedEvent) -> anyhow::Result<()> {
        let mut out = self.out.lock();
        match self.output {
            Output::Json => writeln!(out, "{}", event_json(event))?,
            Output::Text => writeln!(
                out,
                "{:>9}  {:<24} {:>5}  {:<20} {:<20}  {}",
                event.position,
                format!("{}/{}", event.aggregate_type, event.aggregate_id),
                event.sequence,
                event.event_type,
                event.recorded_at.format("%Y-%m-%d %H:%M:%S"),
                event.payload
            )?,
        }
        out.flush()?;
        self.printed += 1;
        Ok(())
    }

    fn end(self) -> anyhow::Result<()> {
        if self.output == Output::Text && self.printed == 0 {
            eprintln!("no events");
        }
        Ok(())
    }
}

/// One event as a JSON line.
pub fn event_json(event: &RecordedEvent) -> serde_json::Value {
    json!({
        "position": event.position,
        "transaction_id": event.transaction_id,
        "aggregate_type": event.aggregate_type,
        "aggregate_id": event.aggregate_id,
        "sequence": event.sequence,
        "event_id": event.event_id,
        "event_type": event.event_type,
        "event_version": event.event_version,
        "recorded_at": event.recorded_at.to_rfc3339(),
        "correlation_id": event.correlation_id,
        "causation_id": event.causation_id,
        "metadata": event.metadata,
        "payload": event.payload,
    })
}
