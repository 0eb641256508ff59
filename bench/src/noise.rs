//! The machine's floor: pgbench's single-row insert on one connection (one
//! durable commit each), probed at the start and the end of a run and between
//! its sections. A section whose probes before and after differ by more than
//! a fifth was taken while the machine changed under it (a neighbour's disk
//! work, a slow fsync spell): its rows are flagged, and the 1-client rows,
//! the ones that depend most on the commit, are taken again.
//!
//! Beside it, each probe times a fixed piece of CPU work in the benchmark's
//! own process: a slower or shared core (the host's other guests taking
//! time from this machine's cores, a lower clock) slows it and the
//! CPU-bound sections (rebuilds, JSON) while the commit probe may not move.
//! It does not see another process of this machine competing for the cores:
//! the scheduler gives a short burst of work its share at once. A window is
//! disturbed when either figure moved by more than a fifth.

use std::fmt::Write as _;

use anyhow::Result;

use crate::scenarios::pgbench;
use crate::setup::Server;
use crate::stats::Size;

/// How far the floor may move across a section before its rows are flagged.
pub(crate) const TOLERANCE: f64 = 0.20;

/// One probe of the floor.
pub(crate) struct Probe {
    /// Where in the run it was taken.
    pub(crate) label: String,
    /// Single-row inserts per second on one connection.
    pub(crate) per_second: f64,
    /// Milliseconds of the fixed CPU work ([`cpu_work_ms`]).
    pub(crate) cpu_ms: f64,
}

/// Times a fixed piece of CPU work on one thread: FNV-1a over a 16 KiB
/// buffer (in the core's cache, allocated once: neither the allocator's
/// state nor the memory's matters), 2,000 times; the median of five such
/// runs, in milliseconds. Its time moves with the core's availability and
/// speed alone.
pub(crate) fn cpu_work_ms() -> f64 {
    let buffer: Vec<u8> = (0..16 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let started = std::time::Instant::now();
            let mut hash = 0xcbf2_9ce4_8422_2325u64;
            for round in 0..2_000u64 {
                hash ^= round;
                for &byte in std::hint::black_box(&buffer) {
                    hash ^= u64::from(byte);
                    hash = hash.wrapping_mul(0x0100_0000_01b3);
                }
            }
            std::hint::black_box(hash);
            started.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// The probes of one run, in order.
#[derive(Default)]
pub(crate) struct Floor {
    pub(crate) probes: Vec<Probe>,
}

/// A stretch of the run between two probes (their indexes).
#[derive(Clone, Copy)]
pub(crate) struct Window {
    pub(crate) before: usize,
    pub(crate) after: usize,
}

impl Floor {
    /// Probes the floor now; returns the probe's index.
    pub(crate) async fn probe(
        &mut self,
        server: &Server,
        size: &Size,
        label: &str,
    ) -> Result<usize> {
        let seconds = if size.quick { 2 } else { 5 };
        let per_second = pgbench(server, 1, seconds).await?;
        let cpu_ms = tokio::task::spawn_blocking(cpu_work_ms).await?;
        eprintln!(
            "   floor ({label}): {per_second:.0} single-row inserts/s, CPU probe {cpu_ms:.1} ms"
        );
        self.probes.push(Probe {
            label: label.to_owned(),
            per_second,
            cpu_ms,
        });
        Ok(self.probes.len() - 1)
    }

    /// The most recent probe's index.
    pub(crate) fn last(&self) -> usize {
        self.probes.len().saturating_sub(1)
    }

    /// The rate of probe `index` (0 when there is none).
    fn rate(&self, index: usize) -> f64 {
        self.probes.get(index).map_or(0.0, |p| p.per_second)
    }

    /// The CPU probe's time at probe `index` (0 when there is none).
    fn cpu(&self, index: usize) -> f64 {
        self.probes.get(index).map_or(0.0, |p| p.cpu_ms)
    }

    /// How much the floor moved across `window`: the difference of its two
    /// probes as a fraction of the larger, commit or CPU, whichever moved
    /// more.
    pub(crate) fn moved(&self, window: Window) -> f64 {
        moved(self.rate(window.before), self.rate(window.after))
            .max(moved(self.cpu(window.before), self.cpu(window.after)))
    }

    /// Whether `window` moved by more than [`TOLERANCE`].
    pub(crate) fn disturbed(&self, window: Window) -> bool {
        self.moved(window) > TOLERANCE
    }

    /// The floor beside `window`: the mean of its two probes.
    pub(crate) fn beside(&self, window: Window) -> f64 {
        (self.rate(window.before) + self.rate(window.after)) / 2.0
    }

    /// How far the floor moved over the whole run (the lowest probe against
    /// the highest), commit or CPU, whichever moved more.
    pub(crate) fn spread(&self) -> f64 {
        if self.probes.is_empty() {
            return 0.0;
        }
        let spread_of = |value: fn(&Probe) -> f64| {
            let low = self.probes.iter().map(value).fold(f64::INFINITY, f64::min);
            let high = self.probes.iter().map(value).fold(0.0, f64::max);
            moved(low, high)
        };
        spread_of(|p| p.per_second).max(spread_of(|p| p.cpu_ms))
    }

    /// A paragraph for a section's text when `window` was disturbed, else
    /// nothing; `what` names its rows.
    pub(crate) fn flag(&self, what: &str, window: Window) -> String {
        if !self.disturbed(window) {
            return String::new();
        }
        format!(
            "**Disturbed ({what}):** the machine's floor moved from {:.0} to {:.0} \
             single-row inserts/s and its CPU probe from {:.1} to {:.1} ms ({:.0} %) while \
             these rows were taken: compare them with each other, not with other sections \
             or runs.\n\n",
            self.rate(window.before),
            self.rate(window.after),
            self.cpu(window.before),
            self.cpu(window.after),
            100.0 * self.moved(window)
        )
    }

    /// The `met` cell of a target whose figures come from `window`.
    pub(crate) fn met(&self, met: bool, window: Window) -> String {
        let verdict = if met { "yes" } else { "**no**" };
        if self.disturbed(window) {
            format!(
                "{verdict} (floor moved {:.0} %)",
                100.0 * self.moved(window)
            )
        } else {
            verdict.to_owned()
        }
    }

    /// The report's section on the floor.
    pub(crate) fn section(&self, repeats: &[String]) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "## The machine's floor during this run\n\n\
             pgbench's single-row insert on one connection (one durable commit each), \
             taken at the start and the end of the run and between its sections, each \
             with a fixed piece of CPU work timed in the benchmark's process (a hash over \
             a buffer in the core's cache, the median of five runs). A \
             section whose probes before and after differ by more than {:.0} % (either \
             figure) is flagged \
             where its rows are, and so is each target measured in it; the 1-client command \
             rows are taken again (up to three times) when the floor moved under them.\n\n\
             | probe | inserts/s | vs the first | CPU probe ms | vs the first |\n|---|---|---|---|---|",
            100.0 * TOLERANCE
        );
        let first = self.probes.first().map_or(1.0, |p| p.per_second.max(1.0));
        let first_cpu = self.probes.first().map_or(1.0, |p| p.cpu_ms.max(0.001));
        for probe in &self.probes {
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.2}× | {:.1} | {:.2}× |",
                probe.label,
                probe.per_second,
                probe.per_second / first,
                probe.cpu_ms,
                probe.cpu_ms / first_cpu
            );
        }
        let _ = writeln!(
            md,
            "\nOver the whole run the floor moved by {:.0} %{}.",
            100.0 * self.spread(),
            if self.spread() > TOLERANCE {
                ": the run was disturbed; sections flagged below are not comparable with other runs"
            } else {
                ": a quiet run"
            }
        );
        for repeat in repeats {
            let _ = writeln!(md, "{repeat}");
        }
        let _ = writeln!(md);
        md
    }
}

/// The difference of two rates as a fraction of the larger.
pub(crate) fn moved(a: f64, b: f64) -> f64 {
    let high = a.max(b);
    if high <= 0.0 {
        0.0
    } else {
        (a - b).abs() / high
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floor(rates: &[f64]) -> Floor {
        Floor {
            probes: rates
                .iter()
                .enumerate()
                .map(|(i, r)| Probe {
                    label: format!("p{i}"),
                    per_second: *r,
                    cpu_ms: 100.0,
                })
                .collect(),
        }
    }

    #[test]
    fn a_window_is_disturbed_when_its_floor_moves_by_more_than_a_fifth() {
        let f = floor(&[3000.0, 2500.0, 1900.0]);
        let quiet = Window {
            before: 0,
            after: 1,
        };
        let loud = Window {
            before: 1,
            after: 2,
        };
        assert!(!f.disturbed(quiet), "{}", f.moved(quiet));
        assert!(f.disturbed(loud), "{}", f.moved(loud));
        assert!(f.flag("x", quiet).is_empty());
        assert!(f
            .flag("x", loud)
            .contains("(x):** the machine's floor moved from 2500 to 1900"));
        assert_eq!(f.met(true, quiet), "yes");
        assert_eq!(f.met(false, loud), "**no** (floor moved 24 %)");
        assert!((f.beside(quiet) - 2750.0).abs() < 1e-9);
        assert!((f.spread() - (1100.0 / 3000.0)).abs() < 1e-9);
    }

    #[test]
    fn the_section_lists_every_probe_and_says_whether_the_run_was_quiet() {
        let quiet = floor(&[3000.0, 2900.0]).section(&[]);
        assert!(
            quiet.contains("| p1 | 2900 | 0.97× | 100.0 | 1.00× |"),
            "{quiet}"
        );
        assert!(quiet.contains("a quiet run"), "{quiet}");
        let loud = floor(&[3000.0, 1000.0]).section(&["repeated once".to_owned()]);
        assert!(loud.contains("the run was disturbed"), "{loud}");
        assert!(loud.contains("repeated once"), "{loud}");
    }

    #[test]
    fn a_window_is_disturbed_when_its_cpu_probe_moves_though_the_commit_does_not() {
        let mut f = floor(&[3000.0, 3000.0, 3000.0]);
        f.probes[2].cpu_ms = 140.0;
        let quiet = Window {
            before: 0,
            after: 1,
        };
        let busy = Window {
            before: 1,
            after: 2,
        };
        assert!(!f.disturbed(quiet));
        assert!(f.disturbed(busy), "{}", f.moved(busy));
        assert!(f
            .flag("x", busy)
            .contains("its CPU probe from 100.0 to 140.0 ms (29 %)"));
        assert!(f.section(&[]).contains("the run was disturbed"));
    }

    #[test]
    fn the_cpu_probe_measures_something() {
        let ms = cpu_work_ms();
        eprintln!("CPU probe: {ms:.1} ms");
        assert!(ms > 0.0 && ms.is_finite(), "{ms}");
    }
}
