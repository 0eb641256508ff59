//! How to read the results; appended to every report.

/// How to read the results; appended to every report.
pub(crate) const READING: &str = r#"
## Reading these numbers

**Variance.** Runs on this machine vary a lot from one to the next (a shared
2-core machine whose disk is shared too: postgres-es alone has measured from
1,181 to 3,478 commands/s at 1 client across runs of the same code, and
pgbench from 2,800 to 8,300 single-row inserts/s); compare the systems within
one run, not across runs; the floor's probes (the section after the machine)
say whether this run's machine moved under it, and which rows to doubt. When
the commit floor is high (a slow fsync day),
the steady-rate scenario at 2,000 commands/s runs above what the machine
sustains and measures queueing.

**Commands at 1 client** are bounded by the commit. A command is the stream's
load, the decision, and the append, which is one statement committing on its
own; every system pays one durable commit per command, and pgbench's 1-client
figure is that commit alone (plus one cheap insert). Outflow makes 2 round
trips per command (1 with its aggregate cache: the load is skipped), tuned
postgres-es 4 (load, `BEGIN`, `INSERT`, `COMMIT`; 6 with the default pool's
pings). The statement table above shows the server's share: what is left of a
command is the flush and the round trips, so a ratio against postgres-es can
never pass pgbench's rate divided by postgres-es's — the paragraph after this
one computes that ceiling for this run.

**Commands at 1 client against pgbench beside them** (the targets of 75 %
without the cache and 90 % with it). A command without the cache is two round
trips — the stream's load, whose answer the decision needs before the append
can be sent, and the append — where pgbench's insert is one; with the cache
it is the append alone, a heavier insert than pgbench's (the guard's probe,
three indexes, the log's columns: about 80 µs of execution against 45 µs for
postgres-es's insert in the statement table above). A profile of the 1-client
run (`perf record` on the client, 20,000 commands at 2,110/s) finds 62 % of
the client's CPU in the kernel — sending on the socket wakes the server,
and the runtime's thread parks between round trips — and no function in
user space above 1.3 % (libc's memory copy; Outflow's busiest, the command
bus, 0.6 %): the client waits for the network, it does not compute. So without the cache the
ratio is bounded near one round trip out of two plus the insert's difference
(measured 55–60 %), and with the cache by the insert's cost (80–85 %); moving
either needs the load and the append in one round trip, which only a
server-side function would give, at the cost of the statement's simplicity.

**Commands at 16 clients** are bounded by the server's CPU (2 cores for 16
clients and PostgreSQL). Outflow's append does more work per row than
postgres-es's insert — the global log's columns (position, transaction id,
event id, time), two log indexes besides the primary key, and the stream's
order guard, which reads the stream's last event — and buys with it the
gap-safe log that every projection reads. Appends that arrive while two are
in flight are grouped into one statement and one commit (each with its own
guard and its own `Conflict`), which is where the gain over postgres-es at 16
clients comes from; pgbench's single-row insert is cheaper still (no read, one
index, no JSON).

**JetStream on one machine.** The JetStream rows run the three servers of
the cluster (each stream's three replicas) on the same 2 cores as PostgreSQL
and the benchmark's client: each append is received by the stream's leader,
proposed to the two followers and acknowledged once one of them has it, so
one command costs the work of several servers where PostgreSQL's costs one.
A command is two requests on either store (the load, which on JetStream asks
only for the messages after those the store keeps, and the append). Partitions
add no CPU here: each is one more Raft group, and 16 clients' appends split
four ways make smaller replication batches, so 4 partitions run below 1 on
this machine. The target (4 partitions at 16 clients at least the PostgreSQL
store's rate) counts on each partition's leader having a machine of its own,
which a single machine cannot show; the rows measure the cost of an append
here, not the write capacity of a cluster.

**The command's client cost** (profiled at 16 clients with `perf record`
on the benchmark's client, the development server of this machine, 22,000
commands): the client used 2.9 s of CPU while the machine was busy for
10.9 s — a quarter; PostgreSQL used the rest. Per command that is about
120 µs of client CPU, half of it in the kernel (the socket's send and
receive, and waking the runtime's threads), a tenth in `malloc` and `free`;
no function of Outflow, sqlx or serde takes more than 1 % of the samples on
its own (JSON, statement preparation — sqlx caches prepared statements —
and the event ids' random bits are each below it). The limit at 16 clients is the server's CPU,
which group append attacks; making the client leaner would not move it.

**The cost of an index and of the guard.** Measured one at a time with
prepared single-row appends (the append statement, to new streams, into a
table of 200,000 events; pgbench on one connection, `pg_stat_statements`
execution time, three rounds of 10 s each): the statement took 51–58 µs;
without the aggregate-type log index, or without the transaction log index,
no difference beyond the rounds' spread; without the order guard, 41–47 µs.
None of the three can go: every log reader's batch is a range scan of the
transaction log index, a projection of one aggregate type reads through the
type index (without it, a filtered batch walks the whole log), and the guard
keeps each stream's events in log order when transactions interleave (the
`log_ordering` tests fail without it). The guard is now one probe of the
primary key instead of a CTE read twice: 1–3 µs less in each round. The rest
of the difference with postgres-es's insert (the statement table above) is
the log's columns: an identity sequence, a transaction id, a UUID and a
timestamp per row, and wider index entries.

**Statements per live batch.** A batch of the live projection in the
steady-rate runs is: one read of the window (the batch, the head and whether
an open transaction holds events back, in one statement), the read model's
load and write (the `ViewProjection`'s two), `BEGIN`, the checkpoint (fenced
by the lease in the same `UPDATE`) and `COMMIT` — six, plus a coalesced
`NOTIFY` for other nodes. Besides the batch, the node's waiters share one
read of the checkpoints per batch (the view they all answer from). It was
about seven plus an empty re-read, a count and a second refresh per batch
before; `wait_for` now costs no statement when the shared checkpoint view
already shows the target passed. Three would need
the handler's write, the checkpoint and the commit sent as one round trip,
which sqlx does not do inside a transaction (a multi-statement string cannot
carry bind parameters), and a `BEGIN` folded into the first statement; left
as the next step.

**Latency at a steady rate.** The p50 is the command (one commit), then
the projection's batch (one more commit), whose commit shows in the node's
shared checkpoint view at once (the view's refresh follows it); the
p99 is the tail of the flush on this shared disk and queueing for the two
cores. It moves a lot with the server and the day: on the development
server of this machine (`shared_buffers` 256 MB, otherwise the same), a
separate run measured a p99 of 6.35 ms at 500 commands/s and 21 ms at 2,000;
the targets count only this report's run. The row whose batches commit
without the WAL flush (`synchronous_projection_commits(false)`, off by
default) removes the second flush from the path: what is left is the
command's own commit and the batch's round trips. It changes what a
`wait_for` answer promises across a server crash (the read model may lose
the last batches and apply them again from the log; the projections chapter
says so), which is why it is an option and not the default. The two 500/s
rows run one after the other, not interleaved: on a run whose floor moved,
they can come out in either order (a full run earlier the same day
measured p50 2.1 and p99 7.6 ms without the flush against 3.4 and 15.7 ms
with it).

**Decisions against disintegrate.** At 1 client a decision is round trips
and per-statement work on both sides: Outflow's is five in sequence (the
read by query, beside the lookup of the command id on another connection;
`BEGIN`; the tags' locks; the conditional insert with its tags' rows and the
claim of the command id, one statement; `COMMIT`), disintegrate's seven (its
load; `BEGIN`; `SET TRANSACTION ISOLATION LEVEL SERIALIZABLE`; its epoch's
advisory locks; the check; the insert; `COMMIT`). The claim had a round trip
of its own before: folding it into the insert took the 1-client rate from
about 600 to about 700 decisions/s (runs of the section before and after). Where Outflow's parts cost more, `outflow-bench decision-phases`
times them one after another (1,000 each, mean per call, runs on a
throwaway server with default settings): the read by query of a counter's 50
events 0.54–0.74 ms against 0.17 ms for a counter with none — an index probe
of the events table per tag row and the event's decoding, where disintegrate
keeps each domain id in a column of the event's own row; a tagged append
without a condition 0.76–1.0 ms against 0.35–0.47 for a plain one (the
transaction, the locks, the tags' rows). Planning counts too: forcing
generic plans for the whole session (no planning after a statement's first
calls) took a decision from 1.7 to 1.25 ms — but a generic plan cannot see
the read's snapshot bound, on which the conditional insert's check chooses
its index range, and could scan the log on a large table, so the plan is
left to the server. The next steps are a check driven by the tag's index
(safe under a generic plan) and a server-side function that takes the locks
and then checks and inserts under a fresh snapshot, which would drop
`BEGIN`, `COMMIT` and a round trip; the tags' table is what lets a tag be
added to events already written (`backfill_tags`) and an event carry any
number of them. At 16 clients the order turns: disintegrate's serializable
transactions abort on conflicts between decisions that share no counter
(predicate locks on shared index pages: two to three retries per commit
with every client on counters of its own), where Outflow's locks are per
tag and unrelated decisions commit side by side; on one counter both retry,
disintegrate several times more often.

**Rebuild** replays with one read of the log per batch; a bigger batch means
fewer round trips and fewer checkpoint commits, at the cost of memory (one
batch of decoded events). The hand-written projection and the View adapter
both run the read model's writes for the whole batch in its transaction.
"#;
